"""FusedMergOptAdamW under torch.distributed on CPU (gloo, 2 processes): FSDP2 sharded
parameters get the noise of the unsharded run, torch.distributed.checkpoint resumes a sharded
run, and DDP ranks agree on the seed.

Every rank feeds the same batch, so FSDP2's gradient average (g + g) / 2 is exact and the
sharded run can be compared with a 1-process run up to fp32 rounding: with different batches
per rank the summation order would differ, and Adam's first steps (update = lr * sign(g)) would
turn that rounding into lr-sized differences wherever a gradient element is close to 0.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from mergopt_kernels import FusedMergOptAdamW, noise
from mergopt_kernels.optim import layouts

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SEED = 0x9E3779B97F4A7C15  # above 2**63: the seed must survive as an unsigned 64-bit value
EPS32 = 2.0**-23
OPT_KWARGS = dict(lr=1e-2, weight_decay=0.1, noise_scale=0.05)


def make_model(init_seed: int) -> torch.nn.Module:
    """Row counts 7, 3 and 1 on 2 ranks: uneven shards (4 + 3, 2 + 1) and an empty one (1 + 0)."""
    torch.manual_seed(init_seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3),
                               torch.nn.Tanh(), torch.nn.Linear(3, 1))


def shard(model: torch.nn.Module, layers: bool = True) -> torch.nn.Module:
    """FSDP2 on each Linear and the root (``layers``), or on the root only, which then holds
    every parameter itself."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if layers:
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)


def train_step(model, opt, x, y) -> float:
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def full(model) -> list[torch.Tensor]:
    """The whole parameters (an all-gather for DTensors: every rank calls it)."""
    return [p.detach().full_tensor() if isinstance(p, layouts.DTensor) else p.detach().clone()
            for p in model.parameters()]


def assert_close(ours, reference, steps, what):
    scale = max(1.0, max(r.abs().max().item() for r in reference))
    tol = 8 * steps * EPS32 * scale
    for a, b in zip(ours, reference):
        err = (a - b).abs().max().item()
        assert err <= tol, f"{what}: {err} > {tol}"


def parity_worker(rank, world_size, backend):
    """A few steps per backend and dtype, and with MergOpt around SGD: sharded = 1-process."""
    from mergopt_kernels import MergOpt

    x, y = batch()
    cases = [("adamw", torch.float32), ("adamw", torch.bfloat16), ("sgd", torch.float32)]
    for kind, dtype in cases:
        plain = make_model(0).to(dtype)
        model = shard(copy.deepcopy(plain))
        if kind == "adamw":
            ref_opt = FusedMergOptAdamW(plain.parameters(), seed=SEED, backend=backend, **OPT_KWARGS)
            opt = FusedMergOptAdamW(model.parameters(), seed=SEED, backend=backend, **OPT_KWARGS)
        else:
            ref_opt, opt = (MergOpt(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), seed=SEED,
                                    noise_scale=0.05, backend=backend) for m in (plain, model))
        for step in range(1, 4):
            # Same operations on the same values: bf16 too agrees up to fp32 rounding.
            assert_close(full(model), full(plain), step, f"{kind} {dtype} perturbed, step {step}")
            train_step(plain, ref_opt, x.to(dtype), y.to(dtype))
            train_step(model, opt, x.to(dtype), y.to(dtype))
        with opt.clean_weights(), ref_opt.clean_weights():
            assert_close(full(model), full(plain), 3, f"{kind} {dtype} clean")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fsdp2_matches_one_process_on_every_cpu_backend(backend):
    run_ranks(parity_worker, backend)


def fsdp_worker(rank, world_size, checkpoint_dir, flatten, load_inside_clean_weights=True):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)

    x, y = batch()
    plain = make_model(0)
    model = shard(copy.deepcopy(plain))
    assert any(p.to_local().numel() == 0 for p in model.parameters()) == (rank == 1)
    ref_opt = FusedMergOptAdamW(plain.parameters(), seed=SEED, **OPT_KWARGS)
    opt = FusedMergOptAdamW(model.parameters(), seed=SEED, **OPT_KWARGS)
    steps = 2  # the checkpoint holds noise step 3, whose scale is not 0 for SEED
    assert noise.step_scale(SEED, steps + 1, opt.param_groups[0]["alphas"], opt.param_groups[0]["k_max"]) != 0.0
    for step in range(1, steps + 1):
        # The forward sees, element by element, the perturbation of the 1-process run.
        assert_close(full(model), full(plain), step, f"perturbed weights before step {step}")
        ref_loss = train_step(plain, ref_opt, x, y)
        loss = train_step(model, opt, x, y)
        assert abs(loss - ref_loss) <= 8 * step * EPS32 * abs(ref_loss), (step, loss, ref_loss)
    with opt.clean_weights(), ref_opt.clean_weights():
        assert_close(full(model), full(plain), steps, "clean weights")
    assert opt.noise_step() == ref_opt.noise_step() == steps + 1

    # Save clean weights and the optimizer with torch.distributed.checkpoint, then go on.
    with opt.clean_weights():
        model_sd, optim_sd = get_state_dict(model, opt, options=options)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)
    more = 3
    losses = [train_step(model, opt, x, y) for _ in range(more)]
    with opt.clean_weights():
        expected = full(model)

    # A fresh model and optimizer (other init, other seed) load the checkpoint and continue.
    model2 = shard(make_model(123))
    opt2 = FusedMergOptAdamW(model2.parameters(), seed=12345, **OPT_KWARGS)
    # The loaded weights are theta. get_state_dict's model state dict aliases the parameters
    # and dcp.load writes it unseen by version counters: either inside clean_weights(), or
    # into copies that set_state_dict then writes over the perturbed parameters (a write the
    # optimizer sees: it subtracts no noise from them). load_state_dict perturbs them.
    with opt2.clean_weights() if load_inside_clean_weights else contextlib.nullcontext():
        model_sd2, optim_sd2 = get_state_dict(model2, opt2, options=options)
        if not load_inside_clean_weights:
            model_sd2 = {k: v.detach().clone() for k, v in model_sd2.items()}
        dcp.load({"model": model_sd2, "optim": optim_sd2}, checkpoint_id=checkpoint_dir)
        set_state_dict(model2, opt2, model_state_dict=model_sd2, optim_state_dict=optim_sd2, options=options)
    opt2.apply_perturbation()  # weights written over perturbed ones: the next forward sees them perturbed
    assert opt2.seed == SEED and opt2.noise_step() == steps + 1
    resumed = [train_step(model2, opt2, x, y) for _ in range(more)]
    for a, b in zip(resumed, losses):
        assert abs(a - b) <= 8 * (steps + more) * EPS32 * abs(b), (resumed, losses)
    with opt2.clean_weights():
        assert_close(full(model2), expected, steps + more, "resumed clean weights")


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_fsdp2_matches_one_process_and_resumes_from_dcp(tmp_path, flatten):
    """Optimizer state dicts nested (DCP's default) or flattened (torchtitan's choice)."""
    run_ranks(fsdp_worker, str(tmp_path / "checkpoint"), flatten)


def test_fsdp2_resumes_from_dcp_loaded_over_the_perturbed_weights(tmp_path):
    """set_state_dict without clean_weights(), from copies of get_state_dict's model state."""
    run_ranks(fsdp_worker, str(tmp_path / "checkpoint"), False, False)


def written_worker(rank, world_size):
    """FSDP2 parameters written in place from outside (fp32 and bf16) hold exactly what was
    written, and a frozen sharded parameter is never perturbed."""
    from torch.distributed.tensor import distribute_tensor

    x, y = batch()
    for dtype in (torch.float32, torch.bfloat16):
        model = shard(make_model(0).to(dtype))
        frozen = model[2].weight
        frozen.requires_grad_(False)
        opt = FusedMergOptAdamW(model.parameters(), seed=SEED, **OPT_KWARGS)
        source = [p.detach() for p in make_model(1).to(dtype).parameters()]
        with torch.no_grad():
            for p, q in zip(model.parameters(), source):
                p.copy_(distribute_tensor(q, p.device_mesh, p.placements))
        with opt.clean_weights():
            for p, q in zip(full(model), source):
                assert torch.equal(p, q)
        for _ in range(2):
            train_step(model, opt, x.to(dtype), y.to(dtype))
        assert torch.equal(frozen.detach().full_tensor(), source[2])


