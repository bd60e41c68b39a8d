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

# Two test processes: most integration tests wait (leases, timeouts, outages) rather than compute. Each has its
# own redis-server, S3 server and worker; a file's tests stay in one process. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2

test: install lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

# The suite with branch coverage of producer/ and worker/, the worker, CLI and gateway processes it starts
# included; fails below `fail_under` (pyproject.toml), a floor that is only ever raised. About 1.7x the
# suite's time (tracing every child process), so it is a target of its own.
coverage: install
	rm -rf .coverage-data
	$(BIN)/python -m pytest --cov --cov-report=term:skip-covered

# After upgrading packages in the venv (and a green `make test`): record them as the tested versions.
lock: install
	{ grep '^#' constraints.txt; $(BIN)/pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .svdq-demo svdq-demo.mp4 .pytest_cache .ruff_cache
