"""The fused MergOPT step written with torch tensor ops: the backend for CPU tensors.

It computes exactly what the Triton kernel (``ops/triton_step.py``) and the native op compute:
restore the perturbation of step t, AdamW, write the perturbation of step t + apply_offset.
It walks each parameter in chunks of ``noise.TORCH_CHUNK`` elements so that the noise and the
AdamW temporaries of one chunk stay in cache; nothing the size of a parameter is allocated.
"""

from __future__ import annotations

import torch

from .. import noise
from .step_args import FusedStepArgs


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


def fused_step(args: FusedStepArgs) -> None:
    """One fused MergOPT/AdamW pass over ``args`` (see ``FusedStepArgs``), in place."""
    seed = args.seed & ((1 << 64) - 1)
    lr = float(args.lr)
    t = int(args.noise_step.item())
    noisy = args.noise_scale != 0.0
    scale_now = noise.step_scale(seed, t, args.alphas, args.k_max) if noisy and args.restore else 0.0
    apply_step = t + args.apply_offset
    apply = noisy and args.apply_offset >= 0
    scale_next = noise.step_scale(seed, apply_step, args.alphas, args.k_max) if apply else 0.0

    def delta(param_id, step, scale, start, count, device):
        return scale * noise.element_noise(seed, param_id, step, start, count, args.noise_loc,
                                           args.noise_scale, args.distribution).to(device)

    for i, param in enumerate(args.params):
        flat_param = param.view(-1)
        flat_master = args.masters[i].view(-1) if args.masters else None
        grad = args.grads[i]
        flat_grad = grad.reshape(-1) if grad is not None else None
        step = float(args.steps[i].item()) if grad is not None else 0.0
        param_id = args.param_ids[i]
        for start in range(0, flat_param.numel(), noise.TORCH_CHUNK):
            stop = min(start + noise.TORCH_CHUNK, flat_param.numel())
            global_start = args.index_bases[i] + start
            if flat_master is not None:
                theta = flat_master[start:stop].clone()
            else:
                theta = flat_param[start:stop].float()
                if noisy and args.restore:
                    theta -= delta(param_id, t, scale_now, global_start, stop - start, param.device)
            if flat_grad is not None:
                _adamw_chunk(theta, flat_grad[start:stop].float(), args.exp_avgs[i].view(-1)[start:stop],
                             args.exp_avg_sqs[i].view(-1)[start:stop],
                             args.max_exp_avg_sqs[i].view(-1)[start:stop] if args.amsgrad else None,
                             step, lr, args.beta1, args.beta2, args.eps, args.weight_decay, args.maximize)
            if flat_master is not None:
                flat_master[start:stop] = theta
            if apply:
                theta += delta(param_id, apply_step, scale_next, global_start, stop - start, param.device)
            flat_param[start:stop] = theta
