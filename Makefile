# `make demo` and `make test` set everything up in .venv at the repo root, then run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-all test-fast gpu-wheels gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: a looser pin would pull the newest, and on PyPI's Linux that is gigabytes of CUDA wheels.
	# Where the registry's torch==2.13.0 is itself the CUDA build, put the CPU build in .venv first (README): kept.
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

# Every test but the slow ones (a minute or more each): 10-15 minutes on 2 cores.
test: lint
	$(VENV)/bin/python -m pytest -q -m "not slow"

# Every test, the slow ones too (scale-out on a multi-raylet cluster, the switch-c-2048 look-alike, the bench).
test-all: lint
	$(VENV)/bin/python -m pytest -q

# The tests that start no Ray cluster: a minute or two, not fifteen.
test-fast: lint
	$(VENV)/bin/python -m pytest -q -m "not ray"

# On a machine with an NVIDIA GPU: the front and the experts on CUDA against transformers on the same GPU, in
# float32 and bfloat16, then the benchmark with transformers, the front and the expert actors on the GPU; the
# results are appended to docs/BENCHMARKS.md under the GPU's name (cluster/gpu_check.py). GPU_PYTHON is the
# interpreter to use (a GPU machine's own python3, whose torch has CUDA; the parts that need Ray say so and are
# skipped where it is not installed). It stops with a message where there is no CUDA.
GPU_PYTHON ?= $(VENV)/bin/python
# For a GPU machine without network whose Python has PyTorch but not Ray: `make gpu-wheels` here puts the wheels it
# lacks in GPU_WHEELS (GPU_HAVE: what that Python holds, its `pip list --format=freeze`: left out where it will do),
# and gpu-check there installs them for a GPU_PYTHON of that machine's into GPU_WHEELS/site, first on its path
# (cluster/gpu_wheels.py).
GPU_WHEELS ?= .gpu-wheels
GPU_SITE := $(if $(filter-out $(VENV)/bin/python,$(GPU_PYTHON)),$(if $(wildcard $(GPU_WHEELS)/*.whl),$(abspath $(GPU_WHEELS))/site))

gpu-wheels: install
	$(VENV)/bin/python -m cluster.gpu_wheels $(GPU_WHEELS) $(if $(GPU_HAVE),--have $(GPU_HAVE))

gpu-check: $(if $(filter $(VENV)/bin/python,$(GPU_PYTHON)),install)
	$(if $(GPU_SITE),rm -rf $(GPU_SITE) && $(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --target $(GPU_SITE) $(GPU_WHEELS)/*.whl)
	PYTHONPATH=$(CURDIR)$(if $(GPU_SITE),:$(GPU_SITE)) $(GPU_PYTHON) -m cluster.gpu_check

clean:
	rm -rf $(VENV) build $(GPU_WHEELS)
