"""Static cost model of the Triton step: the compiler's own numbers as a CPU-visible proxy for GPU speed.

Each main launch variant of the fused step is recorded from the real launcher and compiled for
sm_90 (``tools/triton_aot.py``). From the full-block kernel (the one interior blocks
of every aligned tensor run) it reports registers, spills, shared memory, 128-bit accesses and
SASS instructions per element and per byte moved, against the instruction/bandwidth balance of
H100 and H200, and writes the table into bench/RESULTS.md between its markers.

    python -m bench.kernel_cost            # TRITON_INTERPRET must be unset
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys

import torch
import triton

from tools import triton_aot

RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")
BEGIN, END = "<!-- kernel-cost:begin -->", "<!-- kernel-cost:end -->"

# Lane-instructions per second: 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz (boost clock of
# H100 SXM and H200), one warp-instruction per scheduler and cycle.
ISSUE_RATE = 132 * 4 * 32 * 1.98e9
HBM = {"H100 SXM": 3.35e12, "H200": 4.8e12}   # bytes per second
TARGET_PER_BYTE = 4.5

MAIN_VARIANTS = (
    dict(dtype=torch.float32, noise="laplace", mode="restore+apply"),
    dict(dtype=torch.float32, noise="gaussian", mode="restore+apply"),
    dict(dtype=torch.float32, noise="off", mode="restore+apply"),
    dict(dtype=torch.float32, noise="laplace", mode="restore+apply", amsgrad=True),
    dict(dtype=torch.float32, noise="laplace", mode="restore+apply", maximize=True, lr_tensor=True),
    dict(dtype=torch.bfloat16, master=True, noise="laplace", mode="restore+apply"),
    dict(dtype=torch.bfloat16, master=True, noise="gaussian", mode="restore+apply"),
    dict(dtype=torch.bfloat16, master=True, noise="off", mode="restore+apply"),
    dict(dtype=torch.float16, master=True, noise="laplace", mode="restore+apply"),
)


def bytes_per_element(options: dict) -> int:
    """HBM bytes one element of a full block moves in the AdamW step of these options."""
    full = {k: v[0] for k, v in triton_aot.STEP_OPTIONS.items()} | options
    item = torch.empty((), dtype=full["dtype"]).element_size()
    moved = item + 16                                   # grad read; exp_avg, exp_avg_sq read + write
    moved += item + 8 if full["master"] else 2 * item   # master read + write, param write; or param read + write
    return moved + (8 if full["amsgrad"] else 0)


_STUB_OPCODES = ("CALL", "MOV", "IMAD.MOV", "HFMA2.MMA", "BSSY", "BSYNC", "BRA")


def main_path(sass: str) -> list[str]:
    """SASS instructions of the kernel body up to its first EXIT: the path a full block takes
    (with a gradient) plus the untaken arm of uniform branches. Left out: the subroutines after
    EXIT (the slow paths of IEEE division and square root) and the blocks that call them, which
    a forward branch skips unless an operand is out of the fast path's range (a square root of
    0 or below 2**-101, a division that FCHK flags)."""
    body = []   # (address, opcode, branch target or None)
    for line in sass.splitlines():
        match = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(0x[0-9a-f]+)?", line)
        if match:
            address, predicate, opcode, target = match.groups()
            branch = int(target, 16) if opcode == "BRA" and predicate and target else None
            body.append((int(address, 16), opcode, branch))
            if opcode == "EXIT":
                break
    skipped = set()
    for address, _, target in body:
        if target is not None and target > address:
            block = [(a, op) for a, op, _ in body if address < a < target]
            # A call stub: the call, the moves of its operands and result, a branch back.
            if any(op.startswith("CALL") for _, op in block) and all(op.startswith(_STUB_OPCODES) for _, op in block):
                skipped.update(a for a, _ in block)
    return [opcode for address, opcode, _ in body if address not in skipped]


def measure(options: dict, arch: int = 90) -> dict:
    """Compiler numbers of the full-block kernel of one variant."""
    launch = next(l for l in triton_aot.step_launches(options) if l.kwargs.get("FULL"))
    result = triton_aot.compile_launch(launch, arch, keep_sass=True)
    if result.error:
        raise RuntimeError(f"{launch.label}: {result.error}")
    source, _, _ = triton_aot.bind(launch, arch)
    elements_per_thread = 4 * launch.kwargs["BLOCK_G"] // (32 * 4)
    body = main_path(result.sass)
    per_element = len(body) / elements_per_thread
    moved = bytes_per_element(options)
    return dict(label=launch.label, registers=result.registers, spills=result.spills, local=result.local_bytes,
                shared=result.shared_bytes, wide=sum(op.startswith(("LDG", "STG")) and op.endswith(".128") for op in body),
                half=sum(op.startswith(("LDG", "STG")) and op.endswith(".64") for op in body),
                scalar=sum(op.startswith(("LDG", "STG")) and not op.endswith((".128", ".64")) for op in body),
                fp64=sum(op.startswith(("DFMA", "DMUL", "DADD")) for op in body),
                sync=sum(op.startswith(("BAR", "LDS", "STS")) for op in body),
                per_element=per_element, bytes=moved, per_byte=per_element / moved)


def table(rows: list[dict]) -> str:
    """The markdown section between the markers."""
    balance = {name: ISSUE_RATE / bandwidth for name, bandwidth in HBM.items()}
    lines = [
        BEGIN,
        "## Triton step: static cost (sm_90)",
        "",
        f"Regenerate with `python -m bench.kernel_cost` (TRITON_INTERPRET unset; compiles on the CPU, no GPU "
        f"needed); {datetime.date.today().isoformat()}, triton {triton.__version__}, torch {torch.__version__}. The full-block kernel of each "
        "variant (interior blocks of 16-byte aligned tensors; 2048 elements, 4 warps, 16 elements per "
        "thread), SASS counted on the body up to EXIT: both arms of uniform branches counted; the "
        "slow paths of the IEEE division and square root of the update (subroutines after EXIT, and the "
        "blocks that call them, which run only for a second moment of 0 or below 2**-101 or a quotient "
        "FCHK flags) not. Balance = issue rate / HBM bandwidth, issue rate = "
        "132 SMs x 4 schedulers x 32 lanes x 1.98 GHz = 33.4 T lane-instructions/s: "
        + ", ".join(f"{name} {value:.1f} instructions/byte" for name, value in balance.items())
        + f". Target: at most {TARGET_PER_BYTE:g} instructions/byte.",
        "",
        "Alignment: the launcher checks on the host that every address of a tensor is 16-byte aligned and "
        "its index base a multiple of 4; only then do its interior blocks run the full-block kernel, which "
        "states the alignment to the compiler with `tl.multiple_of`. fp32 columns get 128-bit accesses, 16-bit "
        "columns 64-bit ones (four elements per access in every column keeps one register layout: no shuffle "
        "through shared memory). Other LDG/STG are the per-block table and scalar loads. Compiled for sm_80 "
        "and on triton 3.6 the same variants have no spills either (`make aot-full`, `python -m tools.triton_aot`).",
        "",
        "| variant | registers | spills | shared B | LDG/STG 128-bit | 64-bit | 32-bit and narrower | fp64 ops "
        "| barriers+LDS/STS | instr/element | bytes/element | instr/byte | memory-bound on |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        bound = ", ".join(name for name, value in balance.items() if r["per_byte"] < value) or "neither"
        lines.append(f"| {r['label']} | {r['registers']} | {r['spills'] + r['local']} | {r['shared']} | {r['wide']} "
                     f"| {r['half']} | {r['scalar']} | {r['fp64']} | {r['sync']} | {r['per_element']:.1f} | {r['bytes']} "
                     f"| {r['per_byte']:.2f} | {bound} |")
    worst = max(rows, key=lambda r: r["per_byte"])
    verdict = "meets" if worst["per_byte"] <= TARGET_PER_BYTE else "misses"
    lines += ["", f"Worst variant: {worst['label']} at {worst['per_byte']:.2f} instructions/byte: {verdict} the "
              f"{TARGET_PER_BYTE:g} instructions/byte target.", END]
    return "\n".join(lines)


def write(section: str, path: str = RESULTS) -> None:
    """Replace the marked section of RESULTS.md (appended when the markers are missing)."""
    with open(path) as f:
        text = f.read()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    """Measure the main variants, print the table and write it into bench/RESULTS.md."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the cost model compiles real kernels")
    section = table([measure(options) for options in MAIN_VARIANTS])
    print(section)
    if not args.no_write:
        write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
