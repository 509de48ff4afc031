# The two set-up commands of README.md: `make demo` (the main job) and `make test` (every test).
# Both create .venv with the pinned requirements and build the native library in place.
# `make gpu-check` runs on a GPU machine with torch and triton installed (no venv, no network);
# `make gpu-check-dry` runs its code path here, on the CPU, into a scratch folder.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergopt-installed

.PHONY: setup demo test gpu-check gpu-check-dry

$(STAMP): requirements.txt requirements-test.txt setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	MERGOPT_NO_NATIVE=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) setup.py -q build_ext --inplace
	touch $@

setup: $(STAMP)

demo: setup
	$(PY) -m mergopt_kernels demo

test: setup
	$(PY) -m pytest python_tests -q
	$(PY) -m pytest bench -q
	PYTHON=$(PY) bash .ci/native.sh

gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu.sh

gpu-check-dry: setup
	GPU_CHECK_DRY=1 PYTHON=$(PY) bash bench/gpu.sh
