# svdq: `make demo` renders an example end to end; `make test` runs lint and the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The versions CI tests, shared with the Dockerfile. torch comes at the version pinned there: from the
# package index on Linux that is the CUDA build. Another torch: `make install TORCH='torch==2.7.1' CONSTRAINTS=`.
CONSTRAINTS ?= constraints.txt
TORCH ?= torch
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install demo test coverage lint format lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIN) "$(TORCH)"
	$(BIN)/python -m pip install --quiet $(PIN) -e ".[worker,embedded,dev]"
	touch $@

demo: install
	$(BIN)/svdq demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Three test processes on CI's two cores: most integration tests wait (leases, timeouts, outages) rather than
# compute, and with two the cores sat 23% idle (2026-11-27: 1198 s with two, 1080 s with three, same machine and
# commit). Each has its own redis-server, S3 server and worker; a file's tests stay in one process.
# PYTEST_WORKERS=0: one process.
# Under branch coverage of producer/ and worker/ (the worker, CLI and gateway processes the tests start
# included; [tool.coverage] in pyproject.toml): below `fail_under`, a floor only ever raised, the run fails.
PYTEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --cov --cov-report=term:skip-covered

test: install lint
	rm -rf .coverage-data
	$(PYTEST)

# `make test`, with an HTML report of what the suite leaves unrun (htmlcov/index.html).
coverage: install
	rm -rf .coverage-data
	$(PYTEST) --cov-report=html

# After upgrading packages in the venv (and a green `make test`): record them as the tested versions.
lock: install
	{ grep '^#' constraints.txt; $(BIN)/pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .svdq-demo svdq-demo.mp4 .pytest_cache .ruff_cache .coverage-data htmlcov
