"""The fused MergOPT step written with torch tensor ops: the backend for CPU tensors.

It computes exactly what the Triton kernel (``ops/triton_step.py``) and the native op compute:
restore the perturbation of step t, AdamW, write the perturbation of step t + apply_offset.
It walks each parameter in chunks of ``noise.TORCH_CHUNK`` elements so that the noise and the
AdamW temporaries of one chunk stay in cache; nothing the size of a parameter is allocated.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import noise


def _adamw_chunk(theta, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps,
                 weight_decay, maximize):
    """AdamW on one fp32 chunk, in torch.optim.AdamW's own order of operations (in place)."""
    if maximize:
        grad = -grad
    theta.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
    second_moment = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
    theta.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def fused_step(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
               exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
               max_exp_avg_sqs: Sequence[torch.Tensor], masters: Sequence[torch.Tensor],
               steps: Sequence[torch.Tensor], param_ids: Sequence[int], index_bases: Sequence[int],
               seed: int, noise_step: torch.Tensor, lr, beta1: float, beta2: float,
               eps: float, weight_decay: float, amsgrad: bool, maximize: bool, noise_loc: float,
               noise_scale: float, alphas: Sequence[float], k_max: int, distribution: str,
               restore: bool, apply_offset: int) -> None:
    """One fused MergOPT/AdamW pass over a list of same-device, same-dtype tensors, in place.

    Args:
        params: parameters (any float dtype), each holding theta_t + s_t z_t when ``restore``.
        grads: gradient per parameter (same shape) or None: AdamW is skipped for that one.
        exp_avgs, exp_avg_sqs: fp32 AdamW moments, shaped like the parameters.
        max_exp_avg_sqs: fp32, shaped like the parameters when ``amsgrad``, else empty.
        masters: fp32 copies of theta for low-precision parameters, else empty.
        steps: fp32 scalar tensors, each parameter's AdamW step count, already incremented.
        param_ids: the noise identity of each parameter (< 2**32 - 1).
        index_bases: index of each local tensor's first element in the full parameter.
        seed: the 64-bit noise seed (two's-complement int64 accepted).
        noise_step: int64 tensor [1] holding t, the step whose perturbation the params hold.
        restore: subtract s_t z_t before the update (ignored with masters: they hold theta).
        apply_offset: -1 writes theta; 0 or 1 writes theta + s_u z_u with u = t + apply_offset.
    """
    seed &= (1 << 64) - 1
    lr = float(lr)
    t = int(noise_step.item())
    noisy = noise_scale != 0.0
    scale_now = noise.step_scale(seed, t, alphas, k_max) if noisy and restore else 0.0
    apply_step = t + apply_offset
    scale_next = noise.step_scale(seed, apply_step, alphas, k_max) if noisy and apply_offset >= 0 else 0.0

    def delta(param_id, step, scale, start, count, device):
        return scale * noise.element_noise(seed, param_id, step, start, count, noise_loc,
                                           noise_scale, distribution).to(device)

    for i, param in enumerate(params):
        flat_param = param.view(-1)
        flat_master = masters[i].view(-1) if masters else None
        grad = grads[i]
        flat_grad = grad.reshape(-1) if grad is not None else None
        step = float(steps[i].item()) if grad is not None else 0.0
        for start in range(0, flat_param.numel(), noise.TORCH_CHUNK):
            stop = min(start + noise.TORCH_CHUNK, flat_param.numel())
            global_start = index_bases[i] + start
            if flat_master is not None:
                theta = flat_master[start:stop].clone()
            else:
                theta = flat_param[start:stop].float()
                if noisy and restore:
                    theta -= delta(param_ids[i], t, scale_now, global_start, stop - start, param.device)
            if flat_grad is not None:
                _adamw_chunk(theta, flat_grad[start:stop].float(), exp_avgs[i].view(-1)[start:stop],
                             exp_avg_sqs[i].view(-1)[start:stop],
                             max_exp_avg_sqs[i].view(-1)[start:stop] if amsgrad else None,
                             step, lr, beta1, beta2, eps, weight_decay, maximize)
            if flat_master is not None:
                flat_master[start:stop] = theta
            if noisy and apply_offset >= 0:
                theta += delta(param_ids[i], apply_step, scale_next, global_start, stop - start, param.device)
            flat_param[start:stop] = theta
