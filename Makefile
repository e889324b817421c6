# ScaleCert study. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= quick
FORCE ?= 0
DATASETS ?= cifar10 imagenette
#: paper-background: one job per name (a data set named twice gets two jobs, e.g. PAPER_JOBS="cifar10 cifar10")
PAPER_JOBS ?= $(DATASETS)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
EXEC_DIR := figures/executed/$(PROFILE)
# `make figures` runs FIG_JOBS notebooks side by side with FIG_THREADS torch threads each (on this
# 2-core CPU two one-thread notebooks finish sooner than one two-thread notebook at a time), in the order of
# ORDER: the longest first so that the job slots finish together (quick-profile seconds measured on 2026-12-02:
# 05 610, 02 193, 04 201, 07 147, 11 113, 10 103, 06 91, 09 76, 08 35, 01 20, 00 16), except that 03 (16) comes
# right after 02, whose universal patch it reuses; notebooks not named here run last
NPROC := $(shell env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)
FIG_JOBS ?= $(if $(filter 1,$(NPROC)),1,2)
FIG_THREADS ?= $(shell n=$$(( $(NPROC) / $(FIG_JOBS) )); echo $$(( n > 0 ? n : 1 )))
ORDER := 05_certification 02_sin_localization 03_prediction_stability 04_adaptive_attack 07_window_merging 12_does_sin_help \
  11_window_family 10_soundness_audit 06_topk_rate 09_empirical_recovery 08_layer_selection 01_models 00_data
EXECUTED := $(addprefix $(EXEC_DIR)/,$(addsuffix .ipynb,$(filter $(basename $(notdir $(NOTEBOOKS))),$(ORDER)) \
  $(filter-out $(ORDER),$(basename $(notdir $(NOTEBOOKS))))))
DATA_STAMPS := data/cifar10-jpeg/.test-uint8.npy data/imagenette-224/.val-uint8.npy
KERNEL := scalecert
# make test: pytest and nbval each spread over one worker per core (pytest-xdist; a notebook's cells stay on one
# worker), one torch thread per worker
TEST_JOBS ?= $(NPROC)

.PHONY: help setup data figures check-clean test test-fast test-browser golden lab audit bench readme models peers paper-background clean distclean
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=quick|paper (figures), FORCE=1 (recompute cached results)"

setup: $(STAMP) ## create .venv, install pinned packages and the package, register the Jupyter kernel

