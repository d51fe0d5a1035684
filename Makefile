# Two commands do all set-up:  `make demo` (install + main job) and `make test` (install + lint + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.saferedir-installed
PKGS   := pyproject.toml adapters/pyproject.toml plugins/shapes/pyproject.toml plugins/bench/pyproject.toml \
          plugins/nudity/pyproject.toml plugins/vangogh/pyproject.toml plugins/weapons/pyproject.toml

.PHONY: demo test lint bench

$(STAMP): $(PKGS) constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from the local CPU wheel, so nothing pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,train]' -e ./adapters -e './plugins/bench[leace,plots]' -e ./plugins/shapes \
		-e ./plugins/nudity -e ./plugins/vangogh -e ./plugins/weapons
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/saferedir demo --out saferedir-demo

lint: $(STAMP)
	$(BIN)/ruff check saferedir_sdk adapters plugins tests benchmarks
	$(BIN)/ruff format --check saferedir_sdk adapters plugins tests benchmarks

test: lint
	$(BIN)/python -m pytest

# the benchmarks (not part of `make test`): slow tests, the efficacy table, the I2P table
bench: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e './plugins/bench[all]'
	$(BIN)/python -m pytest -m slow
	$(BIN)/python benchmarks/efficacy.py --out bench-out/eval
	$(BIN)/python benchmarks/i2p_detection.py --out bench-out/i2p
