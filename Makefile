# ICL Mixtures: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo ui test lint bench reproduce clean

setup: $(STAMP)

# torch==2.13.0 first when missing: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m iclmix.demo

# Browse a sweep's runs (default: the quickstart's) in MLflow's UI: make ui [SWEEP=name] [PORT=5000]
SWEEP ?= quickstart
PORT ?= 5000
ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/$(SWEEP)/mlflow.db --host 127.0.0.1 --port $(PORT)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench
	$(PY) -m bench.sweep_overhead
	$(PY) -m bench.time_to_icl
	$(PY) -m bench.bundle_speed

# The four CPU-scale reproductions of docs/reproduction.md (about 1.5 h on 2 cores; rerun to resume).
reproduce: setup
	PY=$(PY) bash docs/reproduce.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
