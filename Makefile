# The two commands a newcomer types are `make demo` and `make test`; both set up
# what is missing first. Everything else here is for contributors and GPU users.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SCENES ?= data/scenes
CONFIG ?= configs/cpu_scenes.yaml
BOOK_FLAGS := -W -n --keep-going

.PHONY: help setup test demo data-scenes train-cpu book bench reproduce reproduce-all clean

help:
	@echo "make demo   - set up, build the CPU dataset, train the CPU default with and without DLP, build the book"
	@echo "make test   - set up, run the whole test suite (CI runs this)"
	@echo "make book   - build the Jupyter Book into _build/html"
	@echo "make bench  - run the benchmarks, write results/*.json"
	@echo "make reproduce CONFIG=configs/voc_92.yaml   - one paper run through papermill (GPU box)"
	@echo "make reproduce-all                         - the Table 1-4 matrix, skipping finished runs"

setup: $(STAMP)

# Re-runs only when a requirements file changes, so a second `make setup` is a no-op.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	bash .ci/system-deps
	@touch $@

test: setup
	$(PY) -m pytest -q --ignore=_build

data-scenes: setup
	$(PY) -m data_prep.scenes --root $(SCENES)

# The CPU default with and without DLP: the runs the book's chapters load (derprop.viewer.TRAINING_RUNS at
# size "small", in runs/book/small/). A finished run is not trained again; an interrupted one resumes.
train-cpu: data-scenes
	$(PY) -m derprop.viewer small

book: setup
	$(VENV)/bin/jupyter-book build . $(BOOK_FLAGS)

demo: train-cpu
	$(MAKE) book
	@echo "Book: _build/html/index.html  Runs: runs/book/small/cpu_{dlp,nodlp}/results.json"

bench: setup
	$(PY) -m benchmarks.dlp
	$(PY) -m benchmarks.derloss
	$(PY) -m benchmarks.train_step

reproduce: setup
	$(PY) -m pipelines.run_matrix one --config $(CONFIG)

reproduce-all: setup
	$(PY) -m pipelines.run_matrix all

clean:
	rm -rf _build .pytest_cache
