"""The parameters are the user's (docs/optimizer.md, semantics 7), for FusedMergOptAdamW and MergOpt:
weights written from outside become the clean theta, frozen parameters are never perturbed,
moved or cast parameters are followed (or refused with what to do), a training checkpoint
resumes bit for bit, and seed=None leaves torch's random stream alone."""

from __future__ import annotations

import copy

import pytest
import torch

from mergopt_kernels import FusedMergOptAdamW, MergOpt, noise

EPS32 = 2.0**-23
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)  # the default alphas
KINDS = ["fused", "mergopt"]
ORDERS = ["weights-then-optimizer", "optimizer-then-weights"]
DTYPES = [torch.float32, torch.bfloat16]
LR, WEIGHT_DECAY, NOISE_SCALE = 1e-2, 0.05, 1e-2


def build(kind: str, params, seed: int):
    """The optimizer under test; the torch backend, whose AdamW is torch's bit for bit."""
    if kind == "fused":
        return FusedMergOptAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, noise_scale=NOISE_SCALE,
                                 seed=seed, backend="torch")
    return MergOpt(base_optimizer(kind, params), noise_scale=NOISE_SCALE, seed=seed, backend="torch")


def base_optimizer(kind: str, params):
    """What the optimizer under test runs without its noise."""
    if kind == "fused":
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, foreach=False)


