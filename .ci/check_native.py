"""Check that the native op this tree built is the one torch loads, for the device types given.

    python .ci/check_native.py [--devices cpu,cuda] [--arches sm_80,sm_90,compute_90]

Run from the repository root after ``setup.py build_ext --inplace``. Fails (exit 1) when the
library is missing, does not load against this torch (the loader would fall back to Triton and
torch ops), lacks a kernel for one of ``--devices``, or, with ``--arches``, when the CUDA code in
the library (cuobjdump --list-elf / --list-ptx) is not exactly those architectures.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path


def cuda_arches(library: Path) -> set[str]:
    """sm_XX of every cubin and compute_XX of every PTX embedded in ``library``."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if tool is None:
        raise SystemExit("cuobjdump not found (neither triton's bundled one nor on PATH)")
    found = set()
    for flag, prefix in (("--list-elf", "sm_"), ("--list-ptx", "compute_")):
        out = subprocess.run([tool, flag, str(library)], capture_output=True, text=True, check=True).stdout
        print(out.strip())
        found |= {prefix + arch for arch in re.findall(r"\.sm_(\d+a?)\.(?:cubin|ptx)", out)}
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="cpu", help="comma-separated device types that must have a kernel")
    parser.add_argument("--arches", help="comma-separated sm_XX / compute_XX the CUDA code must be exactly")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path.cwd()))
    import torch

    from mergopt_kernels.ops import native

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the loader's fallback warning fails the check
        got = {d for d in ("cpu", "cuda") if native.available(d)}
    library = native._library_path()
    want = set(args.devices.split(","))
    print(f"torch {torch.__version__}: {library} runs {sorted(got)}")
    if library is None or Path.cwd().resolve() not in library.resolve().parents:
        raise SystemExit(f"the native library loaded is not this tree's build: {library}")
    if not want <= got:
        raise SystemExit(f"the native op has no kernel for {sorted(want - got)}")
    if args.arches:
        expected, found = set(args.arches.split(",")), cuda_arches(library)
        if found != expected:
            raise SystemExit(f"CUDA code for {sorted(found)}, expected {sorted(expected)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
