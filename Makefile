# `make run` and `make test` do all the set-up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test smoke bench bench-search bench-sweep clean

## run: create .venv, install cnnlab and train the default experiment (LeNet on Fashion-MNIST)
run: $(VENV)/.installed
	$(PY) -m cnnlab $(ARGS)

## test: create .venv with the dev, launchers, tracker and search extras and run the test suite
## (two workers, a test file each at a time: TEST_WORKERS=0 runs it in one process)
TEST_WORKERS ?= 2
test: $(VENV)/.installed-dev
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(ARGS)

## smoke: a tiny synthetic-data run, seconds on CPU
smoke: $(VENV)/.installed
	$(PY) -m cnnlab +debug=smoke $(ARGS)

## bench: epoch time of cnnlab vs the usual DataLoader loop vs the bare model (LeNet, Fashion-MNIST)
bench: $(VENV)/.installed
	$(PY) -m benchmarks.epoch --workers 0,2 $(ARGS)

## bench-search: epochs trained and best val accuracy of a search (TPE + ASHA) vs a grid over the same space
bench-search: $(VENV)/.installed-dev
	$(PY) -m benchmarks.search $(ARGS)

## bench-sweep: the 12-run LeNet grid one by one vs joblib vs fused, and a 4-run ResNet-18 group
bench-sweep: $(VENV)/.installed-dev
	$(PY) -m benchmarks.sweep $(ARGS)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

# the launchers, tracker and search extras too: tests/test_launchers.py runs real joblib and submitit
# sweeps, tests/test_trackers.py real TensorBoard and MLflow runs, tests/test_search.py Optuna searches
$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev,launchers,tensorboard,mlflow,search]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) outputs .pytest_cache
