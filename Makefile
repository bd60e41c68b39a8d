# svdq: `make demo` renders an example end to end; `make test` runs lint and the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A torch release this project is tested with. From the package index on Linux this is the CUDA
# build; pick another build or version with e.g. `make install TORCH='torch==2.5.1'`.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[worker,embedded,dev]"
	touch $@

demo: install
	$(BIN)/svdq demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .svdq-demo svdq-demo.mp4 .pytest_cache .ruff_cache
