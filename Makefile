# `make demo`: set up the environment and run the embedded default (tiny local model + data, CPU, DeepSpeed ZeRO-2).
# `make test`: set up the environment (and Slurm's Debian packages) and run the test suite. CI runs `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; on a GPU cluster pass your CUDA build, e.g.
# make setup TORCH_SPEC="torch>=2.11,<2.16" TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test style quality clean

setup: $(VENV)/.installed

# Torch goes first: anything that pulls an unpinned torch would download a multi-GB CUDA build.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m sfm_dpo.versions --python  # Python >= 3.11, or one line saying how to get it
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

demo: setup
	$(BIN)/python -m sfm_dpo.tiny outputs/demo_assets
	bash scripts/launch.sh demo

test: setup
	bash scripts/install_slurm.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

style: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

quality: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/shellcheck scripts/*.sh scripts/sites/*.sh

clean:
	rm -rf outputs/demo outputs/demo_assets .cache
