"""FusedMergOptAdamW against torch.optim.AdamW (noise off), the paper reference (noise on) and a
float64 run; the perturbation seen by backward; clean weights, resume, determinism, bad input."""

import os
import subprocess
import sys

import pytest
import torch

from mergopt_kernels import FusedMergOptAdamW, MergOpt, noise
from mergopt_kernels.reference import ReferenceMergOpt

SHAPES = [(1,), (7,), (13, 17), (4099,)]
EPS32 = 2.0**-23


def make_params(shapes, device="cpu", dtype=torch.float32, generator=None):
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(device=device, dtype=dtype)) for s in shapes]


def gradient_of(p: torch.Tensor) -> torch.Tensor:
    """A gradient that depends on the weights the backward sees, not just on the step."""
    x = p.detach().double()
    return (torch.cos(3 * x) + 0.1 * x).to(p.dtype)


def set_grads(params):
    for p in params:
        p.grad = gradient_of(p)


def max_error(params, reference):
    return max((p.detach().double().cpu() - r.detach().double().cpu()).abs().max().item()
               for p, r in zip(params, reference))


def within_twice_fp32_error(ours, fp32_peer, float64_truth, steps):
    """flash-attention's criterion: our error is at most twice the fp32 peer's, plus rounding."""
    scale = max(r.detach().abs().max().item() for r in float64_truth)
    ours_error = max_error(ours, float64_truth)
    peer_error = max_error(fp32_peer, float64_truth)
    assert ours_error <= 2 * peer_error + steps * EPS32 * scale, (ours_error, peer_error)


OPTIONS = [
    dict(),
    dict(weight_decay=0.1, betas=(0.8, 0.95)),
    dict(amsgrad=True),
    dict(maximize=True, eps=1e-3),
    dict(amsgrad=True, maximize=True, weight_decay=0.0, lr=3e-2),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_noise_off_matches_torch_adamw(device_backend, options):
    device, backend = device_backend
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    ours = make_params(SHAPES, device, generator=g)
    peer = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    truth = [torch.nn.Parameter(p.detach().double().cpu()) for p in ours]
    kwargs = dict(lr=1e-2) | options
    opt = FusedMergOptAdamW(ours, noise_scale=0.0, backend=backend, **kwargs)
    peer_opt = torch.optim.AdamW(peer, foreach=False, **kwargs)
    truth_opt = torch.optim.AdamW(truth, foreach=False, **kwargs)
    steps = 25
    for _ in range(steps):
        for params, o in ((ours, opt), (peer, peer_opt), (truth, truth_opt)):
            set_grads(params)
            o.step()
    if backend == "torch":
        # Same operations in the same order as torch's single-tensor AdamW: bit for bit.
        for p, q in zip(ours, peer):
            assert torch.equal(p, q)
    else:
        within_twice_fp32_error(ours, peer, truth, steps)
    for p in ours:
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if kwargs.get("amsgrad") else set())
        assert state["step"].item() == steps


@pytest.mark.parametrize("distribution", ["laplace", "gaussian"])
def test_noise_on_matches_paper_reference(device_backend, distribution, fresh_seed):
    device, backend = device_backend
    noise_options = dict(noise_scale=2e-2, distribution=distribution, seed=fresh_seed)
    ours = make_params(SHAPES, device)
    ref32 = [torch.nn.Parameter(p.detach().clone().cpu()) for p in ours]
    ref64 = [torch.nn.Parameter(p.detach().double().cpu()) for p in ours]
    opt = FusedMergOptAdamW(ours, lr=1e-2, weight_decay=0.05, backend=backend, **noise_options)
    refs = [ReferenceMergOpt(r, lr=1e-2, weight_decay=0.05, **noise_options) for r in (ref32, ref64)]
    check_against_reference(opt, ours, refs, ref32, ref64, steps=20)


