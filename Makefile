# `make demo` and `make test` each set up .venv (once) and run. See README.md.
# Installs are pinned to constraints.txt: the exact versions the test suite last passed with.
# `make test-latest` tries the newest releases allowed by setup.cfg instead, in .venv-latest.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MIN_FREE_MB := 3000

.PHONY: demo test test-fast test-latest lock clean check-python browser

check-python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 13) else 1)' 2>/dev/null || \
		{ echo "error: dualenc needs Python 3.10-3.13 as '$(PYTHON)' (found: $$($(PYTHON) --version 2>&1)); run: make PYTHON=/path/to/python3.12 ..."; exit 2; }

# Installing TensorFlow needs the space; an existing .venv does not.
$(STAMP): setup.cfg pyproject.toml constraints.txt | check-python
	@free=$$(df -Pm . | awk 'NR==2 {print $$4}'); [ "$$free" -ge $(MIN_FREE_MB) ] || \
		{ echo "error: only $${free} MB free in $$(pwd); installing dualenc needs about $(MIN_FREE_MB) MB (TensorFlow); free some disk space"; exit 2; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)

demo: check-python $(STAMP)
	$(BIN)/python train.py
	$(BIN)/python search.py "a woman in a red coat" --grid runs/latest/search.png \
		--gallery "$${DUALENC_CACHE:-$$HOME/.cache/dualenc}/demo-attributes/imgs"

# The search page's browser test drives Debian's chromium through its chromedriver; CI runs as
# root on Debian and installs them here. Without apt-get (or root) the test skips, saying why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium chromium-driver; then :; \
	else echo "warning: chromium and chromedriver are not installed and apt-get could not install them; the browser test will be skipped"; fi

# Two workers, each module on one worker so its fixtures are built once, slow modules first (see
# tests/conftest.py). PYTEST_WORKERS=0 runs in this process instead, e.g. to debug with --pdb.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The whole suite, slow tests included (training runs, the quick benchmark).
test: check-python $(STAMP) browser
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

# For development: leaves out the tests marked slow (over ~20 s each; see setup.cfg).
test-fast: check-python $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

# Unpinned: what a fresh `pip install` would get today. Run `make lock` after it passes.
test-latest: check-python
	@test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet --upgrade -e '.[test]'
	.venv-latest/bin/python -m pytest -q

# Re-pin constraints.txt to what .venv-latest holds.
lock:
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -v '^dualenc' > constraints.txt

clean:
	rm -rf $(VENV) .venv-latest runs .pytest_cache

# The README's pictures (docs/demo-search.png, docs/search-page.png) redrawn from the demo run in
# runs/latest; run `make demo` first. The page screenshot drives chromium (see `browser`).
.PHONY: pictures
pictures: check-python $(STAMP) browser
	$(BIN)/python docs/pictures.py runs/latest