# uv (from PyPI) installs the pinned packages with parallel downloads and unpacking: 2 min 2 s for
# requirements.txt into an empty venv on 2026-12-07 (2-core machine, loaded), where pip's setup took several
# minutes; pip does it when uv cannot (no PyPI here: pip's own configuration may name local sources). Bytecode is
# compiled at install: this machine sets PYTHONDONTWRITEBYTECODE=1, so without it every later import recompiles from
# source (about 8 s per notebook kernel). uv's cache lives in the venv (same file system: hard links, no second
# copy) and is removed after.
UV_VERSION := 0.13.9
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	export UV_CACHE_DIR=$(CURDIR)/$(VENV)/.uv-cache; \
	if $(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION) && \
	  $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode -r requirements.txt && \
	  $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode --no-deps --no-build-isolation -e .; then \
	  rm -rf $$UV_CACHE_DIR; \
	else \
	  rm -rf $$UV_CACHE_DIR; echo "uv could not install the packages: pip installs them" >&2; \
	  $(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt && \
	  $(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .; \
	fi
	$(PY) -m ipykernel install --user --name $(KERNEL) --display-name "Python (scalecert)" >/dev/null
	touch $@

# the two data sets decode side by side, one process each (a recursive make: the other targets keep running their
# prerequisites one after another)
data: $(STAMP) ## extract and decode CIFAR-10 (JPEG) and Imagenette-224 from ../shared/data (side by side)
	@$(MAKE) -s --no-print-directory -j$(NPROC) $(DATA_STAMPS)

data/cifar10-jpeg/.test-uint8.npy: | $(STAMP)
	$(PY) -m scalecert.data --decode cifar10

data/imagenette-224/.val-uint8.npy: | $(STAMP)
	$(PY) -m scalecert.data --decode imagenette

figures: $(STAMP) data ## run every notebook with papermill (PROFILE=quick|paper; FIG_JOBS side by side), write figures/
	$(MAKE) --no-print-directory -j$(FIG_JOBS) $(EXECUTED)
	$(MAKE) --no-print-directory figures/REPORT.md

$(EXEC_DIR)/%.ipynb: notebooks/%.ipynb $(STAMP) $(DATA_STAMPS) $(wildcard scalecert/*.py scalecert/baselines/*.py)
	@mkdir -p $(dir $@)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(FIG_THREADS)} \
	  $(PY) -m papermill --engine scalecert --log-level WARNING -k python3 $< $(basename $@).tmp.ipynb \
	  -p profile $(PROFILE) -p force $(FORCE)
	mv $(basename $@).tmp.ipynb $@

# Notebooks that share cached results (03 and 04 reuse the universal patch that 02 trains; 06 and 08 certify some
# of the same configurations, and 05 too in the paper profile; 11 reads 05's r = 3 rows) may run side by side:
# the cache computes each chunk and each patch under a lock, once, and the other notebook reads it. There are no
# make prerequisites between them because GNU make -j left a notebook whose prerequisite had just finished
# until after every other notebook (seen on 2026-12-02: 03 started 6 minutes after 02 was done).

# after `make figures` on a fresh clone: what is committed is what the committed code and cache produce
check-clean: ## fail if the working tree differs from the last commit (run it after make figures)
	@changes=$$(git status --porcelain --untracked-files=all); \
	if [ -n "$$changes" ]; then echo "$$changes"; echo "the tree differs from the commit: regenerate and commit these, or fix what wrote them" >&2; exit 1; fi; \
	echo "clean: the committed figures, tables and cache are what the code produces"

figures/REPORT.md: $(EXECUTED)
	$(PY) -m scalecert.report --profile $(PROFILE) > $@.tmp && mv $@.tmp $@

test: $(STAMP) data ## pytest on the package + nbval on the notebooks (tiny profile)
	$(VENV)/bin/ruff check scalecert tests tools
	$(VENV)/bin/ruff format --check scalecert tests tools
	SCALECERT_TEST_THREADS=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile --durations=10 tests
	rm -rf build/test-cache build/test-figures  # nbval must recompute, not read results cached by a previous run
	OMP_NUM_THREADS=1 SCALECERT_FIG_DIR=$(CURDIR)/build/test-figures SCALECERT_CACHE_DIR=$(CURDIR)/build/test-cache \
	  $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder --durations=15 --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg tests/notebooks

test-fast: $(STAMP) ## pytest only (no notebooks)
	$(PY) -m pytest -q tests

# installs Debian's Chromium and Playwright (requirements-browser.txt) when missing, then drives JupyterLab on
# 127.0.0.1 in headless Chromium: 05 (tiny) and 13 run there and show their output; screenshots in build/browser/.
# The notebooks read nbval's cache (filled by `make test` just before, in CI) and compute what is not there
test-browser: $(STAMP) data ## notebooks in JupyterLab in a real (headless) browser: 05 and the explorer 13
	$(PY) tests/browser/run_browser.py --cache $(CURDIR)/build/test-cache

golden: $(STAMP) data ## regenerate the nbval reference notebooks (tiny profile) after a deliberate change (GOLDEN="05_certification 12_does_sin_help": those only)
	@mkdir -p tests/notebooks
	rm -rf build/test-cache build/test-figures
	for nb in $(if $(GOLDEN),$(addprefix notebooks/,$(addsuffix .ipynb,$(GOLDEN))),$(NOTEBOOKS)); do \
	  SCALECERT_FIG_DIR=$(CURDIR)/build/test-figures SCALECERT_CACHE_DIR=$(CURDIR)/build/test-cache OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
	    $(PY) -m papermill --engine scalecert --log-level WARNING -k python3 $$nb tests/notebooks/$$(basename $$nb) -p profile tiny || exit 1; \
	done

lab: $(STAMP) data ## open JupyterLab on notebooks/
	$(VENV)/bin/jupyter lab notebooks/

audit: $(STAMP) data ## soundness audit of both modes (quick)
	$(PY) -m scalecert audit --quick

bench: $(STAMP) data ## certify throughput vs plain forwards and Minority Reports (quick)
	$(PY) -m scalecert bench --quick

readme: $(STAMP) ## regenerate the README's claims table and the models table of docs/models.md
	$(PY) -m scalecert.claims --readme
	bash tools/readme_models.sh

models: $(STAMP) data ## train every shipped ScaleCert model (hours on a CPU; resumable; never in CI)
	bash tools/train_all.sh all

peers: $(STAMP) data ## train the peer defences' models (BagNet, DS, IBP; hours; resumable; never in CI)
	bash tools/train_peers.sh all

paper-background: $(STAMP) data ## start the paper profile in the background, one job per data set in PAPER_JOBS (days on a CPU; resumable; never in CI)
	@mkdir -p data/runs/logs
	@# a data set named twice gets a second job: jobs on one data set share each run's chunks (scalecert/results.py)
	@seen=""; for d in $(PAPER_JOBS); do \
	  seen="$$seen $$d"; want=$$(echo $$seen | tr ' ' '\n' | grep -cx $$d); \
	  have=$$(pgrep -fc -- "-p profile paper -p datasets $$d" || true); \
	  if [ "$$have" -ge "$$want" ]; then echo "job $$want of the $$d paper profile runs already"; continue; fi; \
	  job=$$d; [ "$$want" -gt 1 ] && job=$$d-$$want; \
	  DATASET=$$d JOB=$$job nohup bash tools/paper_profile.sh >> data/runs/logs/paper_$$job.log 2>&1 & \
	  echo "started the $$d paper profile ($$job): tail -f data/runs/logs/paper_$$job.log; progress: $(PY) -m scalecert cache --plan"; \
	done

clean: ## remove executed notebooks and caches (keeps .venv, data and committed results)
	rm -rf figures/executed .pytest_cache build
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean ## also remove .venv and the extracted data
	rm -rf $(VENV) data/cifar10-jpeg data/imagenette-224 data/cifar-10-batches-py
