"""GPT-style parameter lists and a small GPT model, built from a config (nothing downloaded).

``param_shapes(cfg)`` lists a GPT-2-style transformer's tensors in module order: token and
position embeddings, per layer two layernorms (weight, bias), the fused qkv projection, the
attention output projection and the two MLP matrices with their biases, and the final
layernorm; the LM head is tied to the token embedding. ``GPT(cfg)`` is the module with exactly
those parameters, for end-to-end training steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab: int
    d_model: int
    n_layer: int
    n_head: int
    seq_len: int
    mlp_ratio: int = 4


# Parameter counts: vocab*d + seq*d + n_layer*(12 d^2 + 13 d) + 2 d.
CONFIGS = {
    "tiny": GPTConfig(vocab=256, d_model=32, n_layer=2, n_head=2, seq_len=32),            # 34K
    "1M": GPTConfig(vocab=2048, d_model=128, n_layer=4, n_head=4, seq_len=256),           # 1.09M
    "10M": GPTConfig(vocab=8192, d_model=256, n_layer=10, n_head=8, seq_len=512),         # 10.1M
    "100M": GPTConfig(vocab=16384, d_model=768, n_layer=12, n_head=12, seq_len=1024),     # 98.5M
    "125M": GPTConfig(vocab=50304, d_model=768, n_layer=12, n_head=12, seq_len=1024),     # 124M (GPT-2 small)
    "1B": GPTConfig(vocab=50304, d_model=2048, n_layer=18, n_head=16, seq_len=2048),      # 1.01B
}


def param_shapes(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of ``GPT(cfg)``, in module order."""
    d, hidden = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    shapes = [("wte", (cfg.vocab, d)), ("wpe", (cfg.seq_len, d))]
    for i in range(cfg.n_layer):
        shapes += [(f"h{i}.{name}", shape) for name, shape in (
            ("ln1.weight", (d,)), ("ln1.bias", (d,)),
            ("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
            ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
            ("ln2.weight", (d,)), ("ln2.bias", (d,)),
            ("mlp.fc.weight", (hidden, d)), ("mlp.fc.bias", (hidden,)),
            ("mlp.proj.weight", (d, hidden)), ("mlp.proj.bias", (d,)))]
    return shapes + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def shapes_for(size: str) -> list[tuple[int, ...]]:
    """Tensor shapes of a named size: a config name of ``CONFIGS``, or ``"<n>x<config>"`` for
    n copies of that config's list (e.g. ``"20x1M"``: 20 small models, 20x the tensor count)."""
    copies, _, name = size.rpartition("x") if "x" in size else ("1", "", size)
    return [shape for _ in range(int(copies)) for _, shape in param_shapes(CONFIGS[name])]


def num_params(shapes) -> int:
    return sum(math.prod(shape) for shape in shapes)


def make_params(shapes, device, dtype=torch.float32, seed: int = 0) -> list[nn.Parameter]:
    """Parameters of the given shapes with gradients already set (GPT-2-like init scales)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        value = torch.randn(shape, generator=gen, device=device) * 0.02 if len(shape) > 1 else \
            torch.zeros(shape, device=device)
        p = nn.Parameter(value.to(dtype))
        p.grad = (torch.randn(shape, generator=gen, device=device) * 1e-3).to(dtype)
        params.append(p)
    return params


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d)))
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict(dict(fc=nn.Linear(d, cfg.mlp_ratio * d),
                                      proj=nn.Linear(cfg.mlp_ratio * d, d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.attn["qkv"](self.ln1(x)).split(d, dim=2)
        q, k, v = (y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn["proj"](y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp["proj"](F.gelu(self.mlp["fc"](self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """A GPT-2-style decoder with a tied LM head; ``forward(idx, targets)`` returns the loss."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def make_batch(cfg: GPTConfig, batch: int, seq_len: int, device, seed: int = 0):
    """Random token ids and next-token targets, [batch, seq_len] int64."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab, (batch, seq_len + 1), generator=gen, device=device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
