"""Build of mergopt_kernels and its optional native library ``mergopt_kernels._C``.

    pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace

The native library holds the CPU fused step (built whenever a C++ compiler is available) and the
CUDA fused step (added when torch was built with CUDA and a CUDA toolkit is found: CUDA_HOME, else
the toolkit of the nvcc on PATH, wrapper scripts included, else /usr/local/cuda). The CUDA op is
compiled for TORCH_CUDA_ARCH_LIST, else for sm_80/86/89/90 plus compute_90 PTX. MERGOPT_NO_CUDA=1
builds the CPU op only; MERGOPT_NO_NATIVE=1 skips the library, and the package then runs on its
Triton and torch paths (ops/native.py says so once). Build with --no-build-isolation so the
installed torch is used and none is downloaded.
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
NVCC_FLAGS = ["-O3", "--fmad=false"]
# GPU architectures when TORCH_CUDA_ARCH_LIST is unset (it is torch's variable: "8.0;9.0+PTX",
# named arches such as "Ampere", torch turns it into -gencode flags). A100, A10/RTX 30, L4/RTX 40,
# H100/H200 get machine code; later GPUs JIT-compile the compute_90 PTX.
DEFAULT_CUDA_ARCHS = ("80", "86", "89", "90")
PTX_ARCH = "90"


def _warn(message: str) -> None:
    print(f"mergopt_kernels setup: {message}", file=sys.stderr)


def _is_gcc(compiler: str) -> bool:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" not in out.lower() and "free software foundation" in out.lower()


def _toolkit_root(nvcc: str) -> str | None:
    """The CUDA toolkit that ``nvcc`` belongs to, from nvcc's own report (``TOP=`` of
    ``--dryrun``), so that a wrapper script on PATH leads to the real toolkit; else the folder
    above the resolved binary. None when neither holds include/cuda_runtime.h."""
    candidates = []
    try:
        report = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60)
        candidates += [line.split("TOP=", 1)[1].strip() for line in (report.stdout + report.stderr).splitlines()
                       if line.startswith("#$ TOP=")]
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append(str(Path(nvcc).resolve().parent.parent))
    for root in candidates:
        if (Path(root) / "include" / "cuda_runtime.h").is_file():
            return str(Path(root).resolve())
    return None


def _cuda_toolkit(torch) -> str | None:
    """The CUDA toolkit root to build the CUDA op with, or None (CPU op only, said why).

    CUDA_HOME (or CUDA_PATH) wins; else the toolkit of the ``nvcc`` on PATH, else /usr/local/cuda.
    Stops the build when a toolkit is named or nvcc is found but its headers are not."""
    if os.environ.get("MERGOPT_NO_CUDA", "0") not in ("", "0"):
        _warn("MERGOPT_NO_CUDA set: building the CPU op only")
        return None
    if torch.version.cuda is None:
        _warn(f"torch {torch.__version__} is built without CUDA: building the CPU op only")
        return None
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home:
            if not (Path(home) / "include" / "cuda_runtime.h").is_file() or not (Path(home) / "bin" / "nvcc").exists():
                raise SystemExit(f"mergopt_kernels setup: {variable}={home} is not a CUDA toolkit (expected "
                                 f"bin/nvcc and include/cuda_runtime.h under it); point {variable} at the toolkit, "
                                 "or set MERGOPT_NO_CUDA=1 to build the CPU op only")
            _warn(f"building the CUDA op with the toolkit in {home} ({variable})")
            return home
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        _warn(f"torch {torch.__version__} has CUDA {torch.version.cuda} but nvcc is not on PATH and CUDA_HOME is "
              "unset: building the CPU op only (set CUDA_HOME to the CUDA toolkit to build the CUDA op)")
        return None
    home = _toolkit_root(nvcc)
    if home is None:
        raise SystemExit(f"mergopt_kernels setup: found {nvcc} but not the CUDA toolkit it belongs to (no "
                         "include/cuda_runtime.h next to it, nor under the TOP= that `nvcc --dryrun` reports); "
                         "set CUDA_HOME to the toolkit root, or MERGOPT_NO_CUDA=1 to build the CPU op only")
    _warn(f"building the CUDA op with the toolkit in {home} (from {nvcc})")
    return home


def _cuda_arch_flags() -> list[str]:
    """nvcc -gencode flags: none when TORCH_CUDA_ARCH_LIST is set (torch derives them from it),
    else machine code for DEFAULT_CUDA_ARCHS plus PTX_ARCH's PTX."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        _warn(f"CUDA architectures from TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        return []
    _warn(f"CUDA architectures sm_{', sm_'.join(DEFAULT_CUDA_ARCHS)} + compute_{PTX_ARCH} PTX "
          "(set TORCH_CUDA_ARCH_LIST to choose others)")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in DEFAULT_CUDA_ARCHS] + \
        [f"-gencode=arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}"]


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
    cuda_home = _cuda_toolkit(torch)
    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home  # torch's own guess takes nvcc's folder, wrong for a wrapper
        os.environ["CUDA_HOME"] = cuda_home
        arch_flags = _cuda_arch_flags()
        sources += [f"{CSRC}/cuda/fused_step_kernel.cu", f"{CSRC}/cuda/fused_step_binding.cpp"]
        ext = cpp_extension.CUDAExtension(
            "mergopt_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS + arch_flags}, extra_link_args=link_flags)
    else:
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
    install_requires=["torch>=2.11,<2.15", "numpy", "safetensors>=0.8", "pydantic>=2.10,<3", "pyyaml>=6"],
    # "demo": python -m mergopt_kernels demo. "hf": mergopt_kernels.integrations.hf
    # (MergOptCallback for transformers.Trainer), tested with requirements-test.txt's pins.
    extras_require={"demo": ["scikit-learn", "matplotlib", "tqdm"],
                    "hf": ["transformers>=4.46", "accelerate>=1.0"],
                    # Tested with 0.19.8; the ZeRO layouts are read from its optimizer objects.
                    "deepspeed": ["deepspeed>=0.19,<0.20"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["mergopt-kernels = mergopt_kernels.__main__:main"]},
)
