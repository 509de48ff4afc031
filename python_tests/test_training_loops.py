"""FusedMergOptAdamW in the training loops people write: AMP with a GradScaler that skips
steps, gradient accumulation with clipping, state dicts without their top-level "mergopt" entry
(as torch.distributed.checkpoint hands them back), and apply_perturbation()."""

from __future__ import annotations

import copy

import pytest
import torch

from mergopt_kernels import FusedMergOptAdamW
from test_fused_adamw import EPS32, within_twice_fp32_error

NOISE = dict(noise_scale=0.05, lr=1e-2, weight_decay=0.05)


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).to(dtype)


def batches(n, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randn(size, 2, generator=g)) for _ in range(n)]


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def amp_run(seed, data, overflow_at=None, drop=None):
    """bf16 autocast + GradScaler; ``overflow_at`` puts an inf into one gradient of that step,
    ``drop`` leaves that batch out altogether. Returns the clean weights and the losses."""
    model = mlp()
    opt = FusedMergOptAdamW(model.parameters(), seed=seed, **NOISE)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    losses = []
    for i, (x, y) in enumerate(data):
        if i == drop:
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if i == overflow_at:
            model[0].weight.grad[0, 0] = float("inf")
            before, step_before, scale_before = weights(model), opt.noise_step(), scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i == overflow_at:  # skipped: the parameters keep exactly their perturbation
            assert scaler.get_scale() < scale_before
            assert opt.noise_step() == step_before
            for p, q in zip(model.parameters(), before):
                assert torch.equal(p, q)
        else:
            losses.append(loss.item())
    with opt.clean_weights():
        return weights(model), losses


def test_grad_scaler_skipped_step_leaves_the_run_as_if_the_batch_were_not_there(shifted_seed):
    data = batches(6)
    skipped, losses_skipped = amp_run(shifted_seed, data, overflow_at=2)
    dropped, losses_dropped = amp_run(shifted_seed, data, drop=2)
    # The scales differ by a power of two after the overflow: the unscaled gradients are equal.
    assert losses_skipped == losses_dropped
    for p, q in zip(skipped, dropped):
        assert torch.equal(p, q)


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_accumulation_and_clipping_match_the_paper_reference(micro_batches, shifted_seed):
    from mergopt_kernels.reference import ReferenceMergOpt

    model, ref32, ref64 = mlp(), mlp(), mlp(dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    opt = FusedMergOptAdamW(model.parameters(), seed=shifted_seed, **NOISE)
    noise_kwargs = dict(seed=shifted_seed, noise_scale=NOISE["noise_scale"])
    refs = [ReferenceMergOpt(list(m.parameters()), lr=NOISE["lr"], weight_decay=NOISE["weight_decay"],
                             **noise_kwargs) for m in (ref32, ref64)]
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(module.weight.detach().clone()))
    steps = 5
    for x, y in batches(steps):
        for net, ref in [(model, None), *zip((ref32, ref64), refs)]:
            if ref is not None:
                ref.perturb()
            for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
                xs, ys = xs.to(net[0].weight.dtype), ys.to(net[0].weight.dtype)
                (torch.nn.functional.mse_loss(net(xs), ys) / micro_batches).backward()
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.05)
            assert norm > 0.05  # the clipping is active
            if ref is None:
                # Every micro-batch of the step saw the same perturbed weights, the reference's.
                assert len(seen) == micro_batches and all(torch.equal(w, seen[0]) for w in seen)
                perturbed_first_layer = seen[0]
                seen.clear()
                opt.step()
            else:
                if ref is refs[0]:
                    # The perturbed point agrees with ours up to the rounding of one restore.
                    torch.testing.assert_close(ref32[0].weight.detach(), perturbed_first_layer,
                                               rtol=4 * EPS32, atol=4 * EPS32)
                ref.step()
            net.zero_grad()
    with opt.clean_weights():
        within_twice_fp32_error(list(model.parameters()), list(ref32.parameters()),
                                list(ref64.parameters()), steps)


def test_state_dict_carries_the_noise_state_in_its_param_groups(fresh_seed):
    model = mlp()
    opt = FusedMergOptAdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "noise_scale": 0.0}],
                            seed=fresh_seed, **{k: v for k, v in NOISE.items() if k != "noise_scale"})
    for x, y in batches(3):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    assert sd["mergopt"] == {"seed": fresh_seed, "noise_step": 4}
    for group in sd["param_groups"]:
        assert (group["mergopt_seed"], group["mergopt_noise_step"]) == (fresh_seed, 4)
    with opt.clean_weights():
        clean = copy.deepcopy(model.state_dict())

    # As torch.distributed.checkpoint returns it: only "state" and "param_groups".
    fresh = mlp(seed=7)
    fresh.load_state_dict(clean)
    opt2 = FusedMergOptAdamW([{"params": fresh[0].parameters()}, {"params": fresh[2].parameters()}], seed=1)
    opt2.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
    assert opt2.seed == fresh_seed and opt2.noise_step() == 4
    # The live groups hold the keys too: flattened DCP state dicts are rebuilt from them.
    assert all((g["mergopt_seed"], g["mergopt_noise_step"]) == (fresh_seed, 4) for g in opt2.param_groups)
    for p, q in zip(fresh.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=2 * EPS32, atol=2 * EPS32)


