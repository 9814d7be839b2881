# Two entry points, both of which set up .venv/ from nothing first:
#   make search   - run the embedded default search (digits) with python -m sctune.search
#   make test     - run the test suite (make test-quick: the fast part, ~1.5 min)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv search test test-quick test-portability smoke lint clean

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

# Everything but the tests that start a real Ray or run a whole experiment: ~1.5 min on 2 cores.
test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not ray and not slow" $(ARGS)

# The README-output tests again at another seed and torch thread count: what they compare must not depend
# on the machine's floats (CI runs it after make test).
test-portability: $(STAMP)
	SCTUNE_README_SEED=1 SCTUNE_README_THREADS=1 $(VENV)/bin/python -m pytest -q tests/test_readme.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check sctune tests benchmarks

clean:
	rm -rf $(VENV) sctune_results .pytest_cache