def check_against_reference(opt, ours, refs, ref32, ref64, steps):
    """Train ``opt`` and the fp32/fp64 paper references side by side; compare clean weights."""
    for _ in range(steps):
        set_grads(ours)
        opt.step()
        for ref, params in zip(refs, (ref32, ref64)):
            ref.perturb()
            set_grads(params)
            ref.step()
    with opt.clean_weights():
        within_twice_fp32_error(ours, ref32, ref64, steps)


def test_backward_sees_the_perturbed_weights(device_backend, fresh_seed):
    """Loss 1/2 |theta|^2: the gradient is exactly the weights the backward saw."""
    device, backend = device_backend
    params = make_params([(5, 3), (1001,)], device)
    opt = FusedMergOptAdamW(params, lr=1e-2, noise_scale=1e-2, seed=fresh_seed, backend=backend)
    for _ in range(6):
        t = opt.noise_step()
        with opt.clean_weights():
            clean = [p.detach().clone() for p in params]
        loss = sum(0.5 * (p**2).sum() for p in params)
        loss.backward()
        s = noise.step_scale(fresh_seed, t, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6), 7)
        for i, (p, theta) in enumerate(zip(params, clean)):
            z = noise.element_noise(fresh_seed, i, t, 0, p.numel(), 0.0, 1e-2, "laplace").view(p.shape)
            expected = theta.cpu() + s * z
            if s != 0.0:  # K alpha = 1 (e.g. K=2, alpha=0.5) is a step without shift
                assert not torch.equal(p.grad.cpu(), theta.cpu())
            # One rounding of the restore separates the clean weights from the forward's.
            torch.testing.assert_close(p.grad.cpu(), expected, rtol=2 * EPS32, atol=2 * EPS32)
        opt.step()
        opt.zero_grad()


def test_clean_weights_restores_exactly_up_to_rounding(device_backend, shifted_seed):
    device, backend = device_backend
    params = make_params(SHAPES, device)
    initial = [p.detach().clone() for p in params]
    opt = FusedMergOptAdamW(params, lr=1e-2, noise_scale=0.05, seed=shifted_seed, backend=backend)
    perturbed = [p.detach().clone() for p in params]
    assert any(not torch.equal(p, q) for p, q in zip(perturbed, initial))
    with opt.clean_weights():
        for p, q, r in zip(params, initial, perturbed):
            # fl(fl(theta + delta) - delta): two roundings, each half an ulp of at most
            # 2 max(|theta|, |delta|).
            delta = r - q
            bound = 2 * EPS32 * torch.maximum(q.abs(), delta.abs())
            assert ((p - q).abs() <= bound).all()
    for p, q in zip(params, perturbed):
        torch.testing.assert_close(p, q, rtol=2 * EPS32, atol=2 * EPS32)


def test_remove_perturbation_is_idempotent_and_training_resumes(device_backend, fresh_seed):
    device, backend = device_backend
    params = make_params(SHAPES, device)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = FusedMergOptAdamW(params, lr=1e-2, noise_scale=1e-2, seed=fresh_seed, backend=backend)
    twin_opt = FusedMergOptAdamW(twin, lr=1e-2, noise_scale=1e-2, seed=fresh_seed, backend=backend)
    for step in range(6):
        set_grads(params)
        set_grads(twin)
        if step == 3:  # e.g. an evaluation between backward and step
            opt.remove_perturbation()
            once = [p.detach().clone() for p in params]
            opt.remove_perturbation()
            assert all(torch.equal(p, q) for p, q in zip(params, once))
            with twin_opt.clean_weights():
                torch.testing.assert_close(once, [p.detach().clone() for p in twin], rtol=0, atol=0)
        opt.step()  # writes theta_{t+1} + s z_{t+1} whether or not the noise was there
        twin_opt.step()
    torch.testing.assert_close(params, twin, rtol=8 * EPS32, atol=8 * EPS32)


