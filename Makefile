# The README's commands. Each target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell $(PYTHON) -c 'import hashlib,sys; print(hashlib.sha1(open("pyproject.toml","rb").read()).hexdigest()[:12])')

.PHONY: demo test lint unit integration soak benchmark benchmark-quick clean

demo: $(STAMP)
	$(BIN)/ews-gateway demo

test: $(STAMP) lint
	$(BIN)/pytest --cov --cov-report=term

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest --ignore=tests/integration

integration: $(STAMP)
	$(BIN)/pytest tests/integration

soak: $(STAMP)
	$(BIN)/python -m tests.integration.soak --seconds 60

# The gateway against a hand-written Flask + requests baseline (see benchmarks/README.md).
benchmark: $(STAMP)
	$(BIN)/python -m benchmarks.run

benchmark-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# GSSAPI builds with a C compiler against libkrb5-dev; without them the Kerberos tests skip.
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,kerberos]' >/dev/null 2>&1 \
	  || echo "note: the kerberos extra was not built (needs a C compiler and libkrb5-dev)"
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .hypothesis