@pytest.mark.parametrize("groups, match", [
    ([{"mergopt_seed": 1, "mergopt_noise_step": 2}, {"mergopt_seed": 3, "mergopt_noise_step": 2}], "mergopt"),
    ([{"mergopt_seed": 1, "mergopt_noise_step": 2}, {}], "mergopt"),
    ([{"mergopt_seed": -1, "mergopt_noise_step": 2}, {"mergopt_seed": -1, "mergopt_noise_step": 2}], "seed"),
    ([{"mergopt_seed": 1, "mergopt_noise_step": -2}, {"mergopt_seed": 1, "mergopt_noise_step": -2}], "noise_step"),
    ([{"mergopt_seed": 1, "mergopt_noise_step": 2**32}, {"mergopt_seed": 1, "mergopt_noise_step": 2**32}],
     "noise_step"),
])
def test_load_state_dict_with_bad_noise_state_raises_and_touches_nothing(groups, match):
    model = mlp()
    opt = FusedMergOptAdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}], seed=5)
    sd = opt.state_dict()
    del sd["mergopt"]
    for group, noise_state in zip(sd["param_groups"], groups):
        del group["mergopt_seed"], group["mergopt_noise_step"]
        group.update(noise_state)
    before = weights(model)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert opt.seed == 5 and opt.noise_step() == 1
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_perturbation_undoes_remove_perturbation(dtype, shifted_seed):
    model = mlp(dtype=dtype)
    twin = copy.deepcopy(model)
    opt = FusedMergOptAdamW(model.parameters(), seed=shifted_seed, **NOISE)
    twin_opt = FusedMergOptAdamW(twin.parameters(), seed=shifted_seed, **NOISE)
    perturbed = weights(model)
    opt.apply_perturbation()  # already perturbed: nothing happens
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed))
    opt.remove_perturbation()
    clean = weights(model)
    assert not all(torch.equal(p, q) for p, q in zip(clean, perturbed))
    opt.apply_perturbation()
    opt.apply_perturbation()
    tol = 2 * (EPS32 if dtype == torch.float32 else 2.0**-8)
    for p, q in zip(model.parameters(), perturbed):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    # Training goes on as if the perturbation had never been removed.
    for x, y in batches(2):
        for net, o in ((model, opt), (twin, twin_opt)):
            torch.nn.functional.mse_loss(net(x.to(dtype)).float(), y).backward()
            o.step()
            o.zero_grad()
    with opt.clean_weights(), twin_opt.clean_weights():
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=4 * tol, atol=4 * tol)


def test_load_state_dict_inside_clean_weights_perturbs_once(fresh_seed):
    model = mlp()
    opt = FusedMergOptAdamW(model.parameters(), seed=fresh_seed, **NOISE)
    for x, y in batches(2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    with opt.clean_weights():
        clean = copy.deepcopy(model.state_dict())
    perturbed = weights(model)

    fresh = mlp(seed=3)
    opt2 = FusedMergOptAdamW(fresh.parameters(), seed=0, **NOISE)
    with opt2.clean_weights():
        fresh.load_state_dict(clean)
        opt2.load_state_dict(sd)
    for p, q in zip(fresh.parameters(), perturbed):
        torch.testing.assert_close(p, q, rtol=2 * EPS32, atol=2 * EPS32)


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd["param_groups"].pop(), "param_groups"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), "param_groups"),
    (lambda sd: sd["param_groups"][1].update(k_max=0), "k_max"),
    (lambda sd: sd["param_groups"][0].update(lr=-1.0), "lr"),
    (lambda sd: sd["state"][0].update(exp_avg="zeros"), "exp_avg"),
], ids=["groups", "sizes", "noise-option", "adam-option", "state-entry"])
def test_load_state_dict_with_a_bad_entry_raises_and_touches_nothing(corrupt, match, fresh_seed):
    model = mlp()
    opt = FusedMergOptAdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}], seed=fresh_seed)
    for x, y in batches(2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = weights(model)
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert opt.noise_step() == 3 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for p, saved in zip(model.parameters(), state_before):
        assert opt.state[p].keys() == saved.keys() and all(torch.equal(opt.state[p][k], v) for k, v in saved.items())
    for x, y in batches(1):  # and training goes on
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
