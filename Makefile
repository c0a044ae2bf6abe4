# The two commands: `make book` (build the website) and `make test` (everything CI checks).
# Each creates the virtual environment on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NB_DIR := _build/nbtest
CHAPTERS := $(sort $(wildcard chapters/*.md))
# Any change to the library or shipped data invalidates executed chapters in the book's cache.
LIB_FILES := $(shell find dmlib data -type f \( -name '*.py' -o -name '*.json' -o -name '*.safetensors' \) 2>/dev/null)

.PHONY: install book test lint unit nbtest fast lab clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch  # first, pinned: an open range would pull GBs of CUDA
	$(PY) -m pip install -q -c constraints.txt -e ".[book,test,dev]"
	touch $@

install: $(STAMP)

_build/.lib-stamp: $(LIB_FILES)
	rm -rf _build/.jupyter_cache
	mkdir -p _build && touch $@

## book: execute every chapter at DMLIB_PROFILE=cpu and build the website into _build/html
book: $(STAMP) _build/.lib-stamp
	DMLIB_PROFILE=cpu $(VENV)/bin/jupyter-book build . -W --keep-going --all

## test: lint, unit tests, every chapter at DMLIB_PROFILE=test (nbval), then the cpu book build
test: $(STAMP)
	$(MAKE) lint unit nbtest book

lint: $(STAMP)
	$(VENV)/bin/ruff check dmlib tests benchmarks data

unit: $(STAMP)
	$(VENV)/bin/pytest -n 2 -q tests

nbtest: $(STAMP)
	rm -rf $(NB_DIR) && mkdir -p $(NB_DIR)
	for f in $(CHAPTERS); do $(VENV)/bin/jupytext --quiet --to ipynb -o $(NB_DIR)/$$(basename $${f%.md}).ipynb $$f; done
	cd $(NB_DIR) && DMLIB_PROFILE=test ../../$(VENV)/bin/pytest --nbval-lax -n 2 --dist loadfile -p no:cacheprovider -q .

## fast: the quick loop while writing (no slow training tests, no book build)
fast: $(STAMP)
	$(VENV)/bin/ruff check dmlib tests benchmarks data
	$(VENV)/bin/pytest -n 2 -q -m "not slow" tests
	$(MAKE) nbtest

## lab: JupyterLab, where chapters/*.md open as notebooks
lab: $(STAMP)
	mkdir -p $(VENV)/share/jupyter/lab/settings
	echo '{"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"markdown": "Jupytext Notebook", "myst": "Jupytext Notebook"}}}' \
	  > $(VENV)/share/jupyter/lab/settings/overrides.json
	$(VENV)/bin/jupyter lab chapters

clean:
	rm -rf _build
