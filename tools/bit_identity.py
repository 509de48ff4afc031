"""Save the tensors of short MergOPT runs, to compare two versions of the optimizer bit for bit.

    PYTHONPATH=<tree> python -m tools.bit_identity --out before.pt   # in the old tree
    PYTHONPATH=<tree> python -m tools.bit_identity --out after.pt    # in the new tree
    python -m tools.bit_identity --compare before.pt after.pt

Each run covers a path of the optimizer: fp32 and bf16 parameters, amsgrad, a noise-off group,
a frozen parameter, a parameter written from outside, options changed between steps,
clean_weights(), a state-dict round trip, and MergOpt around SGD; on the torch backend, and on
the native op when it is built. The saved tensors are the parameters, the state and the clean
weights after every step.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mergopt_kernels import FusedMergOptAdamW, MergOpt
from mergopt_kernels.ops import native


def _model(dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(13, 29), torch.nn.Tanh(), torch.nn.Linear(29, 7))
    return model.to(dtype)


def _run(kind: str, dtype: torch.dtype, backend: str, steps: int = 5) -> dict:
    model = _model(dtype, seed=3)
    params = list(model.parameters())
    params[-1].requires_grad_(False)  # a frozen bias: never perturbed
    groups = [{"params": params[:2]}, {"params": params[2:3], "noise_scale": 0.0}, {"params": params[3:]}]
    if kind == "mergopt_sgd":
        opt = MergOpt(torch.optim.SGD(groups, lr=0.05, momentum=0.9), seed=11, backend=backend)
    else:
        opt = FusedMergOptAdamW(groups, lr=3e-3, weight_decay=0.1, amsgrad=kind == "amsgrad", seed=11,
                                backend=backend)
    torch.manual_seed(5)
    data = [(torch.randn(8, 13).to(dtype), torch.randn(8, 7).to(dtype)) for _ in range(steps)]
    saved = {}
    for t, (x, y) in enumerate(data):
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        if t == 2:
            opt.param_groups[0]["noise_scale"] = 1e-3  # options changed between steps
        if t == 3:
            with torch.no_grad():
                params[2].mul_(0.5)  # written from outside: clean theta
        opt.step()
        opt.zero_grad()
        saved[f"step{t}/params"] = [p.detach().clone() for p in params]
        with opt.clean_weights():
            saved[f"step{t}/clean"] = [p.detach().clone() for p in params]
    state = opt.state_dict()
    opt.load_state_dict(state)
    saved["reloaded/params"] = [p.detach().clone() for p in params]
    saved["state"] = {k: v for k, v in opt.state_dict()["state"].items()}
    return saved


def collect() -> dict:
    backends = ["torch"] + (["native"] if native.available() else [])
    results = {}
    for backend in backends:
        for kind in ("adamw", "amsgrad", "mergopt_sgd"):
            for dtype in (torch.float32, torch.bfloat16):
                results[f"{backend}/{kind}/{dtype}"] = _run(kind, dtype, backend)
    return results


def _flatten(value, prefix: str = ""):
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}/{i}")


def compare(before: dict, after: dict) -> int:
    """Print every tensor that differs (in bits) or is missing; return their count."""
    a, b = dict(_flatten(before)), dict(_flatten(after))
    bad = sorted(set(a) ^ set(b))
    bad += [k for k in sorted(set(a) & set(b)) if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
            or not torch.equal(a[k].view(-1).view(torch.uint8) if a[k].numel() else a[k],
                               b[k].view(-1).view(torch.uint8) if b[k].numel() else b[k])]
    for k in bad:
        print("differs:", k)
    print(f"{len(a)} tensors compared, {len(bad)} differ")
    return len(bad)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="save this tree's tensors here")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    if args.compare:
        return int(compare(*(torch.load(path) for path in args.compare)) > 0)
    torch.save(collect(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
