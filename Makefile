VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: venv install dev demo test lint clean

$(VENV)/bin/activate:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(VENV)/bin/activate

install: venv
	$(PIP) install -q -e .

dev: venv
	$(PIP) install -q -e '.[test]'

# Crawl the local test web on the embedded backend: nothing to install or start but this venv.
demo: install
	$(VENV)/bin/crawlfleet demo

PACKAGES := common scheduler workers cli testweb

lint: dev
	$(VENV)/bin/ruff check .
	@mkdir -p .typecheck/crawlfleet
	@for p in $(PACKAGES); do ln -sfn ../../$$p .typecheck/crawlfleet/$$p; done
	$(VENV)/bin/mypy -p crawlfleet

test: lint
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .typecheck build *.egg-info .pytest_cache .mypy_cache .ruff_cache
