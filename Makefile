# `make demo` and `make test` set everything up in .venv at the repo root, then run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-all test-fast gpu-check clean

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

# Every test but the slow ones (a minute or more each): about 15 minutes on 2 cores.
test: lint
	$(VENV)/bin/python -m pytest -q -m "not slow"

# Every test, the slow ones too (scale-out on a multi-raylet cluster, the switch-c-2048 look-alike, the bench).
test-all: lint
	$(VENV)/bin/python -m pytest -q

# The tests that start no Ray cluster: seconds, not minutes.
test-fast: lint
	$(VENV)/bin/python -m pytest -q -m "not ray"

# On a machine with an NVIDIA GPU: the front and the experts on CUDA against transformers on the same GPU, in
# float32 and bfloat16. GPU_PYTHON is the interpreter to use (a GPU machine's own python3, whose torch has CUDA;
# the tests that need Ray are skipped, and say so, where it is not installed).
GPU_PYTHON ?= $(VENV)/bin/python

gpu-check:
	@$(GPU_PYTHON) -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else \
		f'gpu-check: no CUDA device here (torch {torch.__version__} sees none); run it where there is an NVIDIA GPU')"
	$(GPU_PYTHON) -m pytest -q -p no:cacheprovider -rs tests/router_service/test_cuda.py

clean:
	rm -rf $(VENV) build
