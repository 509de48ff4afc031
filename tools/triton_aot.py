"""Ahead-of-time compilation of the Triton kernels for GPUs this machine need not have.

The launch variants come from the real launchers: a launcher runs on small CPU tensors with the
kernel's launch replaced by a recorder, and the recorded arguments are bound by Triton's own
binder (``create_function_from_signature`` and ``JITFunction._pack_args``, the code a real launch
runs), so signature, constexprs and specialisation attributes (pointer alignment, integer widths,
``do_not_specialize``) are exactly what a GPU launch would compile. Each variant then goes through
``triton.compile`` to a cubin for ``GPUTarget("cuda", arch, 32)``; registers, spills and the SASS
come from the cubin with the ``cuobjdump`` that ships in the Triton wheel, and the PTX is checked
for approximate division and square root outside the noise transform (``inexact_ops``).

Needs real ``JITFunction`` objects: run it from the repository root with ``TRITON_INTERPRET``
unset (``make aot-full`` does; the tests run ``python -m tools.triton_aot`` in a subprocess).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from mergopt_kernels.ops import triton_noise
from mergopt_kernels.ops.step_args import FusedStepArgs

ARCHES = (80, 90)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One recorded launch: the kernel's qualified name and the arguments it was called with."""
    kernel: str       # "module:name" of the @triton.jit function
    args: tuple
    kwargs: dict
    label: str        # the launcher options that produced it

    def jit_function(self):
        module, name = self.kernel.split(":")
        return getattr(sys.modules[module], name)


def record(kernels, launch: Callable[[], None], label: str) -> list[Launch]:
    """The launches of ``kernels`` (one JITFunction or a sequence) that ``launch()`` makes, in
    order, without running them."""
    kernels = list(kernels) if isinstance(kernels, (list, tuple)) else [kernels]
    for kernel in kernels:
        if not isinstance(kernel, triton.runtime.jit.JITFunction):
            raise TypeError(f"record() needs JITFunctions (TRITON_INTERPRET unset), got {type(kernel).__name__}")
    seen: list[Launch] = []

    def recorder(name):
        def run(*args, grid, warmup, **kwargs):
            seen.append(Launch(name, tuple(_portable(a) for a in args),
                               {k: _portable(v) for k, v in kwargs.items()}, label))
        return run

    try:
        for kernel in kernels:
            kernel.run = recorder(f"{kernel.fn.__module__}:{kernel.fn.__name__}")
        launch()
    finally:
        for kernel in kernels:
            kernel.__dict__.pop("run", None)
    return seen


@dataclasses.dataclass(frozen=True)
class _TensorStub:
    """A tensor argument as Triton's binder sees it (dtype, address), picklable to compile
    workers without moving the address, whose alignment the binder specialises on."""
    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


def _portable(value):
    return _TensorStub(value.dtype, value.data_ptr()) if isinstance(value, torch.Tensor) else value


def bind(launch: Launch, arch: int):
    """(ASTSource, target, options) of a launch, from Triton's own binder for ``sm_<arch>``."""
    kernel = launch.jit_function()
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options


@dataclasses.dataclass
class Result:
    """Compiler numbers of one variant on one architecture."""
    label: str
    arch: int
    registers: int = 0
    local_bytes: int = 0       # per-thread local memory: spills (and stack)
    shared_bytes: int = 0
    sass: str = ""
    inexact: list = dataclasses.field(default_factory=list)   # inexact_ops of the PTX
    error: Optional[str] = None

    @property
    def spills(self) -> int:
        return len(re.findall(r"\b(?:STL|LDL)\b", self.sass))


def compile_launch(launch: Launch, arch: int, keep_sass: bool = False) -> Result:
    """Compile one launch for ``sm_<arch>``; compile errors land in ``Result.error``."""
    result = Result(launch.label, arch)
    try:
        source, target, options = bind(launch, arch)
        compiled = triton.compile(source, target=target, options=options.__dict__)
    except Exception as error:  # noqa: BLE001  (any frontend/backend failure is the finding)
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        result.error = f"{type(error).__name__}: {error}" + (f" (caused by {cause!r})" if cause is not error else "")
        return result
    result.shared_bytes = int(compiled.metadata.shared)
    result.inexact = inexact_ops(compiled.asm["ptx"])
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _cuobjdump("--dump-resource-usage", cubin)
        sass = _cuobjdump("-sass", cubin)
    result.registers = int(re.search(r"REG:(\d+)", usage).group(1))
    result.local_bytes = int(re.search(r"STACK:(\d+)", usage).group(1)) + int(re.search(r"LOCAL:(\d+)", usage).group(1))
    result.sass = sass if keep_sass else "\n".join(l for l in sass.splitlines() if re.search(r"\b(?:STL|LDL)\b", l))
    return result


