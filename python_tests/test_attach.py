"""``opt.attach(model)``: state dicts and eval-mode forwards see theta, training forwards theta + s z.

The references are independent of the hooks: the clean weights come from ``opt.clean_weights()``
and the perturbed ones from the parameters before any hook ran; a run that saves and evaluates
after every step is compared with one that never does."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from mergopt_kernels import FusedMergOptAdamW, MergOpt

EPS32 = torch.finfo(torch.float32).eps


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 13))
        self.head = torch.nn.Linear(13, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def build(kind: str, seed: int):
    torch.manual_seed(seed & 0x7FFFFFFF)
    model = Net()
    if kind == "fused":
        opt = FusedMergOptAdamW(model.parameters(), lr=1e-2, noise_scale=1e-2, seed=seed)
    else:
        opt = MergOpt(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), noise_scale=1e-2, seed=seed)
    return model, opt


def train_step(model, opt, x, y):
    model.train()
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def batch(seed: int, step: int):
    g = torch.Generator().manual_seed((seed + step) & 0x7FFFFFFF)
    return torch.randn(9, 7, generator=g), torch.randn(9, 3, generator=g)


def clean_state(model, opt) -> dict:
    with opt.clean_weights():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def params_now(model) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["fused", "mergopt"])
def test_state_dicts_and_eval_forwards_see_theta_and_training_forwards_the_same_perturbation(kind, visible_seed):
    model, opt = build(kind, visible_seed)
    opt.attach(model)
    x, y = batch(visible_seed, 0)
    train_step(model, opt, x, y)
    perturbed, clean = params_now(model), clean_state(model, opt)
    assert any(not torch.equal(perturbed[k], clean[k]) for k in perturbed), visible_seed

    state = model.state_dict()
    assert all(torch.equal(state[k], clean[k]) for k in clean), visible_seed
    head = model.head.state_dict()  # a submodule's state dict
    assert torch.equal(head["weight"], clean["head.weight"]), visible_seed

    reference = Net()
    reference.load_state_dict(clean)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x)), visible_seed
    model.train()
    model(x)  # written back: bit for bit the perturbation the step wrote
    assert all(torch.equal(p, perturbed[k]) for k, p in model.named_parameters()), visible_seed
    # the state dict taken before still holds theta until that training forward (it aliases the
    # parameters): saving it before training on is clean
    buffer = io.BytesIO()
    state = model.state_dict()
    model.eval()
    with torch.no_grad():
        model(x)
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert all(torch.equal(saved[k], clean[k]) for k in clean), visible_seed


@pytest.mark.parametrize("kind", ["fused", "mergopt"])
def test_saving_and_evaluating_every_step_leaves_training_as_it_was(kind, visible_seed):
    steps = 6
    runs = []
    for attached in (False, True):
        model, opt = build(kind, visible_seed)
        if attached:
            opt.attach(model)
        for step in range(steps):
            x, y = batch(visible_seed, step)
            train_step(model, opt, x, y)
            if attached:
                torch.save(model.state_dict(), io.BytesIO())
                model.eval()
                with torch.no_grad():
                    model(x)
        runs.append(clean_state(model, opt))
    plain, attached = runs
    for key in plain:
        # one extra restore per step, each within half an ulp of max(|theta|, |delta|) (DESIGN 6)
        bound = steps * EPS32 * max(float(plain[key].abs().max()), 1e-2 * 8)
        assert float((plain[key] - attached[key]).abs().max()) <= bound, (key, visible_seed)


def test_loads_into_the_model_become_theta(visible_seed):
    model, opt = build("fused", visible_seed)
    opt.attach(model)
    train_step(model, opt, *batch(visible_seed, 0))
    loaded = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(loaded)
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items()), visible_seed
    with opt.clean_weights():
        assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items()), visible_seed


def test_hooks_stay_out_of_clean_weights_blocks(visible_seed):
    model, opt = build("fused", visible_seed)
    opt.attach(model)
    train_step(model, opt, *batch(visible_seed, 0))
    with opt.clean_weights():
        clean = params_now(model)
        model.train()
        model(batch(visible_seed, 1)[0])  # a training forward inside the block leaves theta
        assert all(torch.equal(p, clean[k]) for k, p in model.named_parameters()), visible_seed


def test_remove_detach_and_copies(visible_seed):
    model, opt = build("fused", visible_seed)
    handle = opt.attach(model)
    with pytest.raises(ValueError, match="attached to a model already"):
        opt.attach(model)
    # copies of the model carry hooks that do nothing; copying never copies the optimizer
    twin = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    train_step(model, opt, *batch(visible_seed, 0))
    before = params_now(twin)
    twin.state_dict()
    twin.eval()
    twin(batch(visible_seed, 1)[0])
    assert all(torch.equal(p, before[k]) for k, p in twin.named_parameters()), visible_seed
    copy.deepcopy(opt)  # the optimizer copies as before
    handle.remove()
    perturbed = params_now(model)
    model.state_dict()
    assert all(torch.equal(p, perturbed[k]) for k, p in model.named_parameters()), visible_seed
    opt.attach(model)  # attached again after remove()


def test_bad_models_are_refused_before_any_hook(visible_seed):
    model, opt = build("fused", visible_seed)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        opt.attach([model])
    other = Net()
    with pytest.raises(ValueError, match="not parameters of model"):
        opt.attach(other)
    assert not any(m._forward_pre_hooks or m._state_dict_pre_hooks for m in other.modules())
    assert not any(m._forward_pre_hooks or m._state_dict_pre_hooks for m in model.modules())


def test_a_compiled_model_switches_like_the_eager_one(visible_seed):
    model, opt = build("fused", visible_seed)
    opt.attach(model)
    compiled = torch.compile(model, backend="eager")
    x, y = batch(visible_seed, 0)
    for step in range(2):
        compiled.train()
        opt.zero_grad()
        torch.nn.functional.mse_loss(compiled(x), y).backward()
        opt.step()
    perturbed, clean = params_now(model), clean_state(model, opt)
    compiled.eval()
    with torch.no_grad():
        out = compiled(x)
    reference = Net()
    reference.load_state_dict(clean)
    assert torch.equal(out, reference(x)), visible_seed
    compiled.train()
    compiled(x)
    assert all(torch.equal(p, perturbed[k]) for k, p in model.named_parameters()), visible_seed


def test_torch_distributed_checkpoint_state_dict_is_theta(visible_seed):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model, opt = build("fused", visible_seed)
    opt.attach(model)
    train_step(model, opt, *batch(visible_seed, 0))
    clean = clean_state(model, opt)
    state = get_model_state_dict(model)
    assert all(torch.equal(state[k], clean[k]) for k in clean), visible_seed


def test_transformers_save_pretrained_and_accelerate_saves_are_theta(tmp_path, visible_seed):
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    torch.manual_seed(visible_seed & 0x7FFFFFFF)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    opt = FusedMergOptAdamW(model.parameters(), lr=1e-3, noise_scale=1e-2, seed=visible_seed)
    accelerator = accelerate.Accelerator(cpu=True)
    model, prepared = accelerator.prepare(model, opt)
    opt.attach(model)
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(visible_seed & 0x7FFFFFFF))
    for _ in range(2):
        model.train()
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        prepared.step()
        prepared.zero_grad()
    clean = clean_state(model, opt)

    def assert_clean(state: dict, where: str) -> None:
        shared = [k for k in clean if k in state]
        assert shared, where
        for key in shared:
            assert torch.equal(state[key].to(clean[key].dtype), clean[key]), (where, key, visible_seed)

    model.save_pretrained(tmp_path / "pretrained")
    assert_clean(load_file(tmp_path / "pretrained" / "model.safetensors"), "save_pretrained")
    model.train()
    model(input_ids=ids)  # perturbed again before each save
    accelerator.save_model(model, tmp_path / "accelerate_model")
    assert_clean(load_file(tmp_path / "accelerate_model" / "model.safetensors"), "Accelerator.save_model")
    model.train()
    model(input_ids=ids)
    assert_clean(accelerator.unwrap_model(model).state_dict(), "unwrap_model(...).state_dict()")
    model.train()
    model(input_ids=ids)
    accelerator.save_state(tmp_path / "state")
    assert_clean(load_file(tmp_path / "state" / "model.safetensors"), "Accelerator.save_state")


def test_lightning_checkpoints_and_validation_see_theta(tmp_path, visible_seed):
    lightning = pytest.importorskip("lightning")
    seen = {}

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def training_step(self, batch, batch_index):
            seen.setdefault("trained_on", params_now(self.net))
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_index):
            seen["validation"] = (self.net(batch[0]).detach().clone(), params_now(self.net))

        def configure_optimizers(self):
            opt = FusedMergOptAdamW(self.parameters(), lr=1e-2, noise_scale=1e-2, seed=visible_seed)
            opt.attach(self)
            seen["opt"] = opt
            return opt

    data = [batch(visible_seed, step) for step in range(3)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]),
                                                                        torch.cat([y for _, y in data])), batch_size=9)
    validation = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data[0]), batch_size=9)
    torch.manual_seed(visible_seed & 0x7FFFFFFF)
    module = Module()
    initial = params_now(module.net)
    checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=1, logger=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint])
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=validation)
    opt = seen["opt"]
    # the first training forward ran on theta_0 + s z; the model is left holding theta
    assert any(not torch.equal(seen["trained_on"][k], v) for k, v in initial.items()), visible_seed
    clean = {k[len("net."):]: v for k, v in clean_state(module, opt).items()}
    assert all(torch.equal(p, clean[k]) for k, p in module.net.named_parameters()), visible_seed
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[f"net.{k}"], v) for k, v in clean.items()), visible_seed
    output, weights = seen["validation"]
    assert all(torch.equal(weights[k], clean[k]) for k in clean), visible_seed  # the last validation ran after the last step
    reference = Net()
    reference.load_state_dict(clean)
    assert torch.equal(output, reference(data[0][0]).detach()), visible_seed
