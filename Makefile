# The two commands: `make book` (build the website) and `make test` (everything CI checks).
# Each creates the virtual environment on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NB_DIR := _build/nbtest
CHAPTERS := $(sort $(wildcard chapters/*.md))
# The browser tests drive the system's chromium with Playwright: it never downloads a browser.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1
# Any change to the library or shipped data invalidates executed chapters in the book's cache.
LIB_FILES := $(shell find dmlib data -type f \( -name '*.py' -o -name '*.json' -o -name '*.safetensors' \) 2>/dev/null)

.PHONY: sysdeps sysdeps-book install vendor notebooks student book browser test lint unit nbtest fast lab clean

# System packages, checked before anything long starts: npm (`make book` vendors the website's
# JavaScript with it), chromium (the browser tests) and iproute2's `ip` (tests/browser/offline.sh
# cuts the network with it). What is missing is installed with apt-get when we are root on a
# Debian/Ubuntu machine; otherwise make stops at once and prints the command to run. Only what is
# missing is installed: `apt-get install npm chromium` fails on a conflict where npm is present.
# `test` and `browser` need all three, `book` only npm; both need python3-venv until .venv exists.
define need_packages
	@missing=(); \
	for want in $(1); do \
	  cmds=$${want%%:*}; found=; \
	  for c in $${cmds//,/ }; do command -v "$$c" >/dev/null && found=1; done; \
	  [[ -n $$found ]] || missing+=("$${want##*:}"); \
	done; \
	[[ -x $(PY) ]] || python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv); \
	if (( $${#missing[@]} )); then \
	  cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $${missing[*]}"; \
	  if [[ $$(id -u) == 0 ]] && command -v apt-get >/dev/null; then \
	    echo "sysdeps: installing $${missing[*]}" >&2; \
	    bash -c "$$cmd" || { echo "sysdeps: that failed; as root, run: $$cmd" >&2; exit 1; }; \
	  else \
	    echo "sysdeps: missing system packages: $${missing[*]}. Install them, then run make again:" >&2; \
	    echo "    sudo bash -c '$$cmd'" >&2; \
	    echo "sysdeps: (not Debian/Ubuntu: install Node.js with npm, Chromium and iproute2 your system's way)" >&2; \
	    exit 1; \
	  fi; \
	fi
endef
# Each need is "commands,that,satisfy,it:Debian package". CHROMIUM=/path/to/chrome names another
# Chromium (tests/browser reads the same variable).
SYSDEPS_ALL := npm:npm chromium,chromium-browser,$(CHROMIUM):chromium ip:iproute2
SYSDEPS_BOOK := npm:npm

sysdeps:
	$(call need_packages,$(SYSDEPS_ALL))

sysdeps-book:
	$(call need_packages,$(SYSDEPS_BOOK))

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch  # first, pinned: an open range would pull GBs of CUDA
	$(PY) -m pip install -q -c constraints.txt -e ".[book,test,dev]"
	touch $@

install: $(STAMP)

# The JavaScript the pages load (MathJax, require.js, the ipywidgets manager), pinned in
# book/vendor/package-lock.json. Only the files the pages need are copied to _build/vendor/vendor/;
# _config.yml's html_extra_path puts them at _build/html/vendor/ (not _static/, which every page loads).
VENDOR := book/vendor
VENDOR_OUT := _build/vendor/vendor
$(VENDOR)/node_modules/.package-lock.json: $(VENDOR)/package.json $(VENDOR)/package-lock.json
	@command -v npm >/dev/null || { echo "npm is required to vendor the website's JavaScript: run make sysdeps-book" >&2; exit 1; }
	cd $(VENDOR) && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

# MathJax: the combined bundle, its CHTML fonts, and what it loads on demand (TeX extensions via
# autoload, the menu's lazy/safe modules, accessibility and speech from the menu). The widget
# manager's embed-amd.js finds its Font Awesome fonts next to itself; browsers use only woff2/woff.
$(VENDOR_OUT)/.stamp: $(VENDOR)/node_modules/.package-lock.json $(VENDOR)/widgets-config.js Makefile
	rm -rf $(VENDOR_OUT) && mkdir -p $(VENDOR_OUT)/mathjax $(VENDOR_OUT)/html-manager
	cd $(VENDOR)/node_modules/mathjax && cp LICENSE es5/tex-mml-chtml.js $(CURDIR)/$(VENDOR_OUT)/mathjax/ && \
	  cd es5 && cp -r --parents output/chtml/fonts/woff-v2 input/tex/extensions ui a11y sre $(CURDIR)/$(VENDOR_OUT)/mathjax/
	cp $(VENDOR)/node_modules/requirejs/require.js $(VENDOR)/widgets-config.js $(VENDOR_OUT)/
	cd $(VENDOR)/node_modules/@jupyter-widgets/html-manager/dist && \
	  cp embed-amd.js embed.js.LICENSE.txt *.woff2 *.woff $(CURDIR)/$(VENDOR_OUT)/html-manager/
	touch $@

vendor: $(VENDOR_OUT)/.stamp

_build/.lib-stamp: $(LIB_FILES)
	rm -rf _build/.jupyter_cache _build/ledger
	mkdir -p _build && touch $@

## notebooks / student: every chapter as .ipynb, with solutions (_build/notebooks) or without (_build/student)
notebooks: $(STAMP)
	$(PY) -m dmlib.course notebooks _build/notebooks

student: $(STAMP)
	$(PY) -m dmlib.course notebooks _build/student --student

## book: execute every chapter at DMLIB_PROFILE=cpu and build the website into _build/html
book: sysdeps-book $(STAMP) _build/.lib-stamp $(VENDOR_OUT)/.stamp notebooks
	DMLIB_PROFILE=cpu $(VENV)/bin/jupyter-book build . -W --keep-going --all

## browser: open every built page in headless chromium, and run Chapter 1 in JupyterLab, offline;
## screenshots in _build/screenshots/
browser: sysdeps book
	tests/browser/offline.sh $(VENV)/bin/pytest -q -p no:cacheprovider tests/browser

## test: lint, unit tests, every chapter at DMLIB_PROFILE=test (nbval), the cpu book build, the browser check
test: sysdeps $(STAMP)
	$(MAKE) lint unit nbtest book browser

lint: $(STAMP)
	$(VENV)/bin/ruff check dmlib tests benchmarks data book/_ext

unit: $(STAMP)
	$(VENV)/bin/pytest -n 2 -q tests --ignore=tests/browser

nbtest: $(STAMP)
	rm -rf $(NB_DIR) && mkdir -p $(NB_DIR)
	for f in $(CHAPTERS); do $(VENV)/bin/jupytext --quiet --to ipynb -o $(NB_DIR)/$$(basename $${f%.md}).ipynb $$f; done
	cd $(NB_DIR) && DMLIB_PROFILE=test ../../$(VENV)/bin/pytest --nbval-lax -n 2 --dist loadfile -p no:cacheprovider -q .

## fast: the quick loop while writing (no slow training tests, no book build)
fast: $(STAMP)
	$(VENV)/bin/ruff check dmlib tests benchmarks data book/_ext
	$(VENV)/bin/pytest -n 2 -q -m "not slow" tests --ignore=tests/browser
	$(MAKE) nbtest

## lab: JupyterLab, where chapters/*.md open as notebooks (Jupytext is the default viewer of .md
## through binder/overrides.json, which Binder and tests/browser/test_lab.py use too)
lab: $(STAMP)
	mkdir -p $(VENV)/share/jupyter/lab/settings
	cp binder/overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	$(VENV)/bin/jupyter lab chapters

clean:
	rm -rf _build
