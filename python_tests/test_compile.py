"""torch.compile over a training step with FusedMergOptAdamW (CPU), and CUDA-graph capture
(skipped without a GPU). The step is one custom op per bucket in the graph: the native op (a
TORCH_LIBRARY op with a fake registration) or, for Triton, ``mergopt_triton::fused_step`` (run
here through Triton's interpreter), so the whole optimizer step compiles into one graph."""

from __future__ import annotations

import copy

import pytest
import torch

from mergopt_kernels import FusedMergOptAdamW
from mergopt_kernels.ops import native

OPTIONS = dict(lr=1e-2, weight_decay=0.05, noise_scale=0.05)
needs_native = pytest.mark.skipif(not native.available("cpu"),
                                  reason="the native CPU op is not built: the torch backend reads scalars on the host")


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2))


def data(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def run_eager(seed, batches, backend="auto"):
    model = mlp()
    opt = FusedMergOptAdamW(model.parameters(), seed=seed, backend=backend, **OPTIONS)
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with opt.clean_weights():
        return [p.detach().clone() for p in model.parameters()], losses


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native), "triton"])
def test_compiled_step_is_one_graph_and_matches_eager(backend, fresh_seed):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    batches = data()
    model = mlp()
    opt = FusedMergOptAdamW(model.parameters(), seed=fresh_seed, backend=backend, **OPTIONS)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_model = torch.compile(model, backend="aot_eager")

    @torch.compile(backend=counter, fullgraph=True)  # fullgraph: a graph break would raise
    def optimizer_step():
        opt.step()

    losses = []
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(compiled_model(x), y)
        loss.backward()
        optimizer_step()
        opt.zero_grad()
        losses.append(loss.item())
    assert counter.frame_count == 1  # compiled once, no recompilation per step
    assert opt.noise_step() == len(batches) + 1
    expected, expected_losses = run_eager(fresh_seed, batches, backend)
    assert losses == expected_losses
    with opt.clean_weights():
        for p, q in zip(model.parameters(), expected):
            assert torch.equal(p, q)


@needs_native
def test_inductor_training_step_matches_eager(fresh_seed):
    """Inductor fuses the model's kernels differently, so agreement is up to fp32 rounding."""
    torch._dynamo.reset()
    batches = data(3)
    model = mlp()
    opt = FusedMergOptAdamW(model.parameters(), seed=fresh_seed, **OPTIONS)

    @torch.compile
    def train_step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    @torch.compile(fullgraph=True)
    def optimizer_step():
        opt.step()

    losses = []
    for x, y in batches:
        losses.append(train_step(x, y).item())
        optimizer_step()
        opt.zero_grad()
    expected, expected_losses = run_eager(fresh_seed, batches)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=1e-6)
    with opt.clean_weights():
        for p, q in zip(model.parameters(), expected):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
def test_cuda_graph_capture_and_replay(fresh_seed):
    """The whole training step (forward, backward, optimizer step) in one CUDA graph.

    Gradients are zeroed in place inside the graph (set_to_none=False), so their addresses and
    the optimizer's address tables stay those of the warm-up steps."""
    batches = [(x.cuda(), y.cuda()) for x, y in data(6)]
    model = mlp().cuda()
    eager = copy.deepcopy(model)
    opt = FusedMergOptAdamW(model.parameters(), seed=fresh_seed, **OPTIONS)
    eager_opt = FusedMergOptAdamW(eager.parameters(), seed=fresh_seed, **OPTIONS)
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    def step():
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.mse_loss(model(static_x), static_y)
        loss.backward()
        opt.step()
        return loss

    warmup = 2
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:warmup]:
            static_x.copy_(x)
            static_y.copy_(y)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    losses = []
    for x, y in batches[warmup:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        losses.append(static_loss.item())

    expected_losses = []
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(eager(x), y)
        loss.backward()
        eager_opt.step()
        eager_opt.zero_grad()
        expected_losses.append(loss.item())
    assert opt.noise_step() == eager_opt.noise_step() == len(batches) + 1
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses[warmup:]), rtol=1e-5, atol=1e-6)
    with opt.clean_weights(), eager_opt.clean_weights():
        for p, q in zip(model.parameters(), eager.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
