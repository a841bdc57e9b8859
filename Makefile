# The README's commands. Each target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every dependency, with hashes: the image installs LOCK, the venv DEV_LOCK (LOCK + dev tools).
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
STAMP := $(VENV)/.installed-$(shell $(PYTHON) -c 'import hashlib; print(hashlib.sha1(open("pyproject.toml","rb").read() + open("$(DEV_LOCK)","rb").read()).hexdigest()[:12])')
# uv resolves for the image's Python; it keeps the pins already in the lock files unless
# asked to move them (make lock LOCK_FLAGS=--upgrade). setuptools builds the project.
LOCK_COMPILE := $(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--custom-compile-command 'make lock' pyproject.toml deploy/build-requirements.in $(LOCK_FLAGS)

.PHONY: demo test lint unit integration soak benchmark benchmark-quick profile client lock audit clean

# Where the demo listens; on a machine where 8080 or 8081 is taken:
# make demo DEMO_BIND=127.0.0.1:9080 SIMULATOR_BIND=127.0.0.1:9081 (DEMO_BIND unset: GATEWAY_BIND,
# else 127.0.0.1:8080).
DEMO_BIND ?=
SIMULATOR_BIND ?= 127.0.0.1:8081

demo: $(STAMP)
	@$(BIN)/ews-gateway demo $(if $(DEMO_BIND),--bind $(DEMO_BIND) )--simulator-bind $(SIMULATOR_BIND)

# What `make test` costs and needs, said before anything runs (also under make -j).
SCHEMA_DIR := $(or $(EWS_SCHEMA_DIR),../shared/ews-schema)
SCHEMA_FOUND := $(if $(wildcard $(SCHEMA_DIR)/messages.xsd),found,not found: they will skip)
ifneq ($(filter test,$(MAKECMDGOALS)),)
$(info make test: lint, then every test (unit and integration) with coverage: about 10 minutes on 2 cores.)
$(info The EWS schema tests need the schema in EWS_SCHEMA_DIR (now $(SCHEMA_DIR), $(SCHEMA_FOUND)):)
$(info messages.xsd and types.xsd, which any Exchange serves at /EWS/messages.xsd and /EWS/types.xsd,)
$(info and xml.xsd, the XML namespace schema (https://www.w3.org/2001/xml.xsd).)
endif

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
	$(BIN)/python -m benchmarks.watchers
	$(BIN)/python -m benchmarks.silent
	$(BIN)/python -m benchmarks.silent --trickle
	$(BIN)/python -m benchmarks.profiling

# Where one worker's CPU goes under scenario 1's load (py-spy; also the last step of benchmark).
profile: $(STAMP)
	$(BIN)/python -m benchmarks.profiling --out profile

benchmark-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick
	$(BIN)/python -m benchmarks.watchers --quick

# The TypeScript client, regenerated from openapi.yaml and built (tests/integration checks it).
client:
	cd clients/typescript && npm ci --no-audit --no-fund && npm run generate && npm run build

# Regenerate both lock files after a change to pyproject.toml's dependencies.
lock: $(STAMP)
	$(LOCK_COMPILE) --extra dev -o $(DEV_LOCK)
	$(LOCK_COMPILE) --constraint $(DEV_LOCK) -o $(LOCK)

# Known vulnerabilities in the locked set (pip-audit; any finding fails, see .ci/audit.py).
audit: $(STAMP)
	$(BIN)/python .ci/audit.py $(DEV_LOCK)

# Targets started at once (make demo and make test in a fresh clone) build the environment
# one after the other, not over each other: the first holds the lock, the others wait for it
# and then find the stamp. flock is util-linux's (every Linux); without it, no lock.
VENV_LOCK := $(if $(shell command -v flock),flock $(VENV).lock,)

# The locked versions, checked against their hashes, then the project without dependencies.
# --no-deps: the lock names every package, so pip resolves nothing (pip 23 resolving an extra
# such as coverage[toml] would reach past the pin for a newer release and refuse it unhashed).
# GSSAPI (the kerberos extra, not locked: it builds with a C compiler against libkrb5-dev)
# is added where it can be; without it the Kerberos tests skip.
# The recipe is not echoed: it says what it does, and pip shows its progress on the locked
# packages. PYTHONWARNINGS=ignore: setuptools warns, at length, on every editable install of
# a package whose folder sits in the working directory, as this one's always does.
$(STAMP): pyproject.toml $(DEV_LOCK)
	@$(VENV_LOCK) sh -ec '\
	test -f $@ && exit 0; \
	echo "Building the environment in $(VENV) (about 3 minutes; pip shows its progress)"; \
	$(PYTHON) -m venv $(VENV); \
	$(BIN)/pip install --disable-pip-version-check --no-deps --require-hashes -r $(DEV_LOCK); \
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --disable-pip-version-check --no-deps \
	  --no-build-isolation -e .; \
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --disable-pip-version-check \
	  -e ".[dev,kerberos]" >/dev/null 2>&1 \
	  || echo "note: the kerberos extra was not built (needs a C compiler and libkrb5-dev)"; \
	rm -f $(VENV)/.installed-*; \
	touch $@; \
	echo "The environment in $(VENV) is ready."'

clean:
	rm -rf $(VENV) $(VENV).lock .pytest_cache .mypy_cache .ruff_cache .coverage .hypothesis
