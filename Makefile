# Two commands for a fresh machine: `make app` and `make test` (both create .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: app test install browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium for the browser test (Playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
		else echo "install Debian's chromium (sudo apt-get install chromium) for the browser test"; fi; }

app: $(STAMP)
	$(BIN)/personalize app $(ARGS)

# Lint and format check first (seconds), then the tests: TEST_WORKERS processes (pytest-xdist), one torch
# thread each, a test file's tests in one process (its module fixtures, e.g. the browser test's app, start once).
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/ruff check --quiet .
	$(BIN)/ruff format --check --quiet .
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
