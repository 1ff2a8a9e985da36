# segcon: the commands the README names. Each installs the pinned stack into .venv first if needed.
#   make train [ARGS="data=... model=..."]   train (default: the embedded synthetic dataset)
#   make test  [PYTEST_ARGS="-k ..."]        the whole test suite
#   make lint                                ruff
#   make bench [ARGS=...]                    scripts/benchmark.py
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

.PHONY: install train test lint bench gpu-check gpu-env clean

# constraints.txt pins torch===2.13.0 (the registry's standard build, which runs on CPU and GPU)
# for every pip call, so no later install can swap in another torch. See README "Install".
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev,pretrained]' --config-settings editable_mode=compat 2>&1 | { grep -v '$(PIP_NOISE)' || true; }
	@touch $@

install: $(STAMP)

train: $(STAMP)
	$(BIN)/segcon-train $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python scripts/benchmark.py $(ARGS)

# The GPU check (scripts/gpu_check.py) on this machine's GPU; `gpu-env` prepares the wheels a
# GPU machine without a registry needs (scripts/gpu_env.sh: there, `scripts/gpu_env.sh run`).
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py $(ARGS)

gpu-env: $(STAMP)
	scripts/gpu_env.sh prepare

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .gpu_env
