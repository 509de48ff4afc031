"""A call happens whole or not at all (DESIGN semantics 8), copies continue bit for bit (9),
step() refuses to run inside clean_weights(), a running AdamW job switches to MergOPT, and
what torch.optim.AdamW accepts is accepted (its own test configurations, tensor betas)."""

import copy
import io
import os
import pickle

import pytest
import torch

from mergopt_kernels import FusedMergOptAdamW, MergOpt
from mergopt_kernels.noise import LAPLACE_MAX_DEVIATION
from test_fused_adamw import within_twice_fp32_error

SHAPES = [(7,), (13, 5), (4099,)]


def model_params(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def set_grads(params, salt=0.0):
    for p in params:
        x = p.detach().double()
        p.grad = (torch.cos(3 * x + salt) + 0.1 * x).to(p.dtype)


def build(kind, params, seed):
    if kind == "fused":
        return FusedMergOptAdamW(params, lr=1e-2, seed=seed)
    return MergOpt(torch.optim.Adam(params, lr=1e-2), seed=seed)


def snapshot(opt, params):
    """Every value a failed call must leave as it was: the parameters, the optimizer state,
    the ledger of held perturbations, the noise step."""
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
             for p in params if p in opt.state}
    return dict(params=[p.detach().clone() for p in params], state=state,
                held=sorted(i for i, p in enumerate(params) if opt._ledger.holds(p)),
                noise_step=opt.noise_step())


