# The README's two commands: `make train` (main job on the embedded default) and `make test`.
# Both create .venv on first use and install the project into it, so a fresh machine needs only Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/shapes.py
# One run directory per recipe: configs/shapes.py -> runs/shapes, configs/X.py -> runs/X.
WORKDIR ?= runs/$(basename $(notdir $(CONFIG)))
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

# The TPU compiler (libtpu, the version jax[tpu] names) for the AOT tests, kept off the import
# path: with libtpu importable, every CPU run of jax would probe for TPU chips and log errors.
TPU_COMPILER := $(VENV)/tpu-compiler
$(TPU_COMPILER)/libtpu/libtpu.so: $(BIN)/.installed
	$(BIN)/pip install --quiet --no-deps --target $(TPU_COMPILER) "$$($(BIN)/python -c \
	  'import importlib.metadata as m; print(next(r.split(";")[0] for r in m.requires("jax") \
	  if r.startswith("libtpu") and "tpu" in r))')"
	touch $@

test: $(BIN)/.installed $(TPU_COMPILER)/libtpu/libtpu.so
	TPU_LIBRARY_PATH=$(abspath $(TPU_COMPILER))/libtpu/libtpu.so $(BIN)/python -m pytest tests \
	  --numprocesses=auto --maxprocesses=4 --dist=loadfile

# ruff, the import-linter contracts in pyproject.toml (the package's layers, no cycles), and
# scripts/check_modules.py (no module over 600 lines, no private name used across modules).
lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports \
	  && $(BIN)/python scripts/check_modules.py

format: $(BIN)/.installed
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs
