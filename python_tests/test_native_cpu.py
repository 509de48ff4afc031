"""The native CPU op (csrc/cpu) against the noise specification and a float64 reference.

Skipped, with the reason, when the native library is not built
(``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import math

import pytest
import torch

from mergopt_kernels import noise
from mergopt_kernels.ops import native, step_args

pytestmark = pytest.mark.skipif(not native.available("cpu"),
                                reason="native library not built (python setup.py build_ext --inplace)")

ALPHAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
K_MAX = 7
SIZES = (1, 7, 4099, 278011)
BASES = (0, 5, 3, (1 << 34) + 1)     # the last one puts G >> 32 into counter word c1
SEED = (1 << 63) + 0x9E3779B97F4A7C15  # above 2**63: exercises the int64 two's-complement mapping


def ulp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 ulp of |x| (x fp32 or fp64), as float64."""
    x32 = x.to(torch.float32).abs()
    return (torch.nextafter(x32, torch.tensor(math.inf)) - x32).double()


def ops():
    return torch.ops.mergopt_kernels


@pytest.mark.parametrize("param_id,step,start,count", [(0, 1, 0, 4096), (3, 7, 5, 1001), (11, 2**31, 2**34 + 3, 37)])
def test_words_bitwise(param_id, step, start, count):
    got = ops().noise_words(noise.seed_as_int64(SEED), param_id, step, start, count)
    expected = noise.element_words(SEED, param_id, step, start, count)
    assert torch.equal(got, expected)


def noise_ulp(z: torch.Tensor, loc: float) -> torch.Tensor:
    """ulp of the terms of z = loc + (z - loc): the unit of the rounding errors in z."""
    return ulp32(abs(loc) + (z.double() - loc).abs())


def exact_gaussian(words: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    """The Box-Muller formula of noise.py evaluated in float64 from the same fp32 angle."""
    pairs = words.reshape(-1, 2)
    u1 = ((pairs[:, 0] >> 8) + 1).double() * 2.0**-24
    angle = (torch.tensor(2 * math.pi, dtype=torch.float32) * ((pairs[:, 1] >> 8).float() * 2.0**-24)).double()
    radius = torch.sqrt(-2 * torch.log(u1))
    return loc + scale * torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), -1).reshape(-1)


@pytest.mark.parametrize("distribution", ["laplace", "gaussian"])
@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (0.25, 5e-4)])
def test_noise_within_ulps(distribution, loc, scale):
    """Laplace within 2 ulp of the torch implementation. Gaussian: its fp32 chain (log, sqrt, cos,
    two products) leaves both implementations up to ~2.3 ulp from the exact formula, so each is held
    to 2.5 ulp of that and to 4 ulp of the other."""
    count = 1 << 16
    got = ops().element_noise(noise.seed_as_int64(SEED), 4, 9, 0, count, loc, scale, distribution)
    expected = noise.element_noise(SEED, 4, 9, 0, count, loc, scale, distribution)
    assert torch.isfinite(got).all()
    unit = noise_ulp(expected, loc)
    if distribution == "laplace":
        assert ((got.double() - expected.double()).abs() <= 2 * unit).all()
    else:
        exact = exact_gaussian(noise.element_words(SEED, 4, 9, 0, count), loc, scale)
        assert ((got.double() - exact).abs() <= 2.5 * unit).all()
        assert ((got.double() - expected.double()).abs() <= 4 * unit).all()


def test_step_scale_bitwise():
    for step in (1, 2, 3, 1000, 2**32 - 1):
        got = ops().step_scale(noise.seed_as_int64(SEED), step, ALPHAS, K_MAX)
        assert got == noise.step_scale(SEED, step, ALPHAS, K_MAX)


def _call(state, *, seed=SEED, t, restore, apply_offset, noise_scale=5e-4, noise_loc=0.0, distribution="laplace",
          lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
          bases=BASES, param_ids=None):
    n = len(state["params"])
    ops().fused_step(state["params"], state["grads"], state["exp_avgs"], state["exp_avg_sqs"],
                     state["max_exp_avg_sqs"], state["masters"], state["steps"],
                     list(param_ids or range(10, 10 + n)), list(bases[:n]), noise.seed_as_int64(seed),
                     torch.tensor([t]), lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, noise_loc,
                     noise_scale, ALPHAS, K_MAX, distribution, restore, apply_offset)


def test_fused_step_writes_the_perturbation():
    """params 0, no grad, apply: params == s_t z_t of the spec, within 2 ulp (the sharded index too)."""
    sizes = SIZES
    state = dict(params=[torch.zeros(n) for n in sizes], grads=[None] * len(sizes),
                 exp_avgs=[torch.empty(0)] * len(sizes), exp_avg_sqs=[torch.empty(0)] * len(sizes),
                 max_exp_avg_sqs=[], masters=[], steps=[torch.tensor(1.0)] * len(sizes))
    _call(state, t=5, restore=False, apply_offset=0, noise_scale=1.0, noise_loc=0.5)
    scale = noise.step_scale(SEED, 5, ALPHAS, K_MAX)
    for i, (p, n) in enumerate(zip(state["params"], sizes)):
        z = noise.element_noise(SEED, 10 + i, 5, BASES[i], n, 0.5, 1.0, "laplace")
        expected = scale * z
        assert ((p.double() - expected.double()).abs() <= 2 * abs(scale) * noise_ulp(z, 0.5)).all()


def _reference_delta(param_id, step, base, n, *, noise_scale, noise_loc, distribution):
    scale = noise.step_scale(SEED, step, ALPHAS, K_MAX)
    z = noise.element_noise(SEED, param_id, step, base, n, noise_loc, noise_scale, distribution)
    return (scale * z).double()


CASES = {
    "noise": dict(),
    "noise_gaussian_wd": dict(distribution="gaussian", weight_decay=0.1),
    "noise_off": dict(noise_scale=0.0),
    "amsgrad_maximize_wd": dict(amsgrad=True, maximize=True, weight_decay=0.05),
    "bf16_master": dict(dtype=torch.bfloat16, weight_decay=0.01),
    "fp16_master_amsgrad": dict(dtype=torch.float16, amsgrad=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_against_float64_reference(case):
    """Twelve training steps (restore z_t, AdamW, apply z_t+1) against the same maths in float64."""
    opts = dict(CASES[case])
    dtype = opts.pop("dtype", torch.float32)
    options = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                   noise_scale=5e-4, noise_loc=0.0, distribution="laplace")
    options.update(opts)
    sizes = SIZES
    gen = torch.Generator().manual_seed(hash(case) & 0xFFFF)
    theta64 = [torch.randn(n, generator=gen, dtype=torch.float64) * 0.05 for n in sizes]
    noisy = options["noise_scale"] != 0.0
    low_precision = dtype != torch.float32

    def delta(i, step):
        if not noisy:
            return torch.zeros(sizes[i], dtype=torch.float64)
        return _reference_delta(10 + i, step, BASES[i], sizes[i], noise_scale=options["noise_scale"],
                                noise_loc=options["noise_loc"], distribution=options["distribution"])

    masters = [t.float() for t in theta64] if low_precision else []
    theta64 = [m.double() for m in masters] if low_precision else [t.float().double() for t in theta64]
    state = dict(params=[(t + delta(i, 1)).to(dtype) for i, t in enumerate(theta64)],
                 grads=[None] * len(sizes), exp_avgs=[torch.zeros(n) for n in sizes],
                 exp_avg_sqs=[torch.zeros(n) for n in sizes],
                 max_exp_avg_sqs=[torch.zeros(n) for n in sizes] if options["amsgrad"] else [],
                 masters=masters, steps=[torch.tensor(0.0) for _ in sizes])
    m64 = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    v64 = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    vmax64 = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    lr, b1, b2, eps, wd = (options[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    n_steps = 12
    for t in range(1, n_steps + 1):
        skip = 2 if t % 2 else None  # tensor 2 gets no gradient on odd steps
        grads = []
        for i, n in enumerate(sizes):
            grads.append(None if i == skip else (torch.randn(n, generator=gen) * 1e-2).to(dtype))
            if i != skip:
                state["steps"][i] += 1
        state["grads"] = grads
        _call(state, t=t, restore=True, apply_offset=1, **options)
        for i in range(len(sizes)):
            if grads[i] is None:
                continue
            g = grads[i].double() * (-1 if options["maximize"] else 1)
            step = float(state["steps"][i])
            theta64[i] *= 1 - lr * wd
            m64[i] += (1 - b1) * (g - m64[i])
            v64[i] = v64[i] * b2 + (1 - b2) * g * g
            vmax64[i] = torch.maximum(vmax64[i], v64[i])
            second = vmax64[i] if options["amsgrad"] else v64[i]
            denom = second.sqrt() / math.sqrt(1 - b2**step) + eps
            theta64[i] -= lr / (1 - b1**step) * m64[i] / denom
    # ulp of the noise terms: |s| * (|loc| + |z - loc|) <= |delta| + |s * loc|
    loc_term = abs(options["noise_loc"]) * 3.2
    for i in range(len(sizes)):
        d_next = delta(i, n_steps + 1)
        # fp32 rounding per step: restore and apply (fp32 params only) plus the AdamW roundings
        # (a few ulp of theta and of an update of size <= lr); the noise itself within 2 ulp.
        bound = n_steps * (4 * ulp32(theta64[i] + d_next.abs()) + 1e-5 * lr) + 4 * ulp32(d_next.abs() + loc_term)
        theta = state["masters"][i].double() if low_precision else state["params"][i].double() - d_next
        assert ((theta - theta64[i]).abs() <= bound).all(), f"tensor {i}: theta"
        if low_precision:
            # params are the master plus the perturbation, rounded once to the parameter dtype.
            expected = (state["masters"][i].double() + d_next).to(dtype).double()
            eps_dtype = torch.finfo(dtype).eps
            assert ((state["params"][i].double() - expected).abs()
                    <= eps_dtype * expected.abs() + 1e-12).all(), f"tensor {i}: params"
        assert ((state["exp_avgs"][i].double() - m64[i]).abs() <= n_steps * 4 * ulp32(m64[i].abs() + 1e-2)).all()
        assert ((state["exp_avg_sqs"][i].double() - v64[i]).abs() <= n_steps * 4 * ulp32(v64[i] + 1e-4)).all()


def test_noise_off_restore_and_apply_are_the_identity():
    """noise_scale 0 and no grads: params are untouched, bit for bit, -0.0 included."""
    p = torch.tensor([0.0, -0.0, 1.5, -3.25, float("inf"), 1e-40])
    before = p.clone()
    state = dict(params=[p], grads=[None], exp_avgs=[torch.zeros(6)], exp_avg_sqs=[torch.zeros(6)],
                 max_exp_avg_sqs=[], masters=[], steps=[torch.tensor(1.0)])
    _call(state, t=3, restore=True, apply_offset=1, noise_scale=0.0)
    assert torch.equal(p.view(torch.int32), before.view(torch.int32))


def test_matches_torch_adamw_with_noise_off():
    """Noise off: the trajectory of torch.optim.AdamW (single-tensor path) within float rounding."""
    gen = torch.Generator().manual_seed(7)
    sizes = (7, 4099)
    ref = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]
    opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=1e-2, amsgrad=True, foreach=False)
    state = dict(params=[p.detach().clone() for p in ref], grads=None,
                 exp_avgs=[torch.zeros(n) for n in sizes], exp_avg_sqs=[torch.zeros(n) for n in sizes],
                 max_exp_avg_sqs=[torch.zeros(n) for n in sizes], masters=[], steps=[torch.tensor(0.0) for _ in sizes])
    for _ in range(25):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        for s in state["steps"]:
            s += 1
        state["grads"] = grads
        _call(state, t=1, restore=False, apply_offset=-1, noise_scale=0.0, lr=1e-2, weight_decay=1e-2,
              amsgrad=True, bases=(0, 0))
    for p, q in zip(state["params"], ref):
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-6)