def test_fsdp2_weights_written_from_outside_and_frozen_parameters():
    run_ranks(written_worker)


def seed_worker(rank, world_size):
    torch.manual_seed(100 + rank)  # each rank would draw another seed
    model = torch.nn.Linear(4, 3)
    opt = FusedMergOptAdamW(model.parameters(), seed=None)
    seeds = [None] * world_size
    dist.all_gather_object(seeds, opt.seed)
    assert seeds[0] == seeds[1], seeds

    opt = FusedMergOptAdamW(torch.nn.Linear(2, 2).parameters(), seed=SEED)
    assert opt.seed == SEED

    for seed in (SEED + rank, SEED if rank == 0 else None):
        before = [p.detach().clone() for p in model.parameters()]
        probe = torch.nn.Linear(4, 3)
        probe.load_state_dict(model.state_dict())
        with pytest.raises(ValueError, match="seed"):
            FusedMergOptAdamW(probe.parameters(), seed=seed)
        for p, q in zip(probe.parameters(), before):
            assert torch.equal(p, q)  # nothing modified

    # Tensor parallel placements put no contiguous range of the parameter on a rank.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    column_sharded = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)]))
    with pytest.raises(ValueError, match="params: DTensor placements"):
        FusedMergOptAdamW([column_sharded], seed=SEED)
    assert torch.equal(column_sharded.full_tensor(), torch.zeros(4, 6))

    # DDP: every rank perturbs with the same noise, so the replicas stay equal.
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
    opt = FusedMergOptAdamW(ddp.parameters(), lr=1e-2, noise_scale=0.05, seed=None)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        ddp(torch.randn(6, 4, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for p in ddp.parameters():
        gathered = [torch.empty_like(p) for _ in range(world_size)]
        dist.all_gather(gathered, p.detach())
        assert torch.equal(gathered[0], gathered[1])


def test_ranks_agree_on_the_seed_ddp():
    run_ranks(seed_worker)


def test_index_base_of_ordinary_tensors_is_zero():
    assert layouts.index_base(torch.zeros(3, 4)) == 0
    assert layouts.local_tensor(None) is None


def attach_worker(rank, world_size, layers):
    """FSDP2 with ``opt.attach(model)``: the sharded state dict, torch.distributed.checkpoint's
    full model state dict and an eval-mode forward hold theta; a training-mode forward writes the
    same perturbation back before FSDP gathers the parameters it runs on."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    x, y = batch()
    model = shard(make_model(0), layers)
    opt = FusedMergOptAdamW(model.parameters(), seed=SEED, **OPT_KWARGS)
    opt.attach(model)
    for _ in range(2):
        train_step(model, opt, x, y)
    with opt.clean_weights():
        clean = full(model)
    perturbed = full(model)
    assert any(not torch.equal(a, b) for a, b in zip(clean, perturbed))
    reference = make_model(0)

    def reference_output(weights):
        with torch.no_grad():
            for p, value in zip(reference.parameters(), weights):
                p.copy_(value)
            return reference(x)

    # each of the three reads below switches the weights: perturbed -> clean -> perturbed -> clean
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference_output(clean))
    model.train()
    assert torch.equal(model(x).detach(), reference_output(perturbed))
    assert all(torch.equal(a, b) for a, b in zip(full(model), perturbed))
    sharded = [v.full_tensor() for v in model.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(sharded, clean))
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    assert all(torch.equal(a, b) for a, b in zip(whole.values(), clean))


@pytest.mark.parametrize("layers", [True, False], ids=["layers-and-root", "root-only"])
def test_fsdp2_attach_makes_state_dicts_and_evaluation_clean(layers):
    run_ranks(attach_worker, layers)
