# The two set-up commands of README.md: `make demo` (the main job) and `make test` (every test).
# Both create .venv with the pinned requirements and build the native library in place.
# `make gpu-check` runs on a GPU machine with torch and triton installed (no venv, no network);
# `make gpu-check-dry` runs its code path here, on the CPU, into a scratch folder.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergopt-installed

.PHONY: setup demo test docs experiments aot-full kernel-cost gpu-check gpu-check-dry

$(STAMP): requirements.txt requirements-test.txt requirements-deepspeed.txt setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-build-isolation -r requirements-deepspeed.txt
	MERGOPT_NO_NATIVE=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) setup.py -q build_ext --inplace
	touch $@

setup: $(STAMP)

demo: setup
	$(PY) -m mergopt_kernels demo

# The documentation site (mkdocs.yml, docs/): built into site/, every warning an error (as in CI).
docs: setup
	$(PY) -m pip install -q -r requirements-docs.txt
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The experiment reports in docs/experiments: both protocols at their defaults on one thread
# (on a machine shared with other jobs, two threads slow a small model down many times); about
# 80 s (digits) and 8.5 minutes (lm) of CPU time. Each folder gets report.md, results.json and
# the figures.
experiments: setup
	$(PY) -m mergopt_kernels demo --threads 1 --no-progress --out docs/experiments/digits
	$(PY) -m mergopt_kernels demo --protocol lm --threads 1 --no-progress --out docs/experiments/lm

# DeepSpeed JIT-builds a C++ op against the running torch: one build folder per venv.
test: setup
	TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions $(PY) -m pytest python_tests -q
	$(PY) -m pytest bench -q
	PYTHON=$(PY) bash .ci/native.sh

# Every launch variant of the Triton kernels compiled ahead of time for sm_80 and sm_90, on the
# CPU: 3100 compiles (4626 recorded launches), a few CPU-seconds each, spread over all cores.
# Any stack: make aot-full AOT_PYTHON=/path/to/python
AOT_PYTHON ?= $(PY)
AOT_ENV := env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR)

aot-full:
	$(AOT_ENV) $(AOT_PYTHON) -m tools.triton_aot --set full

# The static cost table of the Triton step in bench/RESULTS.md.
kernel-cost:
	$(AOT_ENV) $(AOT_PYTHON) -m bench.kernel_cost

gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu.sh

gpu-check-dry: setup
	GPU_CHECK_DRY=1 PYTHON=$(PY) bash bench/gpu.sh