def test_invariant_to_sharding():
    """A parameter split into shards (index_bases) gets the same result as in one piece."""
    n = 10007
    gen = torch.Generator().manual_seed(3)
    whole = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen)

    def run(cuts):
        pieces = list(whole.clone().tensor_split(cuts))
        grads = list(grad.tensor_split(cuts))
        bases = [0] + list(cuts)
        k = len(pieces)
        state = dict(params=[p.contiguous() for p in pieces], grads=grads,
                     exp_avgs=[torch.zeros(p.numel()) for p in pieces],
                     exp_avg_sqs=[torch.zeros(p.numel()) for p in pieces], max_exp_avg_sqs=[], masters=[],
                     steps=[torch.tensor(1.0)] * k)
        _call(state, t=4, restore=True, apply_offset=1, bases=bases, param_ids=[17] * k)
        return torch.cat(state["params"])

    assert torch.equal(run([]), run([1, 6, 4099, 4100, 9001]))


def test_opcheck():
    sizes = (5, 9)
    args = ([torch.randn(n) for n in sizes], [torch.randn(sizes[0]), None], [torch.zeros(n) for n in sizes],
            [torch.zeros(n) for n in sizes], [], [], [torch.tensor(1.0) for _ in sizes], [0, 1], [0, 2],
            noise.seed_as_int64(SEED), torch.tensor([1]), 1e-3, 0.9, 0.999, 1e-8, 0.01, False, False, 0.0,
            5e-4, ALPHAS, K_MAX, "laplace", True, 1)
    torch.library.opcheck(torch.ops.mergopt_kernels.fused_step.default, args)


def test_bad_arguments():
    p = torch.zeros(4)
    base = ([p], [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)], [], [], [torch.tensor(1.0)], [0], [0], 1,
            torch.tensor([1]), 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, 0.0, 5e-4, ALPHAS, K_MAX)
    with pytest.raises(RuntimeError, match="distribution"):
        ops().fused_step(*base, "uniform", True, 1)
    with pytest.raises(RuntimeError, match="exp_avgs"):
        bad = list(base)
        bad[2] = [torch.zeros(3)]
        ops().fused_step(*bad, "laplace", True, 1)


def test_more_bad_arguments():
    """A step count that is not a 1-element fp32 tensor, an apply_offset outside {-1, 0, 1}:
    errors naming the argument, raised before anything is written."""
    p = torch.ones(4)
    base = dict(params=[p], grads=[torch.ones(4)], exp_avgs=[torch.zeros(4)], exp_avg_sqs=[torch.zeros(4)],
                max_exp_avg_sqs=[], masters=[], steps=[torch.tensor(1.0)])
    for steps, apply_offset, match in (([torch.tensor(1.0, dtype=torch.float64)], 1, r"steps\[0\]"),
                                       ([torch.tensor([1.0, 2.0])], 1, r"steps\[0\]"),
                                       ([torch.tensor(1.0)], 2, "apply_offset")):
        state = dict(base, steps=steps)
        with pytest.raises(RuntimeError, match=match):
            _call(state, t=1, restore=True, apply_offset=apply_offset)
        assert torch.equal(p, torch.ones(4)) and torch.equal(base["exp_avgs"][0], torch.zeros(4))


def test_schema_is_the_fields_of_fused_step_args():
    """The schema written in C++ (torch_common/fused_step_args.h) lists FusedStepArgs' fields in order."""
    schema = str(torch.ops.mergopt_kernels.fused_step.default._schema)
    assert schema == "mergopt_kernels::fused_step" + step_args.op_schema()


