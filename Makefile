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
ABLATION ?=
SIZE ?= full
GPUS ?=
DEVICE ?=
FORCE ?=
# Another torch build than the pinned CUDA 13 one, for an NVIDIA driver older than 580 or a V100 (README, "Which GPUs"):
#   make setup TORCH="torch==2.10.0 torchvision==0.25.0"
TORCH ?=
# gpu-check, weights and reproduce never install anything, so a GPU box's preinstalled torch is never replaced:
# they run on the .venv when there is one (`make setup`), else on $(PYTHON).
CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
BOOK_FLAGS := -W -n --keep-going

.PHONY: torch-choice help setup test demo data-scenes train-cpu book bench gpu-check weights reproduce reproduce-all clean

help:
	@echo "make demo   - set up, build the CPU dataset, train the CPU default and its baselines, build the book"
	@echo "make test   - set up, run the whole test suite (CI runs this)"
	@echo "make book   - build the Jupyter Book into _build/html"
	@echo "make bench  - run the benchmarks, write results/*.json"
	@echo "make gpu-check - CUDA tests, DDP kill + resume, fp16/bf16 steps, train-step benchmark, ResNet-101 run -> results/gpu_check_<device>.json"
	@echo "make weights  - check pretrained/resnet101.pth, the ImageNet deep-stem ResNet-101 the VOC configs load"
	@echo "make reproduce CONFIG=configs/voc_92.yaml [ABLATION=wo_dlp] [SIZE=small] [GPUS=N] [FORCE=1]  - one paper run (GPU box)"
	@echo "make reproduce-all [SIZE=small] [GPUS=N]   - the Table 1-4 matrix, skipping finished runs"

setup: $(STAMP)

# The interpreter make setup would use is checked before anything installs: the pins need Python >= 3.11, and pip's
# resolver error on 3.10 names none of this.
SETUP_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
ifneq ($(filter setup test demo data-scenes train-cpu book bench,$(MAKECMDGOALS)),)
PY_VERSION := $(shell $(SETUP_PY) -c 'import sys; print("%d.%d" % sys.version_info[:2], int(sys.version_info >= (3, 11)))' 2>/dev/null)
ifneq ($(word 2,$(PY_VERSION)),1)
$(error $(SETUP_PY) $(if $(PY_VERSION),is Python $(word 1,$(PY_VERSION)),does not run) but derprop needs Python 3.11 or newer: $(if $(wildcard $(PY)),rm -rf $(VENV) then )make setup PYTHON=python3.11 (or python3.12))
endif
endif

# Re-runs only when a requirements file changes, so a second `make setup` is a no-op; TORCH=... always installs the
# torch it names (later runs without it keep that torch). The editable install builds with the venv's setuptools,
# which must read pyproject.toml's SPDX license (its build-system requires). constraints.txt pins the transitive set the tests ran
# with, so the same packages install a year later.
$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml $(if $(TORCH),torch-choice)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools>=77'
ifeq ($(TORCH),)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
else
	grep -v '^torch' requirements.txt > $(VENV)/requirements-without-torch.txt
	$(PY) -m pip install -q $(TORCH) -r $(VENV)/requirements-without-torch.txt -r requirements-dev.txt
endif
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	bash .ci/system-deps
	@touch $@

test: setup
	$(PY) -m pytest -q --durations=15 --ignore=_build

data-scenes: setup
	$(PY) -m data_prep.scenes --root $(SCENES)

# The CPU default and its baselines: the runs the book's chapters load (derprop.book.runs.TRAINING_RUNS at
# size "small", in runs/book/small/). A finished run is not trained again; an interrupted one resumes.
train-cpu: data-scenes
	$(PY) -m derprop.book.runs small

book: setup
	$(VENV)/bin/jupyter-book build . $(BOOK_FLAGS)

demo: train-cpu
	$(MAKE) book
	@echo "Book: _build/html/index.html  Runs: runs/book/small/cpu_{dlp,nodlp,sup}/results.json"

bench: setup
	$(PY) -m benchmarks.dlp
	$(PY) -m benchmarks.derloss
	$(PY) -m benchmarks.region
	$(PY) -m benchmarks.train_step
	$(PY) -m benchmarks.vs_release $(if $(RELEASE),--release $(RELEASE))

# No setup: a GPU box may have torch preinstalled and no package registry (see README).
gpu-check:
	$(CHECK_PY) -m benchmarks.gpu_check

weights:
	$(CHECK_PY) -m data_prep.weights

# One process per visible GPU unless GPUS=N; FORCE=1 trains a finished run again. No setup (see CHECK_PY).
RUN_FLAGS = --size $(SIZE) $(if $(GPUS),--gpus $(GPUS)) $(if $(DEVICE),--device $(DEVICE)) $(if $(FORCE),--force)

reproduce:
	$(CHECK_PY) -m pipelines.run_matrix one --config $(CONFIG) $(RUN_FLAGS) $(if $(ABLATION),--ablation $(ABLATION))

reproduce-all:
	$(CHECK_PY) -m pipelines.run_matrix all $(RUN_FLAGS)

clean:
	rm -rf _build .pytest_cache
