# `make demo` and `make test` set everything up in .venv at the repo root, then run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: a looser pin would pull gigabytes of CUDA wheels.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/switch-serve demo

test: install
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build
