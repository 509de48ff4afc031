"""FusedMergOptAdamW inside transformers.Trainer with MergOptCallback: the training forward sees
theta_t + s_t z_t (the published MergOPT code trains plain AdamW under the Trainer), the
scheduler's learning rate reaches the update, checkpoints hold clean weights, and resuming from
one continues the uninterrupted run. A tiny GPT-2 built from a config: nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from mergopt_kernels import FusedMergOptAdamW, noise  # noqa: E402
from mergopt_kernels.integrations.hf import MergOptCallback  # noqa: E402

EPS32 = 2.0**-23
NOISE_SCALE = 0.02
MAX_STEPS = 6


def tiny_gpt2(init_seed):
    torch.manual_seed(init_seed)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def dataset():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (16, 8), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def make_trainer(output_dir, seed, init_seed=0, lr_lambda=lambda step: 1.0, hook=None, attach=False, **options):
    """``attach``: the user attaches the optimizer before building the Trainer."""
    model = tiny_gpt2(init_seed)
    opt = FusedMergOptAdamW(model.parameters(), lr=1e-2, weight_decay=0.01, noise_scale=NOISE_SCALE, seed=seed)
    if attach:
        opt.attach(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    if hook is not None:
        model.transformer.h[0].mlp.c_fc.register_forward_pre_hook(hook)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=MAX_STEPS,
        save_strategy="steps", save_steps=1, logging_steps=1, report_to=[], use_cpu=True,
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0, **options)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset()[:4],
                                   optimizers=(opt, scheduler), callbacks=[MergOptCallback()])
    return trainer, model, opt


def checkpoint_weight(output_dir, step, name="transformer.h.0.mlp.c_fc.weight"):
    return safetensors_torch.load_file(os.path.join(output_dir, f"checkpoint-{step}", "model.safetensors"))[name]


def losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def test_forward_sees_perturbed_weights_and_checkpoints_hold_clean_ones(tmp_path, fresh_seed):
    """Two micro-batches per step (3 epochs of 2 steps), an evaluation before training
    (eval_on_start) and every other step."""
    seen, evaluated = {}, {}

    def record(module, args):  # the weights the training and evaluation forwards use
        (seen if module.training else evaluated).setdefault(opt.noise_step(), []).append(
            module.weight.detach().clone())

    trainer, model, opt = make_trainer(tmp_path, fresh_seed, hook=record, gradient_accumulation_steps=2,
                                       eval_strategy="steps", eval_steps=2, eval_on_start=True)
    initial = model.transformer.h[0].mlp.c_fc.weight.detach().clone()  # clean: the callback removed z_1
    trainer.train()
    assert sorted(seen) == list(range(1, MAX_STEPS + 1))
    for t, forwards in seen.items():  # the micro-batches of a step see the same weights
        assert len(forwards) == 2 and torch.equal(forwards[0], forwards[1])
    seen = {t: forwards[0] for t, forwards in seen.items()}
    # Evaluation after step k sees theta_{k+1}, which checkpoint-k holds; before training, theta_1.
    assert sorted(evaluated) == [1, 3, 5, 7]
    for t, forwards in evaluated.items():
        clean = initial if t == 1 else checkpoint_weight(tmp_path, t - 1)
        assert all(torch.equal(w, clean) for w in forwards)
    param_id = next(i for i, p in enumerate(opt.param_groups[0]["params"])
                    if p is model.transformer.h[0].mlp.c_fc.weight)
    shifted = 0
    for t in range(1, MAX_STEPS + 1):
        theta = initial if t == 1 else checkpoint_weight(tmp_path, t - 1)  # checkpoint-k holds theta_{k+1}
        s = noise.step_scale(fresh_seed, t, opt.param_groups[0]["alphas"], 7)
        z = noise.element_noise(fresh_seed, param_id, t, 0, theta.numel(), 0.0, NOISE_SCALE, "laplace")
        expected = theta + s * z.view(theta.shape)
        torch.testing.assert_close(seen[t], expected, rtol=2 * EPS32, atol=2 * EPS32)
        if s != 0.0:
            shifted += 1
            assert (seen[t] - theta).abs().max() > 100 * EPS32  # not the clean weights
    assert shifted > 0
    # After train() the model holds theta: the last checkpoint's weights.
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.weight.detach(),
                               checkpoint_weight(tmp_path, MAX_STEPS), rtol=0, atol=0)
    saved = torch.load(os.path.join(tmp_path, f"checkpoint-{MAX_STEPS}", "optimizer.pt"), weights_only=True)
    assert saved["mergopt"] == {"seed": fresh_seed, "noise_step": MAX_STEPS + 1}


def test_scheduler_lr_reaches_the_update(tmp_path, fresh_seed):
    trainer, model, opt = make_trainer(tmp_path, fresh_seed, lr_lambda=lambda step: 1.0 if step < 3 else 0.0)
    trainer.train()
    lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert lrs[:3] == [1e-2] * 3 and lrs[3:] == [0.0] * 3
    after_3, after_6 = checkpoint_weight(tmp_path, 3), checkpoint_weight(tmp_path, 6)
    assert (after_3 - tiny_gpt2(0).transformer.h[0].mlp.c_fc.weight.detach()).abs().max() > 1e-3
    # lr = 0 for steps 4-6: theta only moves by the rounding of the restores.
    torch.testing.assert_close(after_6, after_3, rtol=8 * EPS32, atol=8 * EPS32)


def test_resume_from_checkpoint_continues_the_run(tmp_path, fresh_seed):
    trainer, model, opt = make_trainer(tmp_path / "full", fresh_seed)
    trainer.train()
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}

    resumed, model2, opt2 = make_trainer(tmp_path / "full", seed=1, init_seed=7)
    resumed.args.output_dir = str(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert opt2.seed == fresh_seed and opt2.noise_step() == MAX_STEPS + 1
    full_losses, resumed_losses = losses(trainer), losses(resumed)
    assert sorted(resumed_losses) == list(range(1, MAX_STEPS + 1))  # 1-3 come from the checkpoint
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5)
    n_embd = model.config.n_embd
    for name, value in model2.state_dict().items():
        if name.endswith("attn.c_attn.bias"):
            # The key bias adds the same q.b_k to every score of a query, so softmax cancels it:
            # its gradient is rounding noise, which Adam scales up to lr-sized random steps.
            keep = torch.ones_like(value, dtype=torch.bool)
            keep[n_embd:2 * n_embd] = False
            value, expected[name] = value[keep], expected[name][keep]
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


def test_callback_attaches_the_optimizer_until_training_ends(tmp_path, fresh_seed):
    """The callback attaches when the Trainer is built (evaluate() before train() runs on theta)
    and takes its hooks off after train(): a training-mode forward then leaves the weights as
    they are. An attachment the user made is kept."""
    from mergopt_kernels.optim.attach import attachment_of

    trainer, model, opt = make_trainer(tmp_path, fresh_seed)
    assert attachment_of(opt) is not None
    with opt.clean_weights():
        clean = [p.detach().clone() for p in model.parameters()]
    opt.apply_perturbation()
    assert not all(torch.equal(p, c) for p, c in zip(model.parameters(), clean))
    trainer.evaluate()
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), clean))
    trainer.train()
    assert attachment_of(opt) is None
    after = [p.detach().clone() for p in model.parameters()]
    model.train()
    model(torch.zeros(1, 8, dtype=torch.long))
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after))

    trainer, model, opt = make_trainer(tmp_path / "own", fresh_seed, attach=True)
    own = attachment_of(opt)
    trainer.train()
    assert attachment_of(opt) is own


def test_callback_rejects_other_optimizers():
    with pytest.raises(TypeError, match="optimizer"):
        MergOptCallback(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))
