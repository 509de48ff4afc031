"""Build of mergopt_kernels and its optional native library ``mergopt_kernels._C``.

    pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace

The native library holds the CPU fused step (built whenever a C++ compiler is available) and the
CUDA fused step (added when torch was built with CUDA and nvcc is found). MERGOPT_NO_NATIVE=1
skips it; the package then runs on its Triton and torch paths (ops/native.py says so once).
Build with --no-build-isolation so the installed torch is used and none is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"

# -ffp-contract=off / --fmad=false: no FMA contraction, so the AVX2 and baseline CPU paths and the
# CUDA kernel produce the same bits (csrc/include/mergopt/noise.h). -fno-math-errno lets sqrtf
# vectorize. Baseline code stays x86-64 (SSE2); AVX2 code is chosen at run time (fused_step.cpp).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
# GCC only (the compiler of torch's wheels):
# -fopenmp: at::parallel_for is inline (ATen/ParallelOpenMP.h) and runs serially without it; the
# OpenMP runtime (libgomp) is the one torch already loads.
# -fschedule-insns -fsched-pressure: schedule before register allocation, so the independent noise
# blocks of csrc/include/mergopt/simd_*.h interleave (x86 GCC leaves this pass off; no result changes).
GCC_FLAGS = ["-fopenmp", "-fschedule-insns", "-fsched-pressure"]
GCC_LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--fmad=false",
              "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]


def _warn(message: str) -> None:
    print(f"mergopt_kernels setup: {message}", file=sys.stderr)


def _is_gcc(compiler: str) -> bool:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" not in out.lower() and "free software foundation" in out.lower()


def _native_extensions():
    """([Extension], cmdclass) for the native library, or ([], {}) when it is skipped."""
    if os.environ.get("MERGOPT_NO_NATIVE", "0") not in ("", "0"):
        _warn("MERGOPT_NO_NATIVE set: not building the native library")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn("torch is not importable (build with --no-build-isolation): not building the native library")
        return [], {}
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        _warn("no C++ compiler found: not building the native library")
        return [], {}

    gcc = _is_gcc(compiler)
    if not gcc:
        _warn(f"{compiler} is not GCC: building without OpenMP, the CPU op runs on one thread")
    cxx_flags = CXX_FLAGS + (GCC_FLAGS if gcc else [])
    link_flags = GCC_LINK_FLAGS if gcc else []
    sources = [f"{CSRC}/cpu/fused_step.cpp", f"{CSRC}/cpu/noise_ops.cpp"]
    include_dirs = [str(ROOT / CSRC / "include"), str(ROOT / CSRC), str(ROOT / CSRC / "cpu"), str(ROOT / CSRC / "cuda")]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and \
        os.environ.get("MERGOPT_NO_CUDA", "0") in ("", "0")
    if with_cuda:
        sources += [f"{CSRC}/cuda/fused_step_kernel.cu", f"{CSRC}/cuda/fused_step_binding.cpp"]
        ext = cpp_extension.CUDAExtension(
            "mergopt_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS}, extra_link_args=link_flags)
    else:
        if torch.version.cuda is not None:
            _warn("nvcc not found (CUDA_HOME unset): building the CPU op only")
        ext = cpp_extension.CppExtension(
            "mergopt_kernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _native_extensions()

setup(
    name="mergopt_kernels",
    version="0.1.0",
    description="Fused MergOPT optimizer kernels (noise regenerated from Philox, never stored)",
    packages=find_packages(include=["mergopt_kernels", "mergopt_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11,<2.14", "numpy"],
    # "demo": python -m mergopt_kernels demo. "hf": mergopt_kernels.integrations.hf
    # (MergOptCallback for transformers.Trainer), tested with requirements-test.txt's pins.
    extras_require={"demo": ["scikit-learn", "matplotlib", "tqdm"],
                    "hf": ["transformers>=4.46", "accelerate>=1.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["mergopt-kernels = mergopt_kernels.__main__:main"]},
)
