# Two entry points, both of which set up .venv/ from nothing first:
#   make search   - run the embedded default search (digits) with python -m sctune.search
#   make test     - run the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv search test smoke lint clean

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

search: $(STAMP)
	$(VENV)/bin/python -m sctune.search $(ARGS)

smoke: $(STAMP)
	$(VENV)/bin/python -m sctune.search --smoke $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check sctune tests benchmarks

clean:
	rm -rf $(VENV) sctune_results .pytest_cache
