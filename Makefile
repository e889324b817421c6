# ScaleCert study. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= quick
FORCE ?= 0
DATASETS ?= cifar10 imagenette
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
EXEC_DIR := figures/executed/$(PROFILE)
# `make figures` runs FIG_JOBS notebooks side by side with FIG_THREADS torch threads each (on this
# 2-core CPU two one-thread notebooks finish sooner than one two-thread notebook at a time), the
# longest first so that the job slots finish together (03 listed before 04: otherwise make starts 04, which
# waits for 03, only after every other notebook, as measured in session 11)
NPROC := $(shell env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)
FIG_JOBS ?= $(if $(filter 1,$(NPROC)),1,2)
FIG_THREADS ?= $(shell n=$$(( $(NPROC) / $(FIG_JOBS) )); echo $$(( n > 0 ? n : 1 )))
LONGEST := 05_certification 02_sin_localization 03_prediction_stability 04_adaptive_attack 07_window_merging
EXECUTED := $(addprefix $(EXEC_DIR)/,$(addsuffix .ipynb,$(filter $(basename $(notdir $(NOTEBOOKS))),$(LONGEST)) \
  $(filter-out $(LONGEST),$(basename $(notdir $(NOTEBOOKS))))))
DATA_STAMPS := data/cifar10-jpeg/.test-uint8.npy data/imagenette-224/.val-uint8.npy
KERNEL := scalecert

.PHONY: help setup data figures test test-fast golden lab audit bench models peers clean distclean
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=quick|paper (figures), FORCE=1 (recompute cached results)"

setup: $(STAMP) ## create .venv, install pinned packages and the package, register the Jupyter kernel

# pip compiles bytecode at install: --no-compile was tried (session 11) and lost, because this machine sets
# PYTHONDONTWRITEBYTECODE=1, so every later import recompiled from source (about 8 s per notebook kernel)
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --user --name $(KERNEL) --display-name "Python (scalecert)" >/dev/null
	touch $@

data: $(DATA_STAMPS) ## extract and decode CIFAR-10 (JPEG) and Imagenette-224 from ../shared/data

data/cifar10-jpeg/.test-uint8.npy: | $(STAMP)
	$(PY) -m scalecert.data --decode cifar10

data/imagenette-224/.val-uint8.npy: | $(STAMP)
	$(PY) -m scalecert.data --decode imagenette

figures: $(STAMP) $(DATA_STAMPS) ## run every notebook with papermill (PROFILE=quick|paper; FIG_JOBS side by side), write figures/
	$(MAKE) --no-print-directory -j$(FIG_JOBS) $(EXECUTED)
	$(MAKE) --no-print-directory figures/REPORT.md

$(EXEC_DIR)/%.ipynb: notebooks/%.ipynb $(STAMP) $(DATA_STAMPS) $(wildcard scalecert/*.py scalecert/baselines/*.py)
	@mkdir -p $(dir $@)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(FIG_THREADS)} \
	  $(PY) -m papermill --log-level WARNING -k python3 $< $@.tmp -p profile $(PROFILE) -p force $(FORCE)
	mv $@.tmp $@

# notebooks that share cached results never run side by side: 03 and 04 reuse the universal patch
# that 02 trains; 06 and 08 certify some of the same configurations (and 05 too in the paper profile); 11 reads
# 05's r = 3 rows
$(EXEC_DIR)/03_prediction_stability.ipynb: | $(EXEC_DIR)/02_sin_localization.ipynb
$(EXEC_DIR)/04_adaptive_attack.ipynb: | $(EXEC_DIR)/03_prediction_stability.ipynb
ifeq ($(PROFILE),paper)  # in the quick profile 06 (2 per class) and 05 (5 per class) share no configuration
$(EXEC_DIR)/06_topk_rate.ipynb: | $(EXEC_DIR)/05_certification.ipynb
endif
$(EXEC_DIR)/08_layer_selection.ipynb: | $(EXEC_DIR)/06_topk_rate.ipynb
$(EXEC_DIR)/11_window_family.ipynb: | $(EXEC_DIR)/05_certification.ipynb

figures/REPORT.md: $(EXECUTED)
	$(PY) -m scalecert.report --profile $(PROFILE) > $@.tmp && mv $@.tmp $@

test: $(STAMP) $(DATA_STAMPS) ## pytest on the package + nbval on the notebooks (tiny profile)
	$(PY) -m pytest -q -p no:cacheprovider tests
	rm -rf build/test-cache build/test-figures  # nbval must recompute, not read results cached by a previous run
	SCALECERT_FIG_DIR=$(CURDIR)/build/test-figures SCALECERT_CACHE_DIR=$(CURDIR)/build/test-cache $(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg tests/notebooks

test-fast: $(STAMP) ## pytest only (no notebooks)
	$(PY) -m pytest -q tests

golden: $(STAMP) $(DATA_STAMPS) ## regenerate the nbval reference notebooks (tiny profile) after a deliberate change
	@mkdir -p tests/notebooks
	rm -rf build/test-cache build/test-figures
	for nb in $(NOTEBOOKS); do \
	  SCALECERT_FIG_DIR=$(CURDIR)/build/test-figures SCALECERT_CACHE_DIR=$(CURDIR)/build/test-cache $(PY) -m papermill --log-level WARNING -k python3 $$nb tests/notebooks/$$(basename $$nb) -p profile tiny || exit 1; \
	done

lab: $(STAMP) $(DATA_STAMPS) ## open JupyterLab on notebooks/
	$(VENV)/bin/jupyter lab notebooks/

audit: $(STAMP) $(DATA_STAMPS) ## soundness audit of both modes (quick)
	$(PY) -m scalecert audit --quick

bench: $(STAMP) $(DATA_STAMPS) ## certify throughput vs plain forwards and Minority Reports (quick)
	$(PY) -m scalecert bench --quick

models: $(STAMP) $(DATA_STAMPS) ## train every shipped ScaleCert model (hours on a CPU; resumable; never in CI)
	bash tools/train_all.sh all

peers: $(STAMP) $(DATA_STAMPS) ## train the peer defences' models (BagNet, DS, IBP; hours; resumable; never in CI)
	bash tools/train_peers.sh all

clean: ## remove executed notebooks and caches (keeps .venv, data and committed results)
	rm -rf figures/executed .pytest_cache build
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean ## also remove .venv and the extracted data
	rm -rf $(VENV) data/cifar10-jpeg data/imagenette-224 data/cifar-10-batches-py
