#!/usr/bin/env bash
# The GPU check on a machine that has its own CUDA torch and no package registry (the lent GPU
# machine: Python 3.12, torch, torchvision, lightning, torchmetrics, timm, OpenCV; ENV.md).
#
#   scripts/gpu_env.sh prepare          # here, with a registry: wheels into .gpu_env/wheels
#   scripts/gpu_env.sh run [ARGS...]    # there: install what is missing, run scripts/gpu_check.py
#
# `prepare` downloads, for CPython 3.12 on manylinux x86_64, the wheels of what segcon needs
# beyond that stack, at the versions of this checkout's .venv (build it first: make install), and
# builds antlr4-python3-runtime's (sdist only). `run` installs, with --no-deps and no index, only
# the wheels whose module the machine's Python cannot import, into .gpu_env/site, which it puts
# after the machine's own site-packages (the machine's torch and friends win), and runs the check
# from this checkout. .gpu_env/ is git-ignored: carry it (the device tool's `carry`).
# Pass the check's arguments after `run`, e.g. `--out "$OUT/gpu_check.json"`.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_DIR=.gpu_env
PY_TARGET=${PY_TARGET:-3.12}

# distribution name : module it provides (what `run` checks before installing). Not matplotlib:
# segcon imports it only to draw report figures, which the check does not, and the carried
# folder must stay under the device tool's 64 MiB (these are 45 MB, scipy 34 of them).
PACKAGES="hydra-core:hydra omegaconf:omegaconf antlr4-python3-runtime:antlr4 segmentation-models-pytorch:segmentation_models_pytorch
albumentations:albumentations albucore:albucore pydantic:pydantic pydantic_core:pydantic_core annotated-types:annotated_types
typing-inspection:typing_inspection stringzilla:stringzilla simsimd:simsimd rich:rich markdown-it-py:markdown_it mdurl:mdurl
Pygments:pygments scipy:scipy PyYAML:yaml"

prepare() {
    local venv_py=.venv/bin/python
    [ -x "$venv_py" ] || { echo "error: $venv_py not found: run 'make install' first (versions are read from it)" >&2; exit 1; }
    rm -rf "$ENV_DIR/wheels.tmp" && mkdir -p "$ENV_DIR/wheels.tmp"
    local pins=() sdists=()
    for entry in $PACKAGES; do
        local dist=${entry%%:*} version
        version=$("$venv_py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")
        if [ "$dist" = antlr4-python3-runtime ]; then sdists+=("$dist==$version"); else pins+=("$dist==$version"); fi
    done
    "$venv_py" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
        --python-version "$PY_TARGET" --implementation cp --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$ENV_DIR/wheels.tmp" "${pins[@]}"
    "$venv_py" -m pip wheel --disable-pip-version-check -q --no-deps -w "$ENV_DIR/wheels.tmp" "${sdists[@]}"
    rm -rf "$ENV_DIR/wheels" && mv "$ENV_DIR/wheels.tmp" "$ENV_DIR/wheels"
    du -sh "$ENV_DIR/wheels"
}

run() {
    local py=${PYTHON:-python3}
    [ -d "$ENV_DIR/wheels" ] || { echo "error: $ENV_DIR/wheels not found: run 'scripts/gpu_env.sh prepare' where a registry is reachable, and carry $ENV_DIR" >&2; exit 1; }
    local missing=()
    for entry in $PACKAGES; do
        local dist=${entry%%:*} module=${entry##*:}
        if ! "$py" -c "import $module" 2>/dev/null; then
            local pattern=${dist//-/_}
            local wheel
            wheel=$(find "$ENV_DIR/wheels" -maxdepth 1 -iname "${pattern}-*.whl" | head -n 1)
            [ -n "$wheel" ] || { echo "error: $module is missing here and $ENV_DIR/wheels has no wheel of $dist" >&2; exit 1; }
            missing+=("$wheel")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing into $ENV_DIR/site: ${missing[*]##*/}"
        "$py" -m pip install --disable-pip-version-check -q --no-deps --no-index --target "$ENV_DIR/site" "${missing[@]}"
    fi
    # .gpu_env/site after the machine's site-packages; this checkout first (segcon, scripts/)
    "$py" -c 'import runpy, site, sys; site.addsitedir(sys.argv[1]); sys.path.insert(0, sys.argv[2]); sys.argv = sys.argv[3:]; runpy.run_path(sys.argv[0], run_name="__main__")' \
        "$PWD/$ENV_DIR/site" "$PWD" scripts/gpu_check.py "$@"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: scripts/gpu_env.sh prepare | run [gpu_check.py arguments]" >&2; exit 2 ;;
esac
