# make demo: set up .venv and run the default pipeline.  make test: set up .venv and run the tests.
VENV := .venv
PYTHON := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test setup setup-dev ui

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt requirements-eval.txt
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	touch $@

demo: setup
	test -d .dvc || dvc init -q
	dvc repro

test: setup-dev
	ruff check .
	python -m pytest -q tests

ui: setup
	python -m pipeline.run.tracking
	mlflow ui --backend-store-uri sqlite:///mlflow.db
