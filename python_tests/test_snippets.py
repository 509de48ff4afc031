"""The documentation's snippets, executed as written.

Each snippet is the code block after a ``<!-- snippet: NAME -->`` marker in README.md or a page
of docs/ (test_docs.py checks that every block is a snippet some test runs, or is marked
``<!-- not-run: reason -->``).
The tests give them small stand-ins for ``model``, ``loader``, ``loss_fn`` and the like;
without a GPU "cuda" becomes "cpu"."""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

import pytest
import torch

from dist_utils import run_ranks
from mergopt_kernels import FusedMergOptAdamW, noise

ROOT = Path(__file__).resolve().parent.parent


DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def snippet(name: str) -> str:
    """The code block after ``<!-- snippet: NAME -->`` in README.md or a page of docs/."""
    pattern = re.compile(rf"<!-- snippet: {re.escape(name)} -->\s*```\w*\n(.*?)```", re.S)
    found = [match.group(1) for path in DOC_FILES for match in pattern.finditer(path.read_text())]
    assert len(found) == 1, f"{len(found)} snippets named {name!r} in README.md and docs/"
    code = found[0]
    return code if torch.cuda.is_available() else code.replace('"cuda"', '"cpu"')


def run(name: str, namespace: dict) -> dict:
    exec(compile(snippet(name), f"<snippet {name}>", "exec"), namespace)
    return namespace


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 9), torch.nn.Linear(9, 2)])

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


def stand_ins(n_batches=8, device="cpu"):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(4, 6, generator=g).to(device), torch.randn(4, 2, generator=g).to(device))
              for _ in range(n_batches)]
    # torch and FusedMergOptAdamW: imported by the first snippet, which the others follow.
    return dict(model=Net().to(device), loader=loader, loss_fn=torch.nn.functional.mse_loss,
                torch=torch, FusedMergOptAdamW=FusedMergOptAdamW)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_attach(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run("attach", stand_ins(3))
    opt, model = ns["opt"], ns["model"]
    saved = torch.load("model.pt")
    assert opt.noise_step() == 4 and not model.training
    with opt.clean_weights():
        clean = {k: v.clone() for k, v in model.state_dict().items()}  # inside, they alias the parameters
        assert all(torch.equal(saved[k], v) for k, v in clean.items())  # the last save: theta_3
        x, y = ns["loader"][-1]
        assert torch.equal(ns["val_loss"], ns["loss_fn"](model(x), y))  # evaluated at theta_3
    model.train()
    model(x)
    if noise.step_scale(0, 4, opt.param_groups[0]["alphas"], 7) != 0.0:  # K alpha = 1: no shift
        assert not all(torch.equal(p, clean[k]) for k, p in model.named_parameters())


def test_readme_quick_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 512, generator=g), torch.randn(4, 512, generator=g)) for _ in range(3)]
    ns = run("readme", {"batches": batches})
    opt, model = ns["opt"], ns["model"]
    assert opt.noise_step() == 4
    with opt.clean_weights():
        clean = {k: v.clone() for k, v in model.state_dict().items()}
    saved = torch.load("expert.pt")
    assert all(torch.equal(saved[k], v) for k, v in clean.items())


def test_mergopt_around_sgd():
    ns = run("mergopt", stand_ins(2))
    opt, model = ns["opt"], ns["model"]
    assert isinstance(opt.base, torch.optim.SGD) and opt.seed == 0
    assert all(mine is base for mine, base in zip(opt.param_groups, opt.base.param_groups))  # the same dicts
    before = weights(model)
    for x, y in ns["loader"]:
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert opt.noise_step() == 3 and not all(torch.equal(a, b) for a, b in zip(before, weights(model)))


def test_plain_loop_and_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluated = []
    ns = stand_ins() | dict(evaluate=lambda model: evaluated.append(weights(model)))
    run("plain", ns)
    opt, model = ns["opt"], ns["model"]
    assert opt.noise_step() == 3  # 8 micro-batches, 4 per step
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-5 * (1 - 0.9 * 2 / 100))
    perturbed = weights(model)
    with opt.clean_weights():
        clean = weights(model)
    assert [torch.equal(a, b) for a, b in zip(evaluated[0], clean)] == [True] * len(clean)
    if noise.step_scale(0, 3, opt.param_groups[0]["alphas"], 7) != 0.0:  # K alpha = 1: no shift
        assert not all(torch.equal(a, b) for a, b in zip(clean, perturbed))

    ns["model"] = Net()  # a fresh process: other weights, other optimizer
    run("resume", ns)
    assert ns["opt"].seed == 0 and ns["opt"].noise_step() == 3
    for p, q in zip(ns["model"].parameters(), perturbed):
        assert torch.equal(p, q)  # the saving run re-perturbed the same clean weights


def test_switch_from_adamw(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = stand_ins(4)
    adamw = torch.optim.AdamW(ns["model"].parameters(), lr=3e-3, weight_decay=0.05)
    for x, y in ns["loader"]:
        torch.nn.functional.mse_loss(ns["model"](x), y).backward()
        adamw.step()
        adamw.zero_grad()
    torch.save(adamw.state_dict(), "adamw-checkpoint.pt")
    run("switch", ns)
    opt = ns["opt"]
    assert opt.seed == 0 and opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["weight_decay"] == 0.05
    for p in ns["model"].parameters():
        assert opt.state[p]["step"].item() == 4
        assert torch.equal(opt.state[p]["exp_avg_sq"], adamw.state[p]["exp_avg_sq"])


def test_amp():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ns = stand_ins(4, device)
    ns["opt"] = FusedMergOptAdamW(ns["model"].parameters(), lr=1e-2, seed=0)
    run("amp", ns)
    # float16 gradients of the loss scaled by 2**16 overflow at first: those steps are skipped.
    skipped = round(math.log2(65536.0 / ns["scaler"].get_scale()))
    assert skipped < 4 and ns["opt"].noise_step() == 5 - skipped


def test_compile():
    torch._dynamo.reset()
    ns = stand_ins(3)
    twin = copy.deepcopy(ns["model"])
    ns["opt"] = FusedMergOptAdamW(ns["model"].parameters(), lr=1e-2, seed=0)
    run("compile", ns)
    assert ns["opt"].noise_step() == 4
    twin_opt = FusedMergOptAdamW(twin.parameters(), lr=1e-2, seed=0)
    for x, y in ns["loader"]:
        torch.nn.functional.mse_loss(twin(x), y).backward()
        twin_opt.step()
        twin_opt.zero_grad()
    for p, q in zip(ns["model"].parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_hf_trainer(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(1))
    ns = dict(model=transformers.GPT2LMHeadModel(config),
              train_dataset=[{"input_ids": row, "labels": row} for row in ids])
    run("hf", ns)
    assert ns["trainer"].state.global_step == 100 and ns["opt"].noise_step() == 101
    saved = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    in_checkpoint = safetensors_torch.load_file(tmp_path / "out" / "checkpoint-100" / "model.safetensors")
    for name, value in saved.items():
        assert torch.equal(value, in_checkpoint[name])
        assert torch.equal(value, ns["model"].state_dict()[name])  # the model is left clean


def fsdp2_worker(rank, world_size, directory):
    os.chdir(directory)
    ns = stand_ins(3)
    run("fsdp2", ns)
    opt, model = ns["opt"], ns["model"]
    assert opt.noise_step() == 4 and opt.seed == 0
    assert type(model.layers[0].weight).__name__ == "DTensor"


def test_fsdp2(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    run_ranks(fsdp2_worker, str(tmp_path))