def assert_same(before, after):
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    assert before["held"] == after["held"] and before["noise_step"] == after["noise_step"]
    assert before["state"].keys() == after["state"].keys()
    for key, entry in before["state"].items():
        assert entry.keys() == after["state"][key].keys()
        for name, value in entry.items():
            other = after["state"][key][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.fixture
def seed():
    value = int.from_bytes(os.urandom(4), "little")
    print(f"seed {value}")
    return value


# MergOpt's base optimizer decides which grad dtypes it takes: the dtype case is the fused one's.
@pytest.mark.parametrize("kind, bad", [("fused", "float64 grad"), ("fused", "wrong-shape grad"),
                                       ("mergopt", "wrong-shape grad")])
def test_a_step_that_raises_changes_nothing(kind, bad, seed):
    params = model_params(seed)
    opt = build(kind, params, seed)
    set_grads(params)
    opt.step()
    set_grads(params, 1.0)
    if bad == "float64 grad":
        params[1].grad.data = params[1].grad.double()
        match = "grad has dtype torch.float64"
    else:
        params[1].grad.data = torch.ones(5, 13)
        match = r"its grad has shape \(5, 13\)"
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert_same(before, snapshot(opt, params))
    # ... and the run goes on as if the failed call had not been made.
    twin = model_params(seed)
    twin_opt = build(kind, twin, seed)
    for run, run_opt in ((params, opt), (twin, twin_opt)):
        if run is twin:
            set_grads(twin)
            twin_opt.step()
        set_grads(run, 2.0)
        run_opt.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


def test_a_base_step_that_raises_leaves_the_perturbation_in_place(seed):
    params = model_params(seed)

    class Failing(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("base step failed")

    opt = MergOpt(Failing(params, lr=0.1), seed=seed)
    with opt.clean_weights():
        clean = [p.detach().clone() for p in params]
    perturbed = [p.detach().clone() for p in params]
    set_grads(params)
    with pytest.raises(RuntimeError, match="base step failed"):
        opt.step()
    assert opt.noise_step() == 1 and all(opt._ledger.holds(p) for p in params)
    for p, q in zip(params, perturbed):  # within the rounding of one restore (DESIGN semantics 6)
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=2.0**-23 * 8)
    with opt.clean_weights():
        for p, c in zip(params, clean):
            torch.testing.assert_close(p.detach(), c, rtol=0, atol=2.0**-23 * 8)


@pytest.mark.parametrize("kind", ["fused", "mergopt"])
def test_load_state_dict_with_a_bad_entry_changes_nothing(kind, seed):
    params = model_params(seed)
    opt = build(kind, params, seed)
    set_grads(params)
    opt.step()
    saved = opt.state_dict()
    saved["state"][2] = dict(saved["state"][2], exp_avg=torch.zeros(4098))  # torch's entries are the live dicts
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[2\]\['exp_avg'\]"):
        opt.load_state_dict(saved)
    assert_same(before, snapshot(opt, params))


def test_load_state_dict_refuses_unknown_entries_and_a_step_of_many_elements(seed):
    params = model_params(seed)
    opt = FusedMergOptAdamW(params, seed=seed)
    set_grads(params)
    opt.step()
    for name, value, match in (("momentum_buffer", torch.zeros(7), "has entries"),
                               ("step", torch.ones(2), "must hold one number")):
        saved = opt.state_dict()
        saved["state"][0] = dict(saved["state"][0], **{name: value})
        before = snapshot(opt, params)
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(saved)
        assert_same(before, snapshot(opt, params))


@pytest.mark.parametrize("kind", ["fused", "mergopt"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_copy_continues_bit_for_bit(kind, how, dtype, seed):
    params = model_params(seed, dtype)
    opt = build(kind, params, seed)
    for step in range(2):
        set_grads(params, step)
        opt.step()
    if how == "deepcopy":
        copied_params, copied = copy.deepcopy((params, opt))
    elif how == "pickle":
        copied_params, copied = pickle.loads(pickle.dumps((params, opt)))
    else:
        buffer = io.BytesIO()
        torch.save((params, opt), buffer)
        buffer.seek(0)
        copied_params, copied = torch.load(buffer, weights_only=False)
    for step in range(2, 5):
        for run, run_opt in ((params, opt), (copied_params, copied)):
            set_grads(run, step)
            run_opt.step()
    for p, q in zip(params, copied_params):
        assert torch.equal(p, q)
    with opt.clean_weights(), copied.clean_weights():
        for p, q in zip(params, copied_params):
            assert torch.equal(p, q)


def test_a_copy_keeps_an_outside_write_as_clean_theta(seed):
    params = model_params(seed)
    opt = FusedMergOptAdamW(params, seed=seed)
    with torch.no_grad():
        params[0].copy_(torch.arange(7.0))  # a new theta, written from outside after construction
    copied_params, copied = copy.deepcopy((params, opt))
    with copied.clean_weights():
        assert torch.equal(copied_params[0].detach(), torch.arange(7.0))


@pytest.mark.parametrize("kind", ["fused", "mergopt"])
def test_step_inside_clean_weights_raises_and_changes_nothing(kind, seed):
    params = model_params(seed)
    opt = build(kind, params, seed)
    set_grads(params)
    before = snapshot(opt, params)
    with opt.clean_weights():
        inside = [p.detach().clone() for p in params]
        with pytest.raises(RuntimeError, match="clean_weights"):
            opt.step()
        for p, q in zip(params, inside):
            assert torch.equal(p, q)
    assert_same(before, snapshot(opt, params))


def test_switch_a_running_adamw_job_to_mergopt(seed):
    """AdamW's moments and step are taken; from the switch on, the run is a MergOPT run from
    those moments, with this optimizer's seed: equal to the noise-free reference plus the noise
    of the next steps, checked against a noise-off optimizer loaded the same way."""
    params = model_params(seed)
    adamw = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05, betas=(0.8, 0.95))
    for step in range(3):
        set_grads(params, step)
        adamw.step()
    saved = adamw.state_dict()
    clean = [p.detach().clone() for p in params]
    opt = FusedMergOptAdamW(params, seed=seed)
    opt.load_state_dict(saved)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-2, (0.8, 0.95), 0.05)
    assert opt.seed == seed and opt.noise_step() == 1
    for p in params:
        assert opt.state[p]["step"].item() == 3
        torch.testing.assert_close(opt.state[p]["exp_avg"], adamw.state[p]["exp_avg"], rtol=0, atol=0)
    with opt.clean_weights():  # theta, up to the rounding of a restore (DESIGN semantics 6)
        for p, c in zip(params, clean):
            torch.testing.assert_close(p.detach(), c, rtol=2.0**-23, atol=2.0**-24)
    assert any(not torch.equal(p.detach(), c) for p, c in zip(params, clean))  # perturbed now
    # With the noise off, the switched run continues AdamW's trajectory.
    quiet = [torch.nn.Parameter(c.clone()) for c in clean]
    quiet_opt = FusedMergOptAdamW(quiet, noise_scale=0.0, backend="torch")
    quiet_opt.load_state_dict(saved)
    peer = [torch.nn.Parameter(c.clone()) for c in clean]
    peer_opt = torch.optim.AdamW(peer, foreach=False)
    peer_opt.load_state_dict(saved)
    for step in range(3, 6):
        for run, run_opt in ((quiet, quiet_opt), (peer, peer_opt)):
            set_grads(run, step)
            run_opt.step()
    for p, q in zip(quiet, peer):
        assert torch.equal(p, q)


def test_switch_refuses_a_state_that_is_not_adamw(seed):
    params = model_params(seed)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    set_grads(params)
    sgd.step()
    opt = FusedMergOptAdamW(params, seed=seed)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="neither by FusedMergOptAdamW nor by torch.optim.AdamW"):
        opt.load_state_dict(sgd.state_dict())
    adam = torch.optim.Adam(params, weight_decay=0.1)
    with pytest.raises(ValueError, match="L2 weight decay"):
        opt.load_state_dict(adam.state_dict())
    assert_same(before, snapshot(opt, params))