# PTX division and square root that are not IEEE round-to-nearest (what `/`, tl.sqrt and
# tl.rsqrt compile to; tl.div_rn and tl.sqrt_rn give div.rn and sqrt.rn).
_INEXACT = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:div\.(?:full|approx)|sqrt\.approx|rcp\.approx|rsqrt\.approx)\S*)")
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+(?:.*inlined_at\s+(\d+)\s+\d+)?")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', re.MULTILINE)


def _is_noise_module(path: str) -> bool:
    # By the path inside the package: Triton's cache hands out the PTX of the same source
    # compiled from another checkout.
    return os.path.normpath(path).endswith(os.path.join("", *triton_noise.__name__.split(".")) + ".py")


def inexact_ops(ptx: str) -> list[str]:
    """Approximate division and square root instructions of ``ptx`` outside the noise
    transform, as "opcode at file:line" (the source line from the PTX's ``.loc`` directives).

    The noise transform (``ops/triton_noise.py``: an instruction located there, or inlined from
    there) may use them: its error bound against float64 is measured with them
    (``python_tests/test_noise.py``). Everything else, the AdamW update first, divides and takes
    square roots as torch's fused AdamW does, rounded to nearest. An instruction without a
    location (Triton compiled without line information: TRITON_DISABLE_LINE_INFO) is reported.
    """
    files = dict(_FILE.findall(ptx))
    location = None
    found = []
    for line in ptx.splitlines():
        loc = _LOC.match(line)
        if loc:
            location = loc.groups()
            continue
        op = _INEXACT.match(line)
        if op is None:
            continue
        if location is None:
            found.append(f"{op.group(1)} at an unknown line (PTX without line information)")
            continue
        file_id, source_line, caller_id = location
        if not any(_is_noise_module(files.get(i, "")) for i in (file_id, caller_id) if i):
            found.append(f"{op.group(1)} at {os.path.basename(files.get(file_id, '?'))}:{source_line}")
    return found


def _cuobjdump(flag: str, cubin: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, flag, cubin], check=True, capture_output=True, text=True).stdout


def variant_key(launch: Launch, arch: int) -> str:
    """What makes two launches the same compiled kernel: signature, constexprs, attributes."""
    source, _, _ = bind(launch, arch)
    return f"{launch.kernel} {source.hash()} sm_{arch}"


# ---------------------------------------------------------------------------------------------
# The launch variants of the fused step
# ---------------------------------------------------------------------------------------------

STEP_OPTIONS = {
    "dtype": (torch.float32, torch.bfloat16, torch.float16),
    "master": (False, True),
    "amsgrad": (False, True),
    "maximize": (False, True),
    "lr_tensor": (False, True),
    "noise": ("laplace", "off", "gaussian"),
    "mode": ("restore+apply", "apply", "apply-now", "restore"),   # the optimizers' noise passes
    "seed": (12345, 2**40 + 7, 2**64 - 3),                        # int32, int64, negative int64
}
# (restore, apply_offset) of each mode.
_MODES = {"restore+apply": (True, 1), "apply": (False, 1), "apply-now": (False, 0), "restore": (True, -1)}

# The variants CI compiles: the main step of fp32 and of bf16 parameters, and every other option
# value once, so that every constexpr value and argument type is compiled somewhere (main()
# checks that against a sweep of one option at a time).
CI_STEP_VARIANTS = (
    dict(dtype=torch.float32, noise="laplace", mode="restore+apply"),
    dict(dtype=torch.bfloat16, master=True, noise="laplace", mode="restore+apply"),
    dict(dtype=torch.float32, noise="gaussian", mode="restore", amsgrad=True, maximize=True, lr_tensor=True,
         seed=2**40 + 7),
    dict(dtype=torch.bfloat16, master=True, noise="off", mode="apply", seed=2**64 - 3),
    dict(dtype=torch.float16, master=True, noise="laplace", mode="apply-now"),
)


def _step_label(options: dict) -> str:
    full = {k: v[0] for k, v in STEP_OPTIONS.items()} | options
    parts = [str(full["dtype"]).replace("torch.", ""), f"noise={full['noise']}", full["mode"]]
    parts += [name for name in ("master", "amsgrad", "maximize", "lr_tensor") if full[name]]
    if full["seed"] != STEP_OPTIONS["seed"][0]:
        parts.append(f"seed={full['seed']:#x}")
    return " ".join(parts)


