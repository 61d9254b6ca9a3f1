# `make test` is the one command a fresh clone needs: it creates .venv, installs the CPU build of
# torch first (an unpinned torch would pull a multi-GB CUDA build), then the project, then
# Debian's chromium for the page test (when missing and apt-get can), then runs pytest. Set
# PYTHON to pick another interpreter (3.10+), PYTEST_ARGS to pass pytest flags.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adm-installed

.PHONY: install browser test test-fast quickstart clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Debian's headless chromium, for the page test: apt-get when it can, else one line saying how.
browser:
	@sh tests/install_browser.sh

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The edit loop: the tests that need no Ray cluster and are not end to end (a few minutes).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not cluster and not slow" $(PYTEST_ARGS)

# The embedded default, end to end: local Ray, local files, CPU, the scikit-learn digits (shipped
# in its wheel): prepare, train four models on Ray Train, sample at five classifier scales,
# upsample, evaluate, serve, summarize (jobs/quickstart.py). QUICK=1: the same at a tiny size.
quickstart: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) jobs/quickstart.py $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .pytest_cache
