# segcon: the commands the README names. Each installs the pinned stack into .venv first if needed.
#   make train [ARGS="data=... model=..."]   train (default: the embedded synthetic dataset)
#   make test  [PYTEST_ARGS="-k ..."] [TEST_WORKERS=0]   the whole test suite (TEST_WORKERS=0: serial)
#   make lint                                ruff
#   make docs / make docs-serve              the documentation site into site/ (strict) / served with live reload
#   make bench [ARGS=...]                    scripts/benchmark.py (timings, then --ops)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.segcon-installed
# The machine's pip config lists local package folders that lack most packages; pip warns about
# each one. They change nothing, so keep them out of the install log.
PIP_NOISE := is ignored: it is neither a file nor a directory

export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install train test lint docs docs-serve bench gpu-check gpu-env clean

# constraints.txt pins torch===2.13.0 (the registry's standard build, which runs on CPU and GPU)
# for every pip call, so no later install can swap in another torch. See docs/getting-started.md, "Install".
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev,pretrained,docs]' --config-settings editable_mode=compat 2>&1 | { grep -v '$(PIP_NOISE)' || true; }
	@touch $@

install: $(STAMP)

train: $(STAMP)
	$(BIN)/segcon-train $(ARGS)

# The suite runs in pytest-xdist workers, one per core up to 4: most of its time is CLI runs in
# subprocesses, whose ~10 s import of torch + lightning is single-threaded. One torch thread per
# process (OMP_NUM_THREADS=1) keeps the workers and their subprocesses from oversubscribing the cores.
# On 2 cores this took the suite from ~25 to ~16 minutes (docs/development.md).
TEST_WORKERS ?= auto

test: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=1 \
	  $(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4 $(PYTEST_ARGS)

# The configuration reference is regenerated from conf/ first; a broken link, a missing anchor or
# a page left out of the navigation fails the build (mkdocs.yml: strict).
docs: $(STAMP)
	$(BIN)/python scripts/config_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict 2>&1 | { grep -v "^INFO" || true; }

docs-serve: $(STAMP)
	$(BIN)/python scripts/config_reference.py
	$(BIN)/mkdocs serve

lint: $(STAMP)
	$(BIN)/ruff check .

# The framework's overhead and loader throughput (ARGS go to this one), then the ATen ops and host
# syncs per training step of every contrastive term and teacher-student method.
bench: $(STAMP)
	$(BIN)/python scripts/benchmark.py $(ARGS)
	$(BIN)/python scripts/benchmark.py --ops

# The GPU check (scripts/gpu_check.py) on this machine's GPU; `gpu-env` prepares the wheels a
# GPU machine without a registry needs (scripts/gpu_env.sh: there, `scripts/gpu_env.sh run`).
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py $(ARGS)

gpu-env: $(STAMP)
	scripts/gpu_env.sh prepare

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .gpu_env
