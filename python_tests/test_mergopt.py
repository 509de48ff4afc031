"""MergOpt around other optimizers: SGD with momentum (paper D.2.2) against the paper reference,
schedulers reaching the base, low-precision masters, checkpoints."""

import pytest
import torch

from mergopt_kernels import FusedMergOptAdamW, MergOpt
from mergopt_kernels.reference import ReferenceMergOpt

from test_fused_adamw import EPS32, SHAPES, check_against_reference, make_params, set_grads


def sgd(params, lr=0.05):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3)


def test_sgd_base_matches_paper_reference(device_backend, fresh_seed):
    device, backend = device_backend
    options = dict(noise_scale=2e-2, seed=fresh_seed)
    ours = make_params(SHAPES, device)
    ref32 = [torch.nn.Parameter(p.detach().clone().cpu()) for p in ours]
    ref64 = [torch.nn.Parameter(p.detach().double().cpu()) for p in ours]
    opt = MergOpt(sgd(ours), backend=backend, **options)
    refs = [ReferenceMergOpt(r, base=sgd(r), **options) for r in (ref32, ref64)]
    check_against_reference(opt, ours, refs, ref32, ref64, steps=15)


def test_scheduler_on_the_wrapper_drives_the_base():
    params = make_params(SHAPES)
    base = sgd(params, lr=0.1)
    opt = MergOpt(base, noise_scale=1e-3, seed=1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        set_grads(params)
        opt.step()
        scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert opt.param_groups[0] is base.param_groups[0]


def test_noise_off_is_the_base_optimizer():
    ours = make_params(SHAPES)
    peer = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, peer_opt = MergOpt(sgd(ours), noise_scale=0.0), sgd(peer)
    for _ in range(10):
        for params, o in ((ours, opt), (peer, peer_opt)):
            set_grads(params)
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, peer))


@pytest.mark.parametrize("base", [sgd, lambda params: torch.optim.AdamW(params, lr=1e-2),
                                  lambda params: torch.optim.RMSprop(params, lr=1e-2)],
                         ids=["sgd", "adamw", "rmsprop"])
def test_bf16_parameters_restore_exactly(base, fresh_seed):
    """The restore gives back theta bit for bit; bases that create their state lazily (Adam,
    RMSprop) work, since the exact copies are the wrapper's, not in the base's state."""
    params = make_params(SHAPES, dtype=torch.bfloat16)
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, plain_opt = MergOpt(base(params), noise_scale=0.0, seed=fresh_seed), base(plain)
    noisy = make_params(SHAPES, dtype=torch.bfloat16)
    noisy_opt = MergOpt(base(noisy), noise_scale=1e-2, seed=fresh_seed)
    for _ in range(5):
        with noisy_opt.clean_weights():
            clean = [p.detach().clone() for p in noisy]
        noisy_opt.remove_perturbation()
        assert all(torch.equal(p, c) for p, c in zip(noisy, clean))
        for ps, o in ((params, opt), (plain, plain_opt), (noisy, noisy_opt)):
            set_grads(ps)
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(params, plain))  # noise off: the base itself


def test_state_dict_round_trip(fresh_seed, tmp_path):
    params = make_params(SHAPES)
    opt = MergOpt(sgd(params), noise_scale=1e-2, seed=fresh_seed)
    for _ in range(3):
        set_grads(params)
        opt.step()
    with opt.clean_weights():
        torch.save({"model": [p.detach().clone() for p in params], "opt": opt.state_dict()}, tmp_path / "c.pt")
    for _ in range(3):
        set_grads(params)
        opt.step()
    ckpt = torch.load(tmp_path / "c.pt")
    resumed = [torch.nn.Parameter(w) for w in ckpt["model"]]
    new = MergOpt(sgd(resumed), noise_scale=1e-2, seed=0)
    new.load_state_dict(ckpt["opt"])
    for _ in range(3):
        set_grads(resumed)
        new.step()
    torch.testing.assert_close(list(resumed), list(params), rtol=16 * EPS32, atol=16 * EPS32)


def test_bad_base_and_options():
    params = make_params([(3,)])
    before = params[0].detach().clone()
    with pytest.raises(TypeError, match="base"):
        MergOpt(params)
    with pytest.raises(TypeError, match="base"):
        MergOpt(FusedMergOptAdamW(make_params([(2,)])))
    with pytest.raises(ValueError, match="k_max"):
        MergOpt(sgd(params), k_max=0)
    assert torch.equal(params[0], before)