def test_fused_step_args_call_matches_the_positional_call(fresh_seed):
    """native.fused_step(FusedStepArgs) is the op called with the fields in order (seed above
    2**63 and a tensor lr included): the same bits."""
    sizes = (7, 4099)
    gen = torch.Generator().manual_seed(fresh_seed & 0xFFFF)
    init = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    seed = fresh_seed | (1 << 63)
    results = []
    for via_args in (False, True):
        state = dict(params=[t.clone() for t in init], grads=grads, exp_avgs=[torch.zeros(n) for n in sizes],
                     exp_avg_sqs=[torch.zeros(n) for n in sizes], max_exp_avg_sqs=[], masters=[],
                     steps=[torch.tensor(2.0) for _ in sizes])
        if via_args:
            native.fused_step(step_args.FusedStepArgs(
                **state, param_ids=[10, 11], index_bases=[0, 5], seed=seed, noise_step=torch.tensor([6]),
                lr=torch.tensor([1e-3], dtype=torch.float64), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                amsgrad=False, maximize=False, noise_loc=0.0, noise_scale=5e-4, alphas=ALPHAS, k_max=K_MAX,
                distribution="laplace", restore=True, apply_offset=1))
        else:
            _call(state, seed=seed, t=6, restore=True, apply_offset=1, bases=(0, 5))
        results.append([x.view(torch.int32) for key in ("params", "exp_avgs", "exp_avg_sqs") for x in state[key]])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("distribution", ["laplace", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_instruction_sets_are_bitwise_identical(monkeypatch, distribution, dtype):
    """The baseline, AVX2 and AVX-512 kernels (MERGOPT_CPU_ISA; a set the CPU lacks falls back to
    the best one it has) give the same bits: params, moments and masters, ragged tiles and a base
    whose group index crosses 2**32 included."""
    sizes = (1, 7, 4099, 278011, 70001)
    bases = (0, 5, 3, (1 << 34) + 1, (1 << 34) - 4 * 37 + 2)
    gen = torch.Generator().manual_seed(11)
    init = [torch.randn(n, generator=gen) * 0.05 for n in sizes]
    grads = [(torch.randn(n, generator=gen) * 1e-2).to(dtype) for n in sizes]
    grads[1] = None
    results = {}
    for isa in ("generic", "avx2", "avx512"):
        monkeypatch.setenv("MERGOPT_CPU_ISA", isa)
        low = dtype != torch.float32
        state = dict(params=[t.to(dtype) for t in init], grads=list(grads),
                     exp_avgs=[torch.zeros(n) for n in sizes], exp_avg_sqs=[torch.zeros(n) for n in sizes],
                     max_exp_avg_sqs=[], masters=[t.clone() for t in init] if low else [],
                     steps=[torch.tensor(1.0) for _ in sizes])
        for t in (1, 2):
            _call(state, t=t, restore=True, apply_offset=1, distribution=distribution, weight_decay=0.01,
                  noise_loc=0.125, bases=bases)
        results[isa] = [x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32)
                        for key in ("params", "exp_avgs", "exp_avg_sqs", "masters") for x in state[key]]
    for isa in ("avx2", "avx512"):
        assert all(torch.equal(a, b) for a, b in zip(results["generic"], results[isa])), isa


def test_unknown_instruction_set_is_an_error(monkeypatch):
    monkeypatch.setenv("MERGOPT_CPU_ISA", "sse9")
    state = dict(params=[torch.zeros(4)], grads=[None], exp_avgs=[torch.zeros(4)], exp_avg_sqs=[torch.zeros(4)],
                 max_exp_avg_sqs=[], masters=[], steps=[torch.tensor(1.0)])
    with pytest.raises(RuntimeError, match="MERGOPT_CPU_ISA"):
        _call(state, t=1, restore=False, apply_offset=0)