def mlp(dtype=torch.float32, init_seed=0) -> torch.nn.Module:
    torch.manual_seed(init_seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def clean(opt, model) -> list[torch.Tensor]:
    with opt.clean_weights():
        return weights(model)


def train(model, opt, steps: int, data_seed: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(data_seed)
    dtype = next(model.parameters()).dtype
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g).to(dtype), torch.randn(8, 3, generator=g).to(dtype)
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def fixed_grads(params, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def assert_within_one_restore(ours, reference, perturbed):
    """fp32 theta read back through a restore: fl(fl(theta + d) - d) is within half an ulp of
    |theta| + |d| of theta, twice (the add and the subtract): at most EPS32 * (|theta| + |d|)."""
    for a, r, p in zip(ours, reference, perturbed):
        bound = EPS32 * (r.abs() + (p - r).abs())
        assert bool(((a - r).abs() <= bound).all()), (a - r).abs().max().item()


def write(model, values, how: str) -> None:
    if how == "load_state_dict":
        model.load_state_dict(dict(zip(model.state_dict(), values)))
    else:
        with torch.no_grad():
            for p, v in zip(model.parameters(), values):
                p.copy_(v)


@pytest.mark.parametrize("how", ["load_state_dict", "copy_"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_weights_written_after_construction_are_the_clean_weights(kind, dtype, how, shifted_seed):
    """The common order: model and optimizer first, then a checkpoint loaded into the model.
    The loaded values are theta: read back exactly, and the next step starts from them."""
    loaded = weights(mlp(dtype, init_seed=1))
    model = mlp(dtype)
    opt = build(kind, model.parameters(), shifted_seed)
    write(model, loaded, how)
    for p, v in zip(clean(opt, model), loaded):
        assert torch.equal(p, v)
    assert any(not torch.equal(p, v) for p, v in zip(model.parameters(), loaded))  # perturbed again

    model = mlp(dtype)  # a step right after the write (clean_weights() above perturbs them again)
    opt = build(kind, model.parameters(), shifted_seed)
    write(model, loaded, how)
    grads = fixed_grads(loaded, seed=2)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    # The base optimizer from the loaded values: in fp32 for FusedMergOptAdamW (its masters and
    # moments are fp32), in the parameters' dtype for MergOpt (the base steps the parameters).
    ref_dtype = torch.float32 if kind == "fused" else dtype
    reference = [torch.nn.Parameter(v.to(ref_dtype)) for v in loaded]
    for r, g in zip(reference, grads):
        r.grad = g.to(ref_dtype)
    base_optimizer(kind, reference).step()
    ours = clean(opt, model)
    if dtype == torch.float32:
        assert_within_one_restore(ours, [r.detach() for r in reference], weights(model))
    else:  # the master holds theta exactly
        for p, r in zip(ours, reference):
            assert torch.equal(p, r.detach().to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_weights_written_through_data_are_taken_after_weights_written(kind, dtype, shifted_seed):
    """``p.data`` has its own version counter: such writes are declared with weights_written()."""
    model = mlp(dtype)
    opt = build(kind, model.parameters(), shifted_seed)
    loaded = weights(mlp(dtype, init_seed=1))
    for p, v in zip(model.parameters(), loaded):
        p.data.copy_(v)
    opt.weights_written(model[0].parameters())
    opt.weights_written()
    for p, v in zip(clean(opt, model), loaded):
        assert torch.equal(p, v)
    with pytest.raises(ValueError, match="weights_written"):
        opt.weights_written([torch.nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_frozen_parameters_are_never_perturbed_and_join_or_leave_cleanly(kind, dtype, shifted_seed):
    model = mlp(dtype)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    start = frozen.detach().clone()
    others = [p.detach().clone() for p in model.parameters() if p is not frozen]
    opt = build(kind, model.parameters(), shifted_seed)
    assert any(not torch.equal(p, q) for p, q in zip([p for p in model.parameters() if p is not frozen], others))
    train(model, opt, 5)
    assert torch.equal(frozen, start)  # bit for bit: never written

    frozen.requires_grad_(True)  # joins: trained and perturbed from its clean value on
    train(model, opt, 2, data_seed=3)
    theta = clean(opt, model)[0]
    assert not torch.equal(theta, start)
    s_t = noise.step_scale(opt.seed, opt.noise_step(), ALPHAS, 7)
    assert torch.equal(frozen, theta) == (s_t == 0.0)  # perturbed unless K alpha = 1 this step

    frozen.requires_grad_(False)  # leaves: the next step restores it, then it stays
    train(model, opt, 3, data_seed=4)
    assert torch.equal(frozen, theta)
    assert torch.equal(clean(opt, model)[0], theta)


def test_a_parameter_cast_while_perturbed_without_an_exact_copy_raises_with_what_to_do(shifted_seed):
    model = mlp()
    opt = build("fused", model.parameters(), shifted_seed)
    model.to(torch.bfloat16)
    before = weights(model)
    with pytest.raises(ValueError, match="remove_perturbation"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    model.double()
    with pytest.raises(TypeError, match="torch.float64"):
        opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_a_clean_model_cast_after_construction_trains_as_if_built_cast(kind, shifted_seed):
    model = mlp()
    opt = build(kind, model.parameters(), shifted_seed)
    opt.remove_perturbation()
    model.to(torch.bfloat16)
    twin = copy.deepcopy(model)
    opt.apply_perturbation()  # follows the cast: bf16 parameters, fp32 masters
    twin_opt = build(kind, twin.parameters(), shifted_seed)
    assert train(model, opt, 3) == train(twin, twin_opt, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == twin_opt.state[q].keys()


def test_a_bf16_model_cast_to_fp32_while_perturbed_keeps_theta_exactly(shifted_seed):
    model = mlp(torch.bfloat16)
    opt = build("fused", model.parameters(), shifted_seed)
    train(model, opt, 2)
    masters = [opt.state[p]["master"].clone() for p in model.parameters()]
    model.float()
    for p, m in zip(clean(opt, model), masters):
        assert torch.equal(p, m)
    assert all("master" not in opt.state[p] for p in model.parameters())
    train(model, opt, 1)


CHECKPOINTS = [
    # Clean weights and the default state_dict(), saved inside clean_weights(): the run that
    # saved went through the restore and re-perturbation too, so both runs are the same, if the
    # weights are loaded after the optimizer is built (building it first perturbs fp32 weights,
    # and load_state_dict() must then restore them: one rounding). FusedMergOptAdamW's bf16
    # masters are in its state dict; MergOpt's need "perturbed".
    ("clean-export", "fused", torch.float32, "optimizer-then-weights"),
    ("clean-export", "mergopt", torch.float32, "optimizer-then-weights"),
    *[("clean-export", "fused", torch.bfloat16, order) for order in ORDERS],
    # No clean_weights() round trip: the weights as they are and state_dict(perturbed=True).
    *[("perturbed", kind, dtype, order) for kind in KINDS for dtype in DTYPES for order in ORDERS],
]


@pytest.mark.parametrize("checkpoint, kind, dtype, loader_order", CHECKPOINTS, ids=lambda v: str(v))
def test_a_checkpoint_resumes_bit_for_bit(checkpoint, kind, dtype, loader_order, fresh_seed):
    model = mlp(dtype)
    opt = build(kind, model.parameters(), fresh_seed)
    train(model, opt, 3)
    if checkpoint == "clean-export":
        with opt.clean_weights():
            saved_weights, saved_state = copy.deepcopy((model.state_dict(), opt.state_dict()))
    else:
        saved_weights, saved_state = copy.deepcopy((model.state_dict(), opt.state_dict(perturbed=True)))
    expected_losses = train(model, opt, 4, data_seed=5)
    expected = weights(model)

    resumed = mlp(dtype, init_seed=7)
    if loader_order == "weights-then-optimizer":
        resumed.load_state_dict(saved_weights)
        resumed_opt = build(kind, resumed.parameters(), fresh_seed ^ 1)
    else:
        resumed_opt = build(kind, resumed.parameters(), fresh_seed ^ 1)
        resumed.load_state_dict(saved_weights)
    resumed_opt.load_state_dict(saved_state)
    assert train(resumed, resumed_opt, 4, data_seed=5) == expected_losses
    for p, q in zip(resumed.parameters(), expected):
        assert torch.equal(p, q)


def test_seed_none_leaves_torch_random_stream_alone():
    """Dropout and shuffling draw what they draw in an AdamW run with the same manual_seed."""
    models = [mlp(), mlp()]
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    opts = [FusedMergOptAdamW(models[0].parameters(), seed=None),
            MergOpt(torch.optim.SGD(models[1].parameters(), lr=0.1), seed=None)]
    assert torch.equal(torch.rand(4), expected)
    assert opts[0].seed != opts[1].seed
