"""The LM protocol's model: a small GPT-style causal language model over characters, its
pre-training on the mixture of the tasks, the cache of the pre-trained base, and its evaluation
(greedy exact-match answers, next-character accuracy and loss on held-out text)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .finetune import warmup_linear
from .lm_tasks import PAD, LMTask, Sequences, vocab_size

BASE_CACHE_FORMAT = 1  # bump when the cached file's layout or the training code changes


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model: ``layers`` pre-LayerNorm blocks of causal self-attention (q, k, v without
    bias) and a GELU MLP (4x ``width``), learned positions up to ``context`` tokens, output head tied
    to the embedding."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 64


class _Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.width)
        # No bias on q, k, v: the key bias gets no gradient (softmax ignores a shift shared by all
        # keys), so Adam would turn rounding noise in it into lr-sized steps and AdamW and the
        # noise-off control would part ways by far more than rounding.
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.proj = nn.Linear(config.width, config.width)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(nn.Linear(config.width, 4 * config.width), nn.GELU(),
                                 nn.Linear(4 * config.width, config.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attention = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Causal LM: ``forward(tokens [batch, length] int64) -> logits [batch, length, vocab] fp32``."""

    def __init__(self, config: GPTConfig, vocab: int):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"width ({config.width}) must be a multiple of heads ({config.heads})")
        self.config = config
        self.embed = nn.Embedding(vocab, config.width)
        self.position = nn.Parameter(torch.zeros(config.context, config.width))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.config.context:
            raise ValueError(f"tokens has length {tokens.shape[1]}, the model's context is {self.config.context}")
        x = self.embed(tokens) + self.position[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


def count_parameters(config: GPTConfig, vocab: int) -> int:
    """Number of parameters of ``GPT(config, vocab)``, without building it."""
    w = config.width
    block = 2 * 2 * w + 3 * w * w + (w * w + w) + (4 * w * w + 4 * w) + (4 * w * w + w)
    return vocab * w + config.context * w + config.layers * block + 2 * w


def lm_loss(model: nn.Module, batch: Sequences) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions ``batch.mask`` marks (the answer tokens
    of a task, every token of free text)."""
    logits = model(batch.tokens[:, :-1])
    targets = batch.tokens[:, 1:].masked_fill(~batch.mask[:, 1:], -100)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


@dataclass(frozen=True)
class LMPretrainConfig:
    """Pre-training: ``steps`` AdamW steps (lr ``lr``, linear warm-up over the first tenth, then
    linear decay to 0) on batches of ``batch_size`` sequences drawn from the pooled pre-training
    sequences of every task, with seed ``seed``."""

    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0


def _batches(data: Sequences, batch_size: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        idx = torch.randint(0, data.tokens.shape[0], (batch_size,), generator=gen).to(data.tokens.device)
        yield data.select(idx)


def pretrain_lm(data: Sequences, vocab: int, model_config: GPTConfig, config: LMPretrainConfig, device,
                progress: bool = False) -> GPT:
    """Build ``GPT(model_config, vocab)`` on ``device`` and pre-train it on ``data`` (on ``device``)."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    model = GPT(model_config, vocab).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(config.steps))
    gen = torch.Generator().manual_seed(config.seed)
    for batch in tqdm(_batches(data, config.batch_size, config.steps, gen), total=config.steps,
                      desc="pre-training", unit="step", disable=not progress):
        loss = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def base_cache_key(model_config: GPTConfig, pretrain_config: LMPretrainConfig, data: Sequences, device) -> str:
    """Hex digest naming a pre-trained base: the model's shape, the pre-training settings, the
    exact pre-training tokens and mask, the device type it trains on (CPU and GPU kernels round
    differently), the cache format and torch's version."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": BASE_CACHE_FORMAT, "model": asdict(model_config),
                              "pretrain": asdict(pretrain_config), "torch": torch.__version__,
                              "device": torch.device(device).type}, sort_keys=True).encode())
    digest.update(data.tokens.cpu().numpy().tobytes())
    digest.update(data.mask.cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def load_or_pretrain(data: Sequences, model_config: GPTConfig, config: LMPretrainConfig, device,
                     cache_dir=None, progress: bool = False) -> tuple[GPT, dict[str, torch.Tensor], dict]:
    """The pre-trained base: loaded from ``cache_dir/lm_base_<key>.pt`` when that file exists (the
    key is ``base_cache_key``), else pre-trained and written there (``cache_dir=None``: no cache).

    Returns:
        The model on ``device`` (holding the base), a copy of its state dict, and
        ``{"key", "path", "hit"}`` describing the cache.
    """
    vocab = vocab_size()
    key = base_cache_key(model_config, config, data, device)
    path = None if cache_dir is None else Path(cache_dir) / f"lm_base_{key}.pt"
    if path is not None and path.is_file():
        model = GPT(model_config, vocab).to(device)
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        hit = True
    else:
        model = pretrain_lm(data, vocab, model_config, config, device, progress)
        hit = False
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            torch.save(model.state_dict(), temporary)
            temporary.replace(path)
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return model, state, {"key": key, "path": None if path is None else str(path), "hit": hit}


@torch.no_grad()
def exact_match(model: nn.Module, task: LMTask, batch_size: int = 256) -> float:
    """Share of ``task``'s test prompts whose greedily generated answer (``task.answer_length``
    tokens) equals the reference answer exactly."""
    prompts, answers = task.test_prompts, task.test_answers
    correct = 0
    for start in range(0, prompts.shape[0], batch_size):
        tokens = prompts[start:start + batch_size]
        for _ in range(task.answer_length):
            next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], 1)
        generated = tokens[:, prompts.shape[1]:]
        correct += int((generated == answers[start:start + batch_size]).all(1).sum())
    return correct / prompts.shape[0]


@torch.no_grad()
def next_token_accuracy(model: nn.Module, data: Sequences) -> float:
    """Share of the masked positions of ``data`` whose next token is the model's top-1 prediction."""
    logits = model(data.tokens[:, :-1])
    mask = data.mask[:, 1:] & (data.tokens[:, 1:] != PAD)
    return float((logits.argmax(-1) == data.tokens[:, 1:])[mask].float().mean())


def task_metric(model: nn.Module, task: LMTask) -> float:
    """The task's score in [0, 1]: exact match of generated answers, or next-character accuracy
    on held-out text for a task without exact answers."""
    return exact_match(model, task) if task.test_prompts is not None else next_token_accuracy(model, task.test)


@torch.no_grad()
def task_test_loss(model: nn.Module, task: LMTask) -> float:
    """Held-out next-token cross-entropy on ``task``'s test sequences (its answer positions)."""
    return float(lm_loss(model, task.test))
