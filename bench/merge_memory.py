"""Peak extra memory of merges from disk, on models with one large tensor.

    python -m bench.merge_memory [--numel 16777216] [--experts 3] [--dtype float32]

Writes a base and K experts (one ``[numel / 1024, 1024]`` tensor plus small ones) as
``.safetensors`` files, then runs each merge in a fresh process: the process resets its peak
resident set (``/proc/self/clear_refs``), runs ``merge_io.merge_checkpoints`` and reports
``VmHWM - VmRSS`` at the reset, the memory the merge added at its peak. Inputs are read through
the safetensors library, which memory-maps a file while one tensor is copied out of it: those
mapped pages count in the peak while they are mapped. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (label, method, options): the rows measured
CASES = (
    ("weight average", "weight_average", {}),
    ("task arithmetic", "task_arithmetic", {}),
    ("TIES, whole model", "ties", {}),
    ("TIES, whole model, exact count", "ties", {"exact_count": True}),
    ("TIES, per tensor", "ties", {"per_tensor": True}),
    ("DARE", "dare", {}),
    ("DARE + TIES", "dare", {"ties": True}),
)


def write_models(folder: Path, numel: int, experts: int, dtype: str = "float32", seed: int = 0):
    """Save a base and ``experts`` experts as .safetensors files in ``folder``; returns their paths."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    shapes = {"embed.weight": (numel // 1024, 1024), "norm.weight": (1024,), "proj.weight": (257, 31),
              "proj.bias": (31,)}
    base = {key: torch.randn(shape, generator=gen).to(torch_dtype) for key, shape in shapes.items()}
    paths = [folder / "base.safetensors"]
    save_file(base, paths[0])
    for i in range(experts):
        expert = {key: (value.float() + 0.01 * torch.randn(value.shape, generator=gen)).to(torch_dtype)
                  for key, value in base.items()}
        paths.append(folder / f"expert{i}.safetensors")
        save_file(expert, paths[-1])
    return paths[0], paths[1:]


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _child(request: dict) -> None:
    from mergopt_kernels.merge_io import merge_checkpoints

    Path("/proc/self/clear_refs").write_text("5")      # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    merge_checkpoints(request["method"], request["base"], request["experts"], request["out"], **request["options"])
    seconds = time.perf_counter() - start
    print(json.dumps({"extra_bytes": (_status_kib("VmHWM") - before) * 1024, "seconds": seconds}))


def measure(method: str, base, experts, out, options: dict) -> dict:
    """Run one merge in a fresh process; returns ``{"extra_bytes", "seconds"}``."""
    request = {"method": method, "base": str(base), "experts": [str(p) for p in experts], "out": str(out),
               "options": options}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "bench.merge_memory", "--child", json.dumps(request)],
                            capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"merge {method} {options} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    """Measure every case and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=1 << 24, help="elements of the large tensor")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return
    import torch

    largest = args.numel * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    largest_fp32 = args.numel * 4
    print(f"largest tensor: {args.numel} {args.dtype} elements = {largest / 2**20:.1f} MiB "
          f"({largest_fp32 / 2**20:.1f} MiB in fp32), {args.experts} experts; bound 3 x (K + 1) x largest "
          f"= {3 * (args.experts + 1) * largest / 2**20:.0f} MiB")
    print("| merge | peak extra memory | / largest tensor | time |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        base, experts = write_models(Path(tmp), args.numel, args.experts, args.dtype)
        for i, (label, method, options) in enumerate(CASES):
            result = measure(method, base, experts, Path(tmp) / f"out{i}", options)
            print(f"| {label} | {result['extra_bytes'] / 2**20:.0f} MiB | {result['extra_bytes'] / largest:.2f}x "
                  f"| {result['seconds']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
