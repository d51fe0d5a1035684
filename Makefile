# Two commands do all set-up:  `make demo` (install + main job) and `make test` (install + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.saferedir-installed

.PHONY: demo test lint bench

$(STAMP): pyproject.toml adapters/pyproject.toml plugins/shapes/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from the local CPU wheel, so nothing pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,diffusers]' -e ./adapters -e ./plugins/shapes
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/saferedir demo --out saferedir-demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check saferedir_sdk adapters tests

bench: $(STAMP)
	$(BIN)/python -m pytest -m slow