def test_param_without_grad_keeps_theta_and_follows_the_noise(device_backend, fresh_seed):
    device, backend = device_backend
    frozen, trained = make_params([(37,), (41,)], device)
    theta = frozen.detach().clone()
    opt = FusedMergOptAdamW([frozen, trained], lr=1e-2, noise_scale=1e-2, seed=fresh_seed, backend=backend)
    for _ in range(5):
        trained.grad = gradient_of(trained)
        opt.step()
    assert opt.state[frozen]["step"].item() == 0
    t = opt.noise_step()
    s = noise.step_scale(fresh_seed, t, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6), 7)
    z = noise.element_noise(fresh_seed, 0, t, 0, 37, 0.0, 1e-2, "laplace").to(device)
    torch.testing.assert_close(frozen.detach(), theta + s * z, rtol=6 * EPS32, atol=6 * EPS32)
    with opt.clean_weights():
        torch.testing.assert_close(frozen.detach(), theta, rtol=6 * EPS32, atol=6 * EPS32)


def test_noise_options_per_group(device_backend, fresh_seed):
    device, backend = device_backend
    weight, bias = make_params([(64,), (8,)], device)
    bias_before = bias.detach().clone()
    opt = FusedMergOptAdamW([{"params": [weight]}, {"params": [bias], "noise_scale": 0.0}],
                            lr=1e-2, noise_scale=1e-2, seed=fresh_seed, backend=backend)
    assert torch.equal(bias, bias_before)
    assert opt.param_groups[0]["noise_scale"] == 1e-2 and opt.param_groups[1]["noise_scale"] == 0.0


def test_lr_scheduler_and_tensor_lr_reach_the_update(device_backend):
    device, backend = device_backend
    ours = make_params(SHAPES, device)
    peer = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    truth = [torch.nn.Parameter(p.detach().double().cpu()) for p in ours]
    opts = [FusedMergOptAdamW(ours, lr=torch.tensor(0.05, device=device), noise_scale=0.0, backend=backend),
            torch.optim.AdamW(peer, lr=0.05, foreach=False), torch.optim.AdamW(truth, lr=0.05, foreach=False)]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.3) for o in opts]
    for _ in range(10):
        for params, o, sched in zip((ours, peer, truth), opts, schedulers):
            set_grads(params)
            o.step()
            sched.step()
    assert float(opts[0].param_groups[0]["lr"]) == pytest.approx(0.05 * 0.3**3)
    within_twice_fp32_error(ours, peer, truth, 10)