def test_mergopt_takes_its_base_optimizers_state(seed):
    params = model_params(seed)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for step in range(2):
        set_grads(params, step)
        sgd.step()
    saved = sgd.state_dict()
    opt = MergOpt(torch.optim.SGD(params, lr=0.1, momentum=0.9), seed=seed)
    opt.load_state_dict(saved)
    for p in params:
        assert torch.equal(opt.base.state[p]["momentum_buffer"], sgd.state[p]["momentum_buffer"])
    assert opt.param_groups[0]["noise_scale"] == 5e-4 and opt.seed == seed


def test_torch_adamw_test_configurations_match_with_the_noise_off(device_backend):
    """torch's own AdamW test inputs (all ten: the GPU-only ones, capturable and tensor lr and
    betas, run on the CPU too) against torch.optim.AdamW and a float64 run."""
    common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")
    device, backend = device_backend
    configs = common_optimizers.optim_inputs_func_adamw("cuda")
    assert len(configs) == 10
    for config in configs:
        capturable = config.kwargs.get("capturable", False)
        if capturable and backend == "torch":
            with pytest.raises(ValueError, match="capturable=True: the 'torch' backend"):
                FusedMergOptAdamW(model_params(0), backend=backend, **config.kwargs)
            continue
        ours = [torch.nn.Parameter(p.detach().to(device)) for p in model_params(0)]
        peer = [torch.nn.Parameter(p.detach().cpu().clone()) for p in ours]
        truth = [torch.nn.Parameter(p.detach().double().cpu()) for p in ours]
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) and k == "lr" else v
                  for k, v in config.kwargs.items()}
        opt = FusedMergOptAdamW(ours, noise_scale=0.0, backend=backend, **kwargs)
        peer_kwargs = dict(config.kwargs, capturable=False, foreach=False)  # torch: capturable needs a GPU
        peer_opt = torch.optim.AdamW(peer, **peer_kwargs)
        truth_opt = torch.optim.AdamW(truth, **peer_kwargs)
        steps = 5
        for step in range(steps):
            for run, run_opt in ((ours, opt), (peer, peer_opt), (truth, truth_opt)):
                set_grads(run, step)
                run_opt.step()
        if backend == "torch":
            for p, q in zip(ours, peer):  # torch's single-tensor operations, in its order
                assert torch.equal(p, q), config.desc
        else:
            within_twice_fp32_error(ours, peer, truth, steps)


def test_tensor_betas_as_torch_allows_them(device_backend, seed):
    device, backend = device_backend
    params = [p.to(device) for p in model_params(seed)]
    params = [torch.nn.Parameter(p.detach()) for p in params]
    betas = (torch.tensor([[0.8]]), torch.tensor(0.95))
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = FusedMergOptAdamW(params, betas=betas, seed=seed, backend=backend)
    twin_opt = FusedMergOptAdamW(twin, betas=tuple(float(b) for b in betas), seed=seed, backend=backend)
    for step in range(3):
        for run, run_opt in ((params, opt), (twin, twin_opt)):
            set_grads(run, step)
            run_opt.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="both numbers or both"):
        FusedMergOptAdamW(model_params(seed), betas=(torch.tensor(0.9), 0.999))
    with pytest.raises(ValueError, match="capturable=False and foreach=True"):
        FusedMergOptAdamW(model_params(seed), betas=betas, foreach=True)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)"):
        FusedMergOptAdamW(model_params(seed), betas=(torch.tensor(0.9), torch.tensor(1.5)), capturable=True)


@pytest.mark.parametrize("kind", ["fused", "mergopt"])
def test_meta_parameters_get_an_error_naming_the_meta_device(kind):
    params = [torch.nn.Parameter(torch.empty(5, device="meta"))]
    with pytest.raises(ValueError, match="meta device"):
        build(kind, params, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_noise_scale_the_dtype_cannot_hold_is_refused_before_anything_is_written(dtype):
    largest = torch.finfo(dtype).max
    s_max = 7 * 0.6 - 1
    too_big = largest / (s_max * LAPLACE_MAX_DEVIATION) * 1.01
    fits = largest / (s_max * LAPLACE_MAX_DEVIATION) * 0.9
    params = [torch.nn.Parameter(torch.zeros(9, dtype=dtype))]
    with pytest.raises(ValueError, match=f"noise_scale: .* {dtype} cannot represent"):
        FusedMergOptAdamW(params, noise_scale=too_big)
    assert torch.equal(params[0].detach(), torch.zeros(9, dtype=dtype))
    opt = FusedMergOptAdamW(params, noise_scale=fits, seed=1, backend="torch")
    assert torch.isfinite(params[0]).all()
    opt.param_groups[0]["noise_scale"] = too_big  # changed between steps: refused at step()
    set_grads(params)
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="noise_scale"):
        opt.step()
    assert torch.equal(params[0].detach(), before)
