# Two commands a newcomer needs: `make run` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
# The inner loop: pure core, the contract, and unit tests with no server or service (< 60 s).
QUICK_TESTS := tests/core tests/contract tests/auth tests/hub tests/config/test_docs_config.py \
	tests/ops/test_client_address.py tests/ops/test_logs.py
QUICK_SKIP := --ignore=tests/contract/test_asyncapi_cli.py
# `make test` runs the test files on this many processes (pytest-xdist, a whole file per process at
# a time; tests/conftest.py hands out the slowest files first); TEST_WORKERS=0 runs them in one.
TEST_WORKERS ?= 2

.PHONY: run test test-quick test-deps lint typecheck bench bench-peers soak image clean

# The virtualenv gets uv (from PyPI, through the system's pip) and uv installs the project: it
# resolves and installs in about a second what pip takes 20-30 s for here. Without a usable
# system pip, a venv with its own pip installs uv instead.
$(UV):
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(BIN)/python install --quiet --no-compile uv \
		|| { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet uv; }

# What running needs, and nothing more (no test or lint toolchain).
$(RUN_STAMP): pyproject.toml | $(UV)
	$(UV) pip install --quiet --python $(BIN)/python -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(UV)
	$(UV) pip install --quiet --python $(BIN)/python -e '.[dev]'
	touch $@ $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/igratech-ws demo

test: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

# The npm packages the tests need (the JavaScript client's test packages, the AsyncAPI CLI) into
# their shared cache under ~/.cache/igratech-ws; the tests would install them on first use, which
# takes minutes. `.ci/run` calls it before `make test`.
test-deps: $(DEV_STAMP)
	$(BIN)/python -m tests.support.nodejs --install

test-quick: $(DEV_STAMP)
	$(BIN)/python -m pytest -q --durations=10 $(QUICK_SKIP) $(QUICK_TESTS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

bench: $(DEV_STAMP)
	$(BIN)/python -m bench.run

soak: $(DEV_STAMP)
	$(BIN)/python -m bench.soak

# The peers of `make bench`: Node servers into bench/peers/ (ignored), python-socketio and
# matplotlib into the virtualenv. Skipped peers are named in the report.
bench-peers: $(DEV_STAMP)
	$(UV) pip install --quiet --python $(BIN)/python -e '.[dev,bench]'
	mkdir -p bench/peers
	cp bench/peer_servers/package.json bench/peers/package.json
	cd bench/peers && npm install --no-audit --no-fund --loglevel=error

# The container image (Dockerfile; PYTHON_IMAGE picks the base, see README.md).
IMAGE ?= igratech-ws:dev
image:
	podman build -t $(IMAGE) $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