def _run(seed, backend="torch", steps=6, dtype=torch.float32):
    torch.manual_seed(1234)
    params = make_params(SHAPES, dtype=dtype)
    opt = FusedMergOptAdamW(params, lr=1e-2, noise_scale=1e-2, seed=seed, backend=backend)
    for _ in range(steps):
        set_grads(params)
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_same_seed_same_run_bitwise(backend, fresh_seed):
    a, _ = _run(fresh_seed, backend)
    b, _ = _run(fresh_seed, backend)
    c, _ = _run(fresh_seed ^ 1, backend)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_same_seed_same_run_in_another_process(fresh_seed):
    params, _ = _run(fresh_seed)
    digest = sum(float(p.detach().double().sum()) for p in params)
    code = ("import torch, test_fused_adamw as t;"
            f"ps, _ = t._run({fresh_seed}); print(repr(sum(float(p.detach().double().sum()) for p in ps)))")
    here = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout.strip()) == digest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_clean_weights_and_state_dict(device_backend, dtype, fresh_seed, tmp_path):
    _, backend = device_backend
    params, opt = _run(fresh_seed, backend=backend, dtype=dtype, steps=5)
    with opt.clean_weights():
        torch.save({"model": [p.detach().clone() for p in params], "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    for _ in range(5):
        set_grads(params)
        opt.step()
    with opt.clean_weights():
        uninterrupted = [p.detach().float().clone() for p in params]
    uninterrupted_masters = [opt.state[p].get("master") for p in params]

    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed = [torch.nn.Parameter(w.clone()) for w in checkpoint["model"]]
    new_opt = FusedMergOptAdamW(resumed, lr=1e-2, noise_scale=1e-2, seed=0, backend=backend)
    new_opt.load_state_dict(checkpoint["opt"])
    assert new_opt.seed == fresh_seed and new_opt.noise_step() == 6
    assert all(new_opt.state[p]["exp_avg"].dtype == torch.float32 for p in resumed)
    for _ in range(5):
        set_grads(resumed)
        new_opt.step()
    with new_opt.clean_weights():
        restart = [p.detach().float().clone() for p in resumed]
    if dtype == torch.float32:
        # Two extra restore roundings (construction noise, then checkpoint noise).
        torch.testing.assert_close(restart, uninterrupted, rtol=16 * EPS32, atol=16 * EPS32)
    else:
        # Masters carry fp32 theta through the checkpoint: the resumed run is the same run.
        for p, master in zip(resumed, uninterrupted_masters):
            assert torch.equal(new_opt.state[p]["master"], master)
        assert all(torch.equal(a, b) for a, b in zip(restart, uninterrupted))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_hold_their_master_rounded_to_nearest(device_backend, dtype, fresh_seed):
    """Without noise the parameter is its fp32 master rounded to nearest even, as torch rounds."""
    device, backend = device_backend
    params = make_params(SHAPES, device=device, dtype=dtype)
    opt = FusedMergOptAdamW(params, lr=1e-2, noise_scale=0.0, seed=fresh_seed, backend=backend)
    for _ in range(3):
        set_grads(params)
        opt.step()
    for p in params:
        assert torch.equal(p.detach(), opt.state[p]["master"].to(dtype))


def test_bf16_masters_do_not_drift(fresh_seed):
    """With the same gradients, bf16 parameters with fp32 masters follow the fp32 run, while
    restoring by subtraction in bf16 would drift by about an ulp of bf16 per step."""
    steps, n = 50, 4099
    theta = torch.randn(n) * 0.02
    grads = [torch.randn(n) for _ in range(steps)]
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(theta.to(dtype))
        opt = FusedMergOptAdamW([p], lr=1e-4, noise_scale=5e-4, seed=fresh_seed)
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        runs[dtype] = opt.state[p]["master"] if dtype != torch.float32 else opt_clean(opt, p)
    start = theta.to(torch.bfloat16).float()
    fp32_from_bf16_start = torch.nn.Parameter(start.clone())
    opt = FusedMergOptAdamW([fp32_from_bf16_start], lr=1e-4, noise_scale=5e-4, seed=fresh_seed)
    for g in grads:
        fp32_from_bf16_start.grad = g.to(torch.bfloat16).float()
        opt.step()
    fp32_run = opt_clean(opt, fp32_from_bf16_start)
    master_drift = (runs[torch.bfloat16] - fp32_run).abs().max().item()
    assert master_drift <= steps * EPS32 * fp32_run.abs().max().item()

    # What the master avoids: restore by subtraction in bf16, once per step.
    bf16 = start.to(torch.bfloat16)
    naive = bf16.clone()
    for step in range(1, steps + 1):
        delta = noise.step_scale(fresh_seed, step, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6), 7) * \
            noise.element_noise(fresh_seed, 0, step, 0, n, 0.0, 5e-4, "laplace")
        naive = ((naive.float() + delta).to(torch.bfloat16).float() - delta).to(torch.bfloat16)
    naive_drift = (naive.float() - bf16.float()).abs().max().item()
    assert naive_drift > 100 * master_drift


def opt_clean(opt, p):
    with opt.clean_weights():
        return p.detach().float().clone()


BAD_ARGUMENTS = [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    (dict(betas=0.9), ValueError, "betas"),
    (dict(noise_scale=-5e-4), ValueError, "noise_scale"),
    (dict(noise_scale=float("nan")), ValueError, "noise_scale"),
    (dict(alphas=()), ValueError, "alphas"),
    (dict(alphas=(0.1, -0.2)), ValueError, "alphas"),
    (dict(alphas=0.3), TypeError, "alphas"),
    (dict(k_max=0), ValueError, "k_max"),
    (dict(k_max=2.5), ValueError, "k_max"),
    (dict(k_max=2**32 - 1), ValueError, "k_max"),
    (dict(distribution="uniform"), ValueError, "distribution"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(backend="cuda-graphs"), ValueError, "backend"),
    (dict(amsgrad="yes"), TypeError, "amsgrad"),
    (dict(amsgrad=2), TypeError, "amsgrad"),
    (dict(foreach="no"), TypeError, "foreach"),
    (dict(foreach=True, fused=True), ValueError, "foreach and fused"),
    (dict(differentiable=True), ValueError, "differentiable"),
    (dict(capturable=True, backend="torch"), ValueError, "capturable"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_ARGUMENTS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_arguments_raise_and_touch_nothing(kwargs, error, match):
    params = make_params(SHAPES)
    before = [p.detach().clone() for p in params]
    with pytest.raises(error, match=match):
        FusedMergOptAdamW(params, **kwargs)
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_bad_params_raise_and_touch_nothing():
    good = make_params([(5,)])[0]
    before = good.detach().clone()
    cases = [
        ([good, good], ValueError, "more than once"),
        ([{"params": [good]}, {"params": [good]}], ValueError, "more than once"),
        ([good, torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], TypeError, "complex"),
        ([good, torch.nn.Parameter(torch.randn(3).to_sparse())], TypeError, "sparse"),
        ([good, torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], TypeError, "dtype"),
        ([good, torch.nn.Parameter(torch.randn(4, 3).t())], ValueError, "contiguous"),
        ([good, torch.nn.Parameter(torch.randn(3, device="meta"))], ValueError, "share a device"),
        ([{"params": {good}}], TypeError, "not a set"),
        ({good}, TypeError, "not a set"),
        (frozenset([good]), TypeError, "not a set"),
        ([{"params": [good], "lr": torch.tensor(1e-3, device="meta")}], ValueError, "lr"),
    ]
    for params, error, match in cases:
        with pytest.raises(error, match=match):
            FusedMergOptAdamW(params)
        assert torch.equal(good, before)


def test_torch_adamw_keywords_and_values_are_accepted(fresh_seed):
    """AdamW's own keywords, numpy numbers and 0/1 flags, as torch accepts them: the same run."""
    import numpy as np

    runs = []
    for kwargs in (dict(lr=1e-2, amsgrad=True, k_max=7),
                   dict(lr=np.float64(1e-2), betas=(np.float64(0.9), 0.999), amsgrad=1, k_max=np.int64(7),
                        foreach=True, fused=None, capturable=True, differentiable=False)):
        params = make_params(SHAPES, generator=torch.Generator().manual_seed(3))
        opt = FusedMergOptAdamW(params, noise_scale=1e-2, seed=fresh_seed, **kwargs)
        assert opt.param_groups[0]["amsgrad"] is True and "max_exp_avg_sq" in opt.state[params[0]]
        for _ in range(3):
            set_grads(params)
            opt.step()
        runs.append(params)
    assert all(torch.equal(p, q) for p, q in zip(*runs))


LATE_OPTIONS = [("lr", "0.1", TypeError), ("betas", (0.9, 1.5), ValueError), ("amsgrad", "yes", TypeError),
                ("noise_scale", "5e-4", TypeError), ("k_max", 0, ValueError)]


@pytest.mark.parametrize("wrapper, option, value, error",
                         [(False, *case) for case in LATE_OPTIONS] + [(True, *case) for case in LATE_OPTIONS[3:]])
def test_a_bad_option_set_after_construction_raises_at_step_before_anything_changes(wrapper, option, value, error):
    """(MergOpt's base optimizer checks its own options.)"""
    params = make_params(SHAPES)
    opt = MergOpt(torch.optim.SGD(params, lr=0.1), seed=1) if wrapper else FusedMergOptAdamW(params, seed=1)
    set_grads(params)
    before = [p.detach().clone() for p in params]
    opt.param_groups[0][option] = value
    with pytest.raises(error, match=option):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert opt.noise_step() == 1


def test_sparse_grad_raises_before_anything_changes():
    params = make_params([(5,), (6,)])
    opt = FusedMergOptAdamW(params, seed=3)
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.ones(5)
    params[1].grad = torch.ones(6).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert opt.state[params[0]]["step"].item() == 0


def test_param_group_added_later_is_perturbed(shifted_seed):
    first, later = make_params([(9,), (11,)])
    later_before = later.detach().clone()
    opt = FusedMergOptAdamW([first], lr=1e-2, noise_scale=1e-2, seed=shifted_seed)
    opt.add_param_group({"params": [later]})
    assert not torch.equal(later, later_before)
    assert (opt.param_groups[1]["mergopt_seed"], opt.param_groups[1]["mergopt_noise_step"]) == (shifted_seed, 1)
    with opt.clean_weights():
        torch.testing.assert_close(later.detach(), later_before, rtol=2 * EPS32, atol=2 * EPS32)


@pytest.mark.parametrize("wrapper", [False, True], ids=["fused", "mergopt"])
def test_noise_options_changed_between_steps_restore_what_was_applied(device_backend, wrapper, shifted_seed):
    """A noise schedule: each restore removes the perturbation the parameters hold, written with
    the options of its time, whatever the options are now. With lr 0 theta never moves."""
    device, backend = device_backend
    params = make_params(SHAPES, device=device)
    theta = [p.detach().clone() for p in params]
    scale = max(t.abs().max().item() for t in theta) + 0.1
    kwargs = dict(noise_scale=1e-2, seed=shifted_seed, backend=backend)
    opt = MergOpt(torch.optim.SGD(params, lr=0.0), **kwargs) if wrapper else \
        FusedMergOptAdamW(params, lr=0.0, weight_decay=0.0, **kwargs)
    schedule = [dict(noise_scale=5e-3), dict(distribution="gaussian", alphas=(0.3,)),
                dict(noise_scale=0.0), dict(noise_scale=2e-2, noise_loc=1e-3), dict(k_max=3)]
    for step, change in enumerate(schedule, start=1):
        set_grads(params)
        opt.step()
        opt.param_groups[0].update(change)
        # One rounding (<= |x| 2**-24) per apply and per restore: EPS32 * |x| a step, twice over.
        with opt.clean_weights():
            torch.testing.assert_close(params, theta, rtol=0, atol=2 * step * EPS32 * scale)
    opt.step()
    opt.remove_perturbation()
    torch.testing.assert_close(params, theta, rtol=0, atol=2 * (len(schedule) + 1) * EPS32 * scale)
    with pytest.raises(ValueError, match="noise_scale"):
        opt.param_groups[0]["noise_scale"] = -1.0
        opt.step()


def test_a_parameter_replaced_in_its_group_takes_the_old_ones_identity(fresh_seed):
    """Identities are positions: a tensor put in place of another draws that one's noise, so
    the run goes on exactly as without the swap."""
    runs = []
    for swap in (False, True):
        params = make_params(SHAPES, generator=torch.Generator().manual_seed(7))
        opt = FusedMergOptAdamW(params, lr=1e-2, noise_scale=1e-2, seed=fresh_seed)
        set_grads(params)
        opt.step()
        if swap:
            with opt.clean_weights():
                replacement = torch.nn.Parameter(params[1].detach().clone())
                opt.param_groups[0]["params"][1] = replacement
                opt.state[replacement] = opt.state.pop(params[1])
        params = opt.param_groups[0]["params"]
        for _ in range(2):
            set_grads(params)
            opt.step()
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
