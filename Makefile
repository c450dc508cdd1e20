# `make demo` and `make test` set everything up in .venv at the repo root, then run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: a looser pin would pull gigabytes of CUDA wheels.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/switch-serve demo

# ruff, and the layers contract in pyproject.toml: cluster imports router_service and experts, router_service
# imports experts, experts imports neither.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/python -m pytest -q

# The tests that start no Ray cluster: seconds, not minutes.
test-fast: lint
	$(VENV)/bin/python -m pytest -q -m "not ray"

clean:
	rm -rf $(VENV) build
