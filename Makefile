# Two entry points that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU wheel first: a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,dist]"
	# kronfluence without its torchvision requirement (PyPI torchvision breaks the CPU torch).
	$(BIN)/python -m pip install -q --no-deps kronfluence==1.0.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bgotrace demo --out runs/demo --overwrite

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	# import contracts (.importlinter): the packages' layers follow the data flow
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

clean:
	rm -rf $(VENV) runs .bgotrace-cache
