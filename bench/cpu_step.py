"""Side-by-side CPU step timings in one process: FusedMergOptAdamW (native op) against
torch.optim.AdamW(fused=True), the noise-off fused step and (row ``published``) the published
MergOPT pattern of bench/peers.py, on N tensors of M fp32 params.

    PYTHONPATH=. python bench/cpu_step.py --tensors 20 --numel 1000000 --threads 2 --reps 15

Rows run interleaved, round by round, so load from other processes hits them alike; medians.
MERGOPT_CPU_ISA (generic, avx2, avx512) picks the native op's instruction set at run time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from mergopt_kernels import FusedMergOptAdamW


def build(kind: str, params):
    if kind == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=True)
    if kind == "published":
        from bench.peers import PublishedMergOpt
        return PublishedMergOpt(params)
    noise = 0.0 if kind == "noise_off" else 5e-4
    dist = "gaussian" if kind.endswith("gaussian") else "laplace"
    return FusedMergOptAdamW(params, lr=1e-4, weight_decay=1e-2, noise_scale=noise, distribution=dist,
                             seed=1234, backend="native")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=20)
    ap.add_argument("--numel", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rows", nargs="+",
                    default=["adamw_fused", "noise_off", "laplace", "gaussian"])
    ap.add_argument("--isa", nargs="*", default=[], help="extra laplace rows per MERGOPT_CPU_ISA value")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for kind in args.rows + [f"laplace@{isa}" for isa in args.isa]:
        params = [torch.nn.Parameter(torch.randn(args.numel, generator=gen) * 0.05) for _ in range(args.tensors)]
        for p in params:
            p.grad = torch.randn(args.numel, generator=gen) * 1e-2
        rows[kind] = (build(kind.split("@")[0], params), kind.split("@")[1] if "@" in kind else None)
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = {k: [] for k in rows}
        for rep in range(args.reps + 2):
            for kind, (opt, isa) in rows.items():
                if isa:
                    os.environ["MERGOPT_CPU_ISA"] = isa
                start = time.perf_counter()
                opt.step()
                elapsed = time.perf_counter() - start
                os.environ.pop("MERGOPT_CPU_ISA", None)
                if rep >= 2:
                    times[kind].append(elapsed * 1e3)
        base = statistics.median(times["adamw_fused"]) if "adamw_fused" in times else None
        print(f"threads={threads} tensors={args.tensors} numel={args.numel} reps={args.reps} "
              f"loadavg={os.getloadavg()[0]:.2f}")
        for kind, ts in times.items():
            med = statistics.median(ts)
            ratio = f"{med / base:5.2f}x" if base else ""
            print(f"  {kind:22s} median {med:8.2f} ms  min {min(ts):8.2f}  max {max(ts):8.2f}  {ratio}")


if __name__ == "__main__":
    main()
