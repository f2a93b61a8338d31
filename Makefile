# mergejax: `make demo` and `make test` work on a fresh machine; each creates
# .venv and installs the locked versions on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
WORKDIR ?= workdir
# Tests run in 2 processes (CI has 2 cores); each process sees 8 CPU devices. --dist loadfile
# keeps a file's tests on one worker, so its fixtures and caches (a multi-process launch, trained
# models) are built once: 19 min 21 s against 20 min 41 s for --dist load (clean clone, 2 cores).
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=15

.PHONY: demo test test-all bench lock clean torch-fixtures

$(INSTALLED): requirements/lock.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

demo: $(INSTALLED)
	$(PY) -m experiments.demo --workdir=$(WORKDIR)/demo

test: $(INSTALLED)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(INSTALLED)
	$(PY) -m pytest $(PYTEST_ARGS)

BENCHMARKS := $(filter-out %/__init__.py,$(wildcard experiments/benchmarks/*.py))
bench: $(INSTALLED)
	@if [ -z "$(BENCHMARKS)" ]; then echo "no benchmarks in experiments/benchmarks/ yet"; fi
	@set -e; for b in $(BENCHMARKS); do \
	  m=$$(echo $${b%.py} | tr / .); echo "== $$m"; $(PY) -m $$m; done

# Re-resolve the newest versions allowed by setup.cfg and write them to the lock.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip setuptools wheel
	.venv-lock/bin/pip install --quiet 'torch==2.13.0'
	.venv-lock/bin/pip install --quiet -e '.[data,plot,test,torch]'
	{ echo "# Exact versions that \`make\` and CI install (Python 3.11, CPU jax, CPU torch)."; \
	  echo "# Regenerate: make lock (from the ranges in setup.cfg, all extras; torch==2.13.0 resolves to its CPU build here)."; \
	  .venv-lock/bin/pip freeze --all | grep -viE '^(-e|mergejax)' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' | sort -f; } > requirements/lock.txt
	rm -rf .venv-lock

# Rebuild tests/fixtures/torch/ with torchvision, timm and open_clip in their own venv
# (torch's CPU build; the three libraries with --no-deps, since their releases pull a CUDA torch).
FIXTURES_VENV := .venv-fixtures
$(FIXTURES_VENV)/.installed: tools/torch_fixtures/requirements.txt tools/torch_fixtures/requirements-no-deps.txt
	rm -rf $(FIXTURES_VENV) && $(PYTHON) -m venv $(FIXTURES_VENV)
	$(FIXTURES_VENV)/bin/pip install --quiet --disable-pip-version-check -r tools/torch_fixtures/requirements.txt
	$(FIXTURES_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps \
	  -r tools/torch_fixtures/requirements-no-deps.txt
	touch $@

torch-fixtures: $(FIXTURES_VENV)/.installed
	$(FIXTURES_VENV)/bin/python tools/torch_fixtures/build.py --out tests/fixtures/torch

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
