"""Run the benchmarks and write bench/RESULTS.md and bench/step_ratio.png, in one command.

Usage (from the repository root)::

    python -m bench.report --mode cpu      # CPU run (BENCH_THREADS=1 on a shared machine)
    python -m bench.report --mode gpu      # GPU run (bench/gpu.sh does this on a GPU machine)
    python -m bench.report --render        # only re-render from bench/results/*.json
    python -m pytest bench -q              # smoke: every group once at tiny sizes (CI)

The rows of one group (one size) are built together and timed interleaved (``bench/suite.py``):
the ratio to ``torch.optim.AdamW(fused=True)`` is the median of per-round ratios, its quartiles
the spread, so load from other processes shifts every row of a round alike. A run writes
``<results>/<mode>.json``; the markdown and the plot are rendered from every results file
present, so the CPU and GPU runs can come from different machines. Whatever RESULTS.md holds
between begin/end markers (kernel cost, merge memory) is kept. ``--mode gpu-dry`` runs the GPU run's code on CPU
tensors at small sizes and renders it as the GPU section; give it ``--out`` (a scratch folder).
In CPU mode the report also profiles one step of the torch backend of ``FusedMergOptAdamW``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BASELINE = "adamw_fused"
RENDERED_MODES = ("cpu", "gpu")
NO_GPU = "not measured: no GPU was available"
# Sections that other commands regenerate (bench.kernel_cost, bench.merge_memory), kept as they are.
KEPT_BLOCKS = re.compile(r"<!-- ([a-z-]+):begin -->.*?<!-- \1:end -->", re.S)


def run(mode_name: str) -> dict:
    """Every group of the mode, interleaved within each group: the JSON-ready results."""
    import torch

    from bench import common, suite

    os.environ["BENCH_MODE"] = mode_name
    mode = common.mode()
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    device = torch.device(mode.device)
    copy_bytes = 2 * mode.copy_mib * 2**20
    results = dict(datetime=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   machine_info=suite.machine_info(mode), groups=[],
                   copy=dict(bytes=copy_bytes, gbps=common.copy_bandwidth(device, mode.copy_mib)))
    groups = [("step", size) for size in mode.step_sizes] + [("e2e", spec) for spec in suite.e2e_specs(mode)]
    for kind, size in groups:
        start = time.perf_counter()
        group = suite.run_group(mode, kind, size, device)
        results["groups"].append(group)
        print(f"{group['group']}: {time.perf_counter() - start:.0f} s, " + ", ".join(
            f"{r['row']} {r['ratio']:.2f}x [{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}]"
            for r in group["rows"] if "ratio" in r), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["machine_info"]["loadavg_end"] = list(os.getloadavg())
    return results


def profile_torch_backend(size: str = "1M") -> dict:
    """CPU time of one torch-backend fused step split into Philox words, the Laplace transform,
    AdamW and the rest, by wrapping those functions in ``torch.profiler.record_function``."""
    import torch
    from torch.profiler import profile, record_function

    from bench import models, peers
    from mergopt_kernels import FusedMergOptAdamW, noise
    from mergopt_kernels.ops import torch_step

    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    params = models.make_params(models.shapes_for(size), "cpu")
    opt = FusedMergOptAdamW(params, lr=peers.LR, seed=peers.SEED, backend="torch")
    labelled = {"philox words": (noise, "element_words"), "laplace transform": (noise, "laplace_from_words"),
                "adamw": (torch_step, "_adamw_chunk")}
    originals = {label: getattr(module, attr) for label, (module, attr) in labelled.items()}

    def wrap(label, fn):
        def wrapped(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)
        return wrapped

    try:
        for label, (module, attr) in labelled.items():
            setattr(module, attr, wrap(label, originals[label]))
        start = time.perf_counter()
        with profile() as prof, record_function("step"):
            opt.step()
        wall = time.perf_counter() - start
    finally:
        for label, (module, attr) in labelled.items():
            setattr(module, attr, originals[label])
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in (*labelled, "step")}
    split = {label: totals.get(label, 0.0) for label in labelled}
    split["other (chunk copies, casts, Python)"] = totals["step"] - sum(split.values())
    top = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return dict(size=size, params=models.num_params(models.shapes_for(size)), wall_s=wall,
                step_cpu_s=totals["step"], split=split, threads=torch.get_num_threads(),
                top_ops=[(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top])


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _ratio_cell(row: dict) -> str:
    if "ratio" not in row:
        return "n/a"
    return f"{row['ratio']:.2f}x ({row['ratio_q1']:.2f}-{row['ratio_q3']:.2f})"


def _header(mode: str, data: dict) -> list[str]:
    info = data["machine_info"]
    load0, load1 = info["loadavg"][0], info.get("loadavg_end", info["loadavg"])[0]
    lines = [f"## {mode.upper()} results", "",
             f"- date: {data['datetime']}; mode {info['bench_mode']}",
             f"- device: {info['device']}; CPU: {info['cpu_model']}, {info['cores']} cores",
             f"- torch {info['torch']}, triton {info['triton']}, python {info['python_version']}, "
             f"threads {info['threads']}" + (f", CUDA {info['cuda']}" if info.get("cuda") else "")
             + f"; timed with {info['clock']}",
             f"- command: `{'BENCH_THREADS=1 ' if info['threads'] == 1 else ''}"
             f"python -m bench.report --mode {info['bench_mode']}`",
             f"- 1-minute load average at start and end: {load0:.1f}, {load1:.1f}"]
    if not info["device"].startswith("cpu") or max(load0, load1) <= info["threads"]:
        return lines + [""]
    return lines + [f"- the machine was shared with other jobs (load above the {info['threads']} threads "
                    "used): absolute times are noisy; the ratios are per-round ratios of interleaved "
                    "rows, which that load shifts alike" + (
                        "; CPU time leaves out the time given to other processes, not their use of "
                        "the memory bus and caches" if info["clock"] == "thread CPU time" else ""), ""]


def render_mode(mode: str, data: dict, profile: dict | None) -> list[str]:
    """The markdown section of one mode's results."""
    lines = _header(mode, data)
    copy = data["copy"]
    lines += [f"Copy bandwidth (median copy of {_fmt_bytes(copy['bytes'] / 2)}, read + write counted): "
              f"**{copy['gbps']:.1f} GB/s**.", ""]
    if data["machine_info"]["device"].startswith("cpu"):
        lines += ["On a CPU a copy also reads its destination before writing it (write-allocate), "
                  "so it moves about 3 bytes per 2 counted, while an optimizer step writes memory "
                  "it has just read; and sizes up to tens of MiB stay in cache. Hence CPU rows "
                  "above 100 % of the copy rate.", ""]
    for group in data["groups"]:
        info = group["info"]
        if info["kind"] == "step":
            lines += [f"### Step, {info['size']}: {info['params'] / 1e6:.2f}M params in {info['tensors']} "
                      f"tensors ({_fmt_bytes(info['bytes_moved'])} moved at 28 B/param)", "",
                      "| optimizer | median | ratio to adamw_fused (IQR) | GB/s | % of copy bw | memory | rounds |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
        else:
            lines += [f"### Training step, {info['size']}: {info['params'] / 1e6:.1f}M params, "
                      f"{info['tokens']} tokens/step, autocast {'bf16' if info['autocast'] else 'off'}", "",
                      "| optimizer | median | ratio to adamw_fused (IQR) | tokens/s | memory | rounds |",
                      "|---|---:|---:|---:|---:|---:|"]
        for row in sorted(group["rows"], key=lambda r: r["median"]):
            memory = f"{_fmt_bytes(row['memory_bytes'])} ({'state' if row['memory_kind'] == 'state_bytes' else 'peak'})"
            if info["kind"] == "step":
                gbps = info["bytes_moved"] / row["median"] / 1e9
                lines.append(f"| {row['row']} | {_fmt_time(row['median'])} | {_ratio_cell(row)} | {gbps:.2f} | "
                             f"{100 * gbps / copy['gbps']:.1f} % | {memory} | {row['rounds']} |")
            else:
                lines.append(f"| {row['row']} | {_fmt_time(row['median'])} | {_ratio_cell(row)} | "
                             f"{info['tokens'] / row['median']:,.0f} | {memory} | {row['rounds']} |")
        empty = " |" * (5 if info["kind"] == "step" else 4)
        lines += [f"| {name} | {reason} |{empty}" for name, reason in group["skipped"].items()] + [""]
    if profile:
        lines += _profile_lines(profile)
    return lines


def _profile_lines(profile: dict) -> list[str]:
    lines = [f"### Profile: one torch-backend fused step, {profile['params'] / 1e6:.2f}M params "
             f"({profile['threads']} threads, torch.profiler)", "",
             f"Wall {profile['wall_s']:.2f} s under the profiler; CPU time of the step "
             f"{profile['step_cpu_s']:.2f} s, split:", "", "| part | CPU time | share |", "|---|---:|---:|"]
    for label, seconds in profile["split"].items():
        lines.append(f"| {label} | {seconds:.3f} s | {100 * seconds / profile['step_cpu_s']:.0f} % |")
    noise_share = (profile["split"]["philox words"] + profile["split"]["laplace transform"]) / profile["step_cpu_s"]
    lines += ["", f"Noise generation (Philox as int64 torch ops, then the Laplace transform) is "
              f"{100 * noise_share:.0f} % of the step and AdamW {100 * profile['split']['adamw'] / profile['step_cpu_s']:.0f} %: "
              "the CPU targets need the noise in native code (the C++ op), not a faster AdamW.", ""]
    return lines + ["Top ops by self CPU time: " + ", ".join(
        f"`{name}` {seconds:.3f} s ({count} calls)" for name, seconds, count in profile["top_ops"]), ""]


def _row(group: dict, name: str) -> dict | None:
    return next((r for r in group["rows"] if r["row"] == name), None)


def targets(results: dict) -> list[str]:
    """The issue's targets read against the measured numbers (reported, not asserted)."""
    lines = ["## Targets", ""]
    cpu = results.get("cpu")
    if cpu:
        lines += ["CPU: fused step <= 2.0x torch fused AdamW, and >= 5x faster than the published pattern.", ""]
        for group in (g for g in cpu["groups"] if g["info"]["kind"] == "step"):
            published = _row(group, "published")
            for row in (r for r in group["rows"] if r["row"].startswith("fused[")):
                ratio = row["ratio"]
                text = f"- {group['group']}, {row['row']}: {_ratio_cell(row)} adamw_fused: " + (
                    "meets the 2.0x target" if ratio <= 2.0 else f"misses the 2.0x target ({ratio / 2.0:.2f}x it)")
                if published:
                    speedup = published["ratio"] / ratio
                    text += (f"; {speedup:.1f}x as fast as the published pattern: "
                             + ("meets the 5x target" if speedup >= 5 else "misses the 5x target"))
                lines.append(text)
        lines.append("")
    gpu_targets = ("GPU: fused step <= 1.05x torch fused AdamW and >= 90 % of copy bandwidth from 10M "
                   "params; end-to-end <= 1.02x AdamW on 125M; peak memory equal to AdamW's")
    gpu = results.get("gpu")
    if not gpu:
        return lines + [f"{gpu_targets}: {NO_GPU}.", ""]
    lines += [gpu_targets + ".", ""]
    for group in gpu["groups"]:
        base = _row(group, BASELINE)
        for row in (r for r in group["rows"] if r["row"].startswith("fused[")):
            text = f"- {group['group']}, {row['row']}: {_ratio_cell(row)} adamw_fused"
            if group["info"]["kind"] == "step":
                gbps = group["info"]["bytes_moved"] / row["median"] / 1e9
                text += f", {100 * gbps / gpu['copy']['gbps']:.0f} % of copy bw"
            text += f", peak memory {row['memory_bytes'] / base['memory_bytes']:.3f}x adamw_fused"
            lines.append(text)
    return lines + [""]


def plot(results: dict, path: Path) -> None:
    """Median per-round time ratio to torch fused AdamW vs parameter count, one line per
    optimizer, per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in RENDERED_MODES if m in results]
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(7 * max(1, len(modes)), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        lines = {}
        for group in (g for g in results[mode]["groups"] if g["info"]["kind"] == "step"):
            for row in group["rows"]:
                lines.setdefault(row["row"], []).append(
                    (group["info"]["params"], row["ratio"], row["ratio_q1"], row["ratio_q3"], group["info"]["size"]))
        for name, points in sorted(lines.items()):
            points.sort()
            x, y = [p[0] for p in points], [p[1] for p in points]
            err = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
            ax.errorbar(x, y, yerr=err, marker="o", label=name, capsize=3,
                        linewidth=2.5 if name.startswith("fused[") else 1.2)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        target = 2.0 if mode == "cpu" else 1.05
        ax.axhline(target, color="green", linestyle=":", linewidth=1.0, label=f"target for fused ({target}x)")
        for params, ratio, _, _, size in lines.get(BASELINE, []):
            ax.annotate(size, (params, ratio), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (GPT-style tensor list)")
        ax.set_ylabel("step time / torch AdamW(fused=True), median of rounds (IQR)")
        info = results[mode]["machine_info"]
        ax.set_title(f"{mode.upper()}: {info['device']}, {info['threads']} threads, torch {info['torch']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if not modes:
        axes[0][0].text(0.5, 0.5, "no results", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(results_dir: Path, markdown: Path, profile: dict | None = None) -> None:
    """RESULTS.md (``markdown``) and step_ratio.png beside it from ``results_dir``'s results files;
    the blocks between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers of an existing
    ``markdown`` (the kernel-cost and merge-memory sections) are kept."""
    results = {m: _load(results_dir / f"{m}.json")
               for m in RENDERED_MODES if (results_dir / f"{m}.json").exists()}
    profile_path = results_dir / "cpu-profile.json"
    if profile is not None:
        profile_path.write_text(json.dumps(profile, indent=1))
    elif profile_path.exists():
        profile = json.loads(profile_path.read_text())
    kept = [m.group(0) for m in KEPT_BLOCKS.finditer(markdown.read_text())] if markdown.exists() else []
    lines = ["# Benchmark results", "",
             "Regenerate with `python -m bench.report --mode cpu` (or `--mode gpu`: `make gpu-check` on a GPU "
             "machine). The rows of one size are built together and timed interleaved, round-robin in one "
             "loop; a row's ratio to torch.optim.AdamW(fused=True) is the median of its per-round ratios, "
             "with their interquartile range in brackets. A row's turn is an untimed call, then the timed one "
             "(its data in the caches, as when timed alone); one warm-up round comes first. "
             "GB/s counts 28 B/param (fp32 AdamW: read p, g, m, v; write p, m, v) for every row, so it is "
             "an effective rate. Memory: on GPU the peak a row adds while it runs alone (its parameters, "
             "state and transients; the step groups' shared gradients excluded); on CPU the bytes of the "
             "optimizer's state tensors plus the peak of what a peer holds during a step (backups, stored "
             "noise).", ""]
    lines += targets(results)
    for block in kept:
        lines += [block, ""]
    for mode in ("gpu", "cpu"):
        if mode in results:
            lines += render_mode(mode, results[mode], profile if mode == "cpu" else None)
        elif mode == "gpu":
            lines += ["## GPU results", "", f"{NO_GPU}. `make gpu-check` on a GPU machine measures them.", ""]
    markdown.write_text("\n".join(lines))
    plot(results, markdown.parent / "step_ratio.png")
    print(f"wrote {markdown} and {markdown.parent / 'step_ratio.png'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("cpu", "gpu", "gpu-dry"), help="run the benchmarks in this mode first")
    parser.add_argument("--render", action="store_true", help="only render from the results folder")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch-backend profile (cpu)")
    parser.add_argument("--out", type=Path, help="folder for the results files, RESULTS.md and the plot "
                        "(default: bench/results and bench/RESULTS.md)")
    args = parser.parse_args(argv)
    if not args.render and args.mode is None:
        parser.error("give --mode to run, or --render")
    if args.mode == "gpu-dry" and args.out is None:
        parser.error("--mode gpu-dry writes to a scratch folder: give --out")
    results_dir = args.out or RESULTS
    markdown = args.out / "RESULTS.md" if args.out else HERE / "RESULTS.md"
    results_dir.mkdir(parents=True, exist_ok=True)
    profile = None
    if args.mode and not args.render:
        results = run(args.mode)
        name = "gpu" if args.mode == "gpu-dry" else args.mode
        (results_dir / f"{name}.json").write_text(json.dumps(results, indent=1))
        if args.mode == "cpu" and not args.no_profile:
            profile = profile_torch_backend()
    render(results_dir, markdown, profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
