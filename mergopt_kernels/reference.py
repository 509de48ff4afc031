"""MergOPT as the paper writes it (Algorithm 1), in plain torch: the reference the kernels match.

It stores what the fused optimizer never stores (the noise z and a backup of theta) and uses
``torch.optim.AdamW`` unchanged, so it is slow and costs two extra models of memory; it exists
for tests and benchmarks. Its noise comes from ``mergopt_kernels.noise``, the same stream the
kernels generate, so both follow one trajectory up to floating-point rounding. It works in any
dtype (float64 included: the noise is drawn in fp32, as the kernels draw it, then cast).

Usage per step::

    ref.perturb()            # theta + s_t z_t, keeps a backup and z_t
    loss_fn(model).backward()
    ref.step()               # back to theta, AdamW step at that gradient
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import noise


class ReferenceMergOpt:
    """The paper's MergOPT around ``torch.optim.AdamW`` (or a given base optimizer).

    Args:
        params: list of parameters; their list position is their noise identity.
        base: the base optimizer over ``params``; default AdamW(params, **adamw_kwargs).
        noise_scale, noise_loc, alphas, k_max, distribution, seed: as in FusedMergOptAdamW.
        index_bases: per parameter, the global index of its first element (shards).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], base: Optional[torch.optim.Optimizer] = None,
                 *, noise_scale=5e-4, noise_loc=0.0, alphas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
                 k_max=7, distribution="laplace", seed: int = 0,
                 index_bases: Optional[Sequence[int]] = None, param_ids: Optional[Sequence[int]] = None,
                 **adamw_kwargs):
        self.params = list(params)
        self.base = base if base is not None else torch.optim.AdamW(self.params, foreach=False, **adamw_kwargs)
        self.noise_scale, self.noise_loc = noise_scale, noise_loc
        self.alphas, self.k_max, self.distribution = tuple(alphas), k_max, distribution
        self.seed = seed
        self.index_bases = list(index_bases) if index_bases is not None else [0] * len(self.params)
        self.param_ids = list(param_ids) if param_ids is not None else list(range(len(self.params)))
        self.t = 1
        self._backup: list[torch.Tensor] = []

    def scale(self, t: int) -> float:
        """s_t = K_t alpha_t - 1."""
        return noise.step_scale(self.seed, t, self.alphas, self.k_max)

    def noise(self, i: int, t: int) -> torch.Tensor:
        """z_t of parameter i, fp32, shaped like the parameter, on the CPU."""
        p = self.params[i]
        flat = noise.element_noise(self.seed, self.param_ids[i], t, self.index_bases[i], p.numel(),
                                   self.noise_loc, self.noise_scale, self.distribution)
        return flat.view(p.shape)

    @torch.no_grad()
    def perturb(self) -> None:
        """Back up theta_t and write theta_t + s_t z_t (z_t kept for inspection)."""
        s = self.scale(self.t)
        self._backup = [p.detach().clone() for p in self.params]
        self.z = [self.noise(i, self.t) for i in range(len(self.params))]
        for p, z in zip(self.params, self.z):
            p.add_((s * z).to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def step(self) -> None:
        """Restore theta_t from the backup, then step the base optimizer at the stored gradient."""
        for p, backup in zip(self.params, self._backup):
            p.copy_(backup)
        self._backup = []
        self.base.step()
        self.t += 1
