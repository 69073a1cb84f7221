# The README's two commands: `make train` (main job on the embedded default) and `make test`.
# Both create .venv on first use and install the project into it, so a fresh machine needs only Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/shapes.py
WORKDIR ?= runs/shapes
# This machine image keeps the CPU build of torch in /opt/wheels; elsewhere pip takes it from PyPI.
export PIP_FIND_LINKS := $(wildcard /opt/wheels)

.PHONY: train test lint format clean

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

train: $(BIN)/.installed
	$(BIN)/python train.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(BIN)/.installed
	$(BIN)/python -m pytest tests

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs
