"""Our ``merge`` command against mergekit 0.1.5's ``mergekit-yaml`` on the same files: time,
throughput, peak memory and agreement.

    python -m bench.mergekit_speed --mergekit /path/to/venv/bin/mergekit-yaml [--size 167M] [--reps 5]
                                   [--methods linear task_arithmetic ties dare_linear] [--cache cold]
                                   [--write-results]

mergekit runs from its own environment (it is not a dependency: it pins its own transformers);
``--mergekit`` defaults to ``$MERGEKIT_YAML``, then ``mergekit-yaml`` on ``PATH``. A bf16
Llama-shaped base and 3 experts (``mergekit_ties.write_models``; ``--size``: ``tiny`` 0.46M,
``40M`` or ``167M`` elements per model) are saved with ``save_pretrained`` in shards of
``--shard-size`` into a temporary folder. Each method has one mergekit config (``dtype:
float32``, ``out_dtype: bfloat16``: the fp32 arithmetic we do) and the same config for us
under ``conventions: mergekit``: both tools make the same computation, DARE's random masks
aside. Every repetition runs, for every method, both tools as fresh processes
(``python -m mergopt_kernels merge --config``, ``mergekit-yaml``), in alternating order
(interleaved: a neighbour's burst hits both alike), each timed from start to exit (interpreter
start and imports included, as a user sees it). Before each run the inputs are made cold
(``--cache cold``: their pages are evicted with ``posix_fadvise(DONTNEED)`` after a ``sync``;
no root needed and other processes' caches are untouched), warm (``warm``: read once), or the
whole page cache is dropped (``drop``: ``/proc/sys/vm/drop_caches``, root only; libraries then
load cold too). Reported per method and tool: median wall time with its interquartile range,
throughput (bytes of the inputs read plus the output written, over the median time), CPU time,
peak resident set of the process (``wait4``'s ``ru_maxrss``: the interpreter and libraries
included, and the pages of memory-mapped inputs while mapped), and the per-repetition ratio
ours / mergekit (median and IQR). Agreement compares the two outputs of the last repetition
element by element.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .mergekit_ties import write_models

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- mergekit-speed:begin -->", "<!-- mergekit-speed:end -->"
EXPERTS = 3

# LlamaConfig overrides of mergekit_ties.TINY_LLAMA per --size
SIZES = {
    "tiny": {},
    "40M": dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8),
    "167M": dict(vocab_size=35072, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
}

# method -> (mergekit merge_method, uses the base, per-model parameters, shared parameters)
METHODS = {
    "linear": ("linear", False, {"weight": 1.0}, {}),
    "task_arithmetic": ("task_arithmetic", True, {"weight": 0.3}, {}),
    "ties": ("ties", True, {"weight": 1.0, "density": 0.25}, {"normalize": True}),
    "dare_linear": ("dare_linear", True, {"weight": 0.5, "density": 0.5}, {}),
    "dare_ties": ("dare_ties", True, {"weight": 0.5, "density": 0.5}, {}),
}
DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear")
TOOLS = ("ours", "mergekit")


def find_mergekit(given: str | None = None) -> str | None:
    """The mergekit-yaml to run: ``given``, else ``$MERGEKIT_YAML``, else ``mergekit-yaml`` on PATH."""
    path = given or os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    return path if path and os.access(path, os.X_OK) else None


def write_configs(root: Path, method: str) -> tuple[Path, Path]:
    """(mergekit's config, ours) of ``method`` over the models in ``root``: the same YAML, with
    ``dtype: float32``/``out_dtype`` for mergekit and ``conventions: mergekit`` for us."""
    merge_method, uses_base, per_model, shared = METHODS[method]
    models = "".join(f"  - model: {root}/e{i}\n    parameters: {json.dumps(per_model)}\n" for i in range(EXPERTS))
    body = (f"merge_method: {merge_method}\n" + (f"base_model: {root}/base\n" if uses_base else "")
            + (f"parameters: {json.dumps(shared)}\n" if shared else "") + f"models:\n{models}")
    theirs, ours = root / f"{method}.mergekit.yaml", root / f"{method}.ours.yaml"
    theirs.write_text(body + "dtype: float32\nout_dtype: bfloat16\n")
    ours.write_text(body + "conventions: mergekit\n")
    return theirs, ours


def command(tool: str, config: Path, out: Path, mergekit: str) -> list[str]:
    """The command line of one merge."""
    if tool == "ours":
        return [sys.executable, "-m", "mergopt_kernels", "merge", "--config", str(config), "--out", str(out),
                "--no-progress"]
    return [mergekit, str(config), str(out), "--no-copy-tokenizer", "--random-seed", "0", "--quiet"]


def input_files(root: Path, method: str) -> list[Path]:
    """The .safetensors files ``method`` reads."""
    folders = (["base"] if METHODS[method][1] else []) + [f"e{i}" for i in range(EXPERTS)]
    return sorted(p for folder in folders for p in (root / folder).glob("*.safetensors"))


def prepare_cache(files: list[Path], mode: str) -> None:
    """Make ``files`` cold (evict their pages), warm (read them), or drop the whole page cache."""
    os.sync()  # earlier outputs' dirty pages are written now, not during the next run
    if mode == "drop":
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return
    for path in files:
        with open(path, "rb") as f:
            if mode == "cold":
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while f.read(1 << 24):
                    pass


# Runs argv[2:] as its child and writes that child's wall time and rusage to argv[1]. A process
# exec'd straight from this (large) benchmark process would report our resident set as its own
# ru_maxrss (Linux carries the peak over exec); this small launcher's child starts from its own.
_LAUNCHER = """import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_one(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` as a fresh process; returns its wall seconds, CPU seconds and peak RSS bytes."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    usage = log.with_suffix(".json")
    with open(log, "wb") as out:
        returncode = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(usage), *cmd], stdout=out,
                                    stderr=subprocess.STDOUT, cwd=ROOT, env=env, check=False).returncode
    if returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {returncode}:\n{log.read_text()[-3000:]}")
    return json.loads(usage.read_text())


def compare(ours: Path, theirs: Path) -> dict:
    """Element-wise agreement of two merged folders: elements, differing ones, max |difference|."""
    import torch

    from mergopt_kernels.merge_io import SafetensorsSource

    a, b = SafetensorsSource(ours, "ours"), SafetensorsSource(theirs, "mergekit")
    if set(a.keys()) != set(b.keys()):
        raise AssertionError(f"the outputs hold different keys: {sorted(set(a.keys()) ^ set(b.keys()))[:5]}")
    total = differ = 0
    max_abs = 0.0
    for key in a.keys():
        x, y = a.load(key), b.load(key)
        if x.shape != y.shape or x.dtype != y.dtype:
            raise AssertionError(f"{key}: ours {x.dtype}{tuple(x.shape)}, mergekit {y.dtype}{tuple(y.shape)}")
        total += x.numel()
        differ += int((x != y).sum())
        max_abs = max(max_abs, float((x.float() - y.float()).abs().max()) if x.numel() else 0.0)
    return {"elements": total, "differ": differ, "max_abs": max_abs}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); all three the value when there is one."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def benchmark(mergekit: str, root: Path, methods, reps: int, cache: str, log=print) -> dict:
    """Run every method's merges ``reps`` times, interleaved; returns the per-run records and agreement.

    ``root`` holds the models (``write_models``); outputs go to ``root/out``.
    """
    runs = {(m, t): [] for m in methods for t in TOOLS}
    configs = {m: write_configs(root, m) for m in methods}
    agreement, nbytes = {}, {}
    for rep in range(reps):
        for i, method in enumerate(methods):
            theirs_config, ours_config = configs[method]
            order = TOOLS if (rep + i) % 2 == 0 else TOOLS[::-1]
            for tool in order:
                out = root / "out" / f"{method}-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(exist_ok=True)
                files = input_files(root, method)
                prepare_cache(files, cache)
                record = run_one(command(tool, ours_config if tool == "ours" else theirs_config, out, mergekit),
                                 root / "out" / f"{method}-{tool}.log")
                runs[method, tool].append(record)
                nbytes[method] = sum(p.stat().st_size for p in files) + \
                    sum(p.stat().st_size for p in out.glob("*.safetensors"))
                log(f"rep {rep + 1}/{reps} {method:16s} {tool:8s} {record['seconds']:7.2f} s "
                    f"cpu {record['cpu']:7.2f} s  rss {record['rss'] / 2**20:7.0f} MiB")
            if rep == reps - 1:
                agreement[method] = compare(root / "out" / f"{method}-ours", root / "out" / f"{method}-mergekit")
    return {"runs": runs, "agreement": agreement, "bytes": nbytes}


def summary_rows(result: dict, methods) -> list[dict]:
    """One row per method and tool: time quartiles, GB/s, CPU time, peak RSS, ratio to mergekit."""
    rows = []
    for method in methods:
        theirs = result["runs"][method, "mergekit"]
        for tool in TOOLS:
            runs = result["runs"][method, tool]
            q1, median, q3 = quartiles([r["seconds"] for r in runs])
            ratios = quartiles([r["seconds"] / t["seconds"] for r, t in zip(runs, theirs)])
            rows.append({"method": method, "tool": tool, "median": median, "q1": q1, "q3": q3,
                         "gbps": result["bytes"][method] / median / 1e9,
                         "cpu": statistics.median(r["cpu"] for r in runs),
                         "rss": max(r["rss"] for r in runs), "ratio": ratios, "rounds": len(runs)})
    return rows


def environment(mergekit: str) -> dict:
    """Date, CPU model, load and the versions of both tools' environments."""
    import safetensors
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    probe = ("import importlib.metadata as m, torch, transformers, safetensors; "
             "print(m.version('mergekit'), torch.__version__, transformers.__version__, safetensors.__version__)")
    python = Path(mergekit).parent / "python"
    theirs = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False).stdout.split()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{cpu}, {os.cpu_count()} cores", "python": platform.python_version(),
            "ours": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                    f"safetensors {safetensors.__version__}",
            "mergekit": (f"mergekit {theirs[0]} (torch {theirs[1]}, transformers {theirs[2]}, safetensors {theirs[3]})"
                         if len(theirs) == 4 else "mergekit (version not read)"),
            "load": os.getloadavg()[0]}


def markdown(rows: list[dict], agreement: dict, env: dict, args, elements: int, load_end: float) -> str:
    """The RESULTS.md section."""
    cache = {"cold": "inputs evicted from the page cache before every run (`posix_fadvise(DONTNEED)` after "
                     "`sync`); libraries warm",
             "warm": "inputs read once before every run (warm page cache)",
             "drop": "whole page cache dropped before every run (`/proc/sys/vm/drop_caches`); inputs and "
                     "libraries cold"}[args.cache]
    lines = [
        "## Merging from disk: speed and agreement against mergekit", "",
        f"`python -m bench.mergekit_speed --mergekit /work/venv-mergekit/bin/mergekit-yaml --size {args.size} "
        f"--reps {args.reps} --cache {args.cache} --write-results` (not regenerated by `bench.report`). "
        f"{env['date']}, {env['cpu']}, python {env['python']}; ours: {env['ours']}; {env['mergekit']} in its "
        f"own environment. 1-minute load average at start and end: {env['load']:.1f}, {load_end:.1f} (a machine "
        f"shared with other jobs).", "",
        f"A bf16 Llama-shaped base and {EXPERTS} experts, {elements / 1e6:.1f}M elements each "
        f"(`mergekit_ties.write_models`, `save_pretrained` shards of {args.shard_size}); mergekit with "
        "`dtype: float32`, `out_dtype: bfloat16`, ours the same config with `conventions: mergekit` "
        "(configs in `bench/mergekit_speed.py`: linear weights 1; task arithmetic weights 0.3; TIES weights 1, "
        "density 0.25, normalize; DARE linear weights 0.5, density 0.5). Both as fresh processes, timed from "
        "start to exit (interpreter start and imports included), the tools in alternating order within every "
        f"repetition; {cache}. Throughput: bytes of the inputs read plus the output written, over the median "
        "time. Peak RSS: the process's `ru_maxrss` (interpreter, torch and, for mergekit, transformers "
        "included; memory-mapped input pages count while mapped). Ratio: ours / mergekit per repetition, "
        "median (IQR); below 1 we are faster.", "",
        "| method | tool | median time (IQR) | GB/s | CPU time | peak RSS | time ratio ours/mergekit (IQR) | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        r1, r2, r3 = row["ratio"]
        ratio = f"{r2:.2f}x ({r1:.2f}-{r3:.2f})" if row["tool"] == "ours" else ""
        lines.append(f"| {row['method']} | {row['tool']} | {row['median']:.2f} s ({row['q1']:.2f}-{row['q3']:.2f}) "
                     f"| {row['gbps']:.3g} | {row['cpu']:.2f} s | {row['rss'] / 2**20:.0f} MiB | {ratio} "
                     f"| {row['rounds']} |")
    lines += ["", "Agreement of the last repetition's outputs (bf16):", "",
              "| method | differing elements | share | max abs difference |", "|---|---:|---:|---:|"]
    for method, a in agreement.items():
        lines.append(f"| {method} | {a['differ']:,} of {a['elements']:,} | {100 * a['differ'] / a['elements']:.3f} % "
                     f"| {a['max_abs']:.3g} |")
    return "\n".join(lines) + "\n"


def write_results(section: str) -> None:
    """Replace (or append) the marked section of bench/RESULTS.md."""
    text = RESULTS.read_text()
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def main(argv=None) -> None:
    """Write the models, run both tools interleaved, print (and optionally keep) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit", help="mergekit-yaml of an environment with mergekit 0.1.5 "
                                           "(default: $MERGEKIT_YAML, then PATH)")
    parser.add_argument("--size", choices=SIZES, default="167M", help="elements per model (default 167M)")
    parser.add_argument("--shard-size", default="200MB", help="save_pretrained's max_shard_size (default 200MB)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of every merge (default 5)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--cache", choices=("cold", "warm", "drop"), default="cold",
                        help="inputs' page cache before each run (default cold; drop needs root)")
    parser.add_argument("--models", help="folder for the models, kept and reused by later runs (default: a temporary one)")
    parser.add_argument("--write-results", action="store_true", help="replace the section in bench/RESULTS.md")
    args = parser.parse_args(argv)
    mergekit = find_mergekit(args.mergekit)
    if mergekit is None:
        parser.error("mergekit-yaml not found: give --mergekit or set MERGEKIT_YAML")
    env = environment(mergekit)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.models or tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if args.models and (root / "base" / "config.json").is_file():  # written by a previous invocation: reused
            from mergopt_kernels.merge_io import SafetensorsSource

            base = SafetensorsSource(root / "base", "base")
            elements = sum(math.prod(base.meta(key)[0]) for key in base.keys())
        else:
            elements = write_models(root, SIZES[args.size], EXPERTS, args.shard_size)
        print(f"models: {elements:,} elements each, ready in {time.perf_counter() - start:.0f} s", flush=True)
        result = benchmark(mergekit, root, args.methods, args.reps, args.cache,
                           log=lambda line: print(line, flush=True))
    section = markdown(summary_rows(result, args.methods), result["agreement"], env, args, elements,
                       os.getloadavg()[0])
    print(section)
    if args.write_results:
        write_results(section)


if __name__ == "__main__":
    main()
