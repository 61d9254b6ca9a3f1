# `make test` is the one command a fresh clone needs: it creates .venv, installs the CPU build of
# torch first (an unpinned torch would pull a multi-GB CUDA build), then the project, then runs
# pytest. Set PYTHON to pick another interpreter (3.10+), PYTEST_ARGS to pass pytest flags.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adm-installed

.PHONY: install test quickstart clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The embedded default, end to end: local Ray, local files, CPU, the scikit-learn digits (shipped
# in its wheel): prepare, train four models on Ray Train, sample at five classifier scales,
# upsample, evaluate, serve, summarize (jobs/quickstart.py). QUICK=1: the same at a tiny size.
quickstart: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) jobs/quickstart.py $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .pytest_cache
