# Two commands from a fresh clone: `make demo` and `make test`.
# Each creates .venv, installs the pinned torch first (override with TORCH=...), then dinox
# (`make demo` without the test tools).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# What the demo needs (dinox with the DICOM codecs); the test and interop tools
# (pytest, transformers, imagecodecs) come on top for `make setup` and `make test`.
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[codecs]"
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e ".[dev,codecs]"
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/dinox demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) data/demo