def step_launches(options: dict) -> list[Launch]:
    """Record ``triton_step.fused_step`` on small CPU tensors with these STEP_OPTIONS values."""
    from mergopt_kernels.ops import triton_step

    full = {k: v[0] for k, v in STEP_OPTIONS.items()} | options
    dtype, amsgrad = full["dtype"], full["amsgrad"]
    sizes = (1, 7, 4099)
    params = [torch.zeros(n, dtype=dtype) for n in sizes]
    fp32 = [torch.zeros(n) for n in sizes]
    restore, apply_offset = _MODES[full["mode"]]
    lr = torch.tensor([1e-3]) if full["lr_tensor"] else 1e-3

    def launch():
        noisy = full["noise"] != "off"
        triton_step.fused_step(FusedStepArgs(
            params=params, grads=[torch.zeros_like(p) for p in params], exp_avgs=fp32,
            exp_avg_sqs=[f.clone() for f in fp32], max_exp_avg_sqs=[f.clone() for f in fp32] if amsgrad else [],
            masters=[f.clone() for f in fp32] if full["master"] else [], steps=[torch.ones(()) for _ in sizes],
            param_ids=list(range(len(sizes))), index_bases=[3, 10, 0], seed=full["seed"],
            noise_step=torch.ones(1, dtype=torch.int64), lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=1e-2, amsgrad=amsgrad, maximize=full["maximize"], noise_loc=0.0,
            noise_scale=5e-4 if noisy else 0.0, alphas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), k_max=7,
            distribution=full["noise"] if noisy else "laplace", restore=restore, apply_offset=apply_offset))

    return record((triton_step._step_scales_kernel, triton_step._fused_step_kernel), launch, _step_label(options))


def all_step_options() -> Iterator[dict]:
    """Every combination of STEP_OPTIONS."""
    names = list(STEP_OPTIONS)
    for values in itertools.product(*(STEP_OPTIONS[n] for n in names)):
        yield dict(zip(names, values))


def unique(launches: list[Launch], arches=ARCHES) -> list[tuple[Launch, int]]:
    """(launch, arch) pairs with one representative per distinct compiled kernel."""
    seen, out = set(), []
    for launch in launches:
        for arch in arches:
            key = variant_key(launch, arch)
            if key not in seen:
                seen.add(key)
                out.append((launch, arch))
    return out


def test_kernel_launches() -> list[Launch]:
    """The launches of the test kernels in python_tests/test_noise.py (imported from there)."""
    tests_dir = os.path.join(os.path.dirname(__file__), "..", "python_tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import test_noise

    return test_noise.aot_launches(record)


def _compile_job(job) -> Result:
    launch, arch, keep_sass = job
    return compile_launch(launch, arch, keep_sass)


def compile_all(pairs: list[tuple[Launch, int]], workers: int, keep_sass: bool = False) -> list[Result]:
    """Compile (launch, arch) pairs on ``workers`` processes."""
    jobs = [(launch, arch, keep_sass) for launch, arch in pairs]
    if workers <= 1:
        return [_compile_job(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_job, jobs))


def coverage(launches: list[Launch], arch: int = 90) -> set:
    """(kernel, parameter, type or constexpr value, attributes) of every parameter of every launch."""
    seen = set()
    for launch in launches:
        source, _, _ = bind(launch, arch)
        for index, (name, kind) in enumerate(source.signature.items()):
            value = source.constants.get((index,), kind)
            seen.add((launch.kernel, name, repr(value), repr(source.attrs.get((index,)))))
    return seen


def one_option_at_a_time() -> list[Launch]:
    """Launches with each STEP_OPTIONS value once, the others at their defaults."""
    return [launch for name, values in STEP_OPTIONS.items() for value in values
            for launch in step_launches({name: value})]


def main(argv=None) -> int:
    """Compile the CI subset or the full set; print one line per variant; exit 1 on any compile
    error, spill or approximate division or square root outside the noise (``inexact_ops``), or when the CI subset misses a parameter type or constexpr value that some
    single launcher option produces."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--set", choices=("ci", "full"), default="ci")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the results (without SASS) to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: ahead-of-time compilation needs real JITFunctions")

    options = CI_STEP_VARIANTS if args.set == "ci" else list(all_step_options())
    launches = [launch for o in options for launch in step_launches(o)] + test_kernel_launches()
    failures = 0
    if args.set == "ci":
        missing = coverage(one_option_at_a_time()) - coverage(launches)
        for kernel, name, value, attrs in sorted(missing):
            print(f"FAIL not covered by the CI subset: {kernel} {name} = {value} {attrs}")
        failures += len(missing)
    pairs = unique(launches)
    results = compile_all(pairs, args.workers)
    for r in results:
        bad = r.error is not None or r.local_bytes > 0 or r.spills > 0 or bool(r.inexact)
        failures += bad
        status = r.error or (f"{r.registers} registers, {r.local_bytes} B local, {r.spills} spill instructions, "
                             f"{len(r.inexact)} approximate div/sqrt outside the noise")
        if r.inexact:
            status += ": " + ", ".join(sorted(set(r.inexact)))
        print(f"{'FAIL' if bad else 'ok  '} sm_{r.arch} {r.label}: {status}", flush=True)
    print(f"{len(results)} variants compiled (triton {triton.__version__}), {failures} failures")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"spills": r.spills} for r in results], f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
