"""Every way a user runs a LoRA training step on a GPU trains, in bf16 autocast and in float32:
eager, a CUDA graph of the whole step, ``torch.compile(fullgraph=True)`` in the default and the
``max-autotune-no-cudagraphs`` modes, each with and without the opt-in grouped q/k/v
(``group_shared_input``). Each path's first-step gradients are checked against the plain formula
in float64, and three optimizer steps must leave finite, changed factors.

Needs a CUDA device (skipped without one). CI has no GPU: run it on the device machine,
``python -m pytest tests/torch_impl/test_train_paths_cuda.py``. (Issue 24: on an H100 with torch
2.11.0+cu130, ``torch.compile`` failed to trace the fused bf16 backward, ``addmm() got multiple
values for argument 'beta'``; compiled LoRA now takes the plain formula, which Inductor fuses.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_impl import AdaptedModel, LoRA, fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

WIDTH, RANK = 64, 8
TARGETS = ["*.query", "*.key", "*.value", "*.dense"]
PATHS = ["eager", "graph", "compile", "compile-max-autotune-no-cudagraphs"]


class Block(nn.Module):
    """A pre-norm attention block with transformers' layer names (query, key, value, dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.query, self.key, self.value, self.dense = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        scores = self.query(h) @ self.key(h).transpose(-1, -2) / WIDTH**0.5
        return x + self.dense(torch.softmax(scores, dim=-1) @ self.value(h))


def _model(grouped: bool) -> AdaptedModel:
    torch.manual_seed(0)
    model = AdaptedModel(
        nn.Sequential(Block(), Block()), LoRA, target_layers=TARGETS, adapter_kwargs={"rank": RANK}
    ).cuda()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("adapter_up_proj.weight"):
                param.normal_(0.0, 0.1)
    if grouped:
        assert fused.group_shared_input(model) == 2
    return model


def _loss(model: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        y = model(x)
    return y.float().square().mean()


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _reference_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """First-step gradients of the plain formula in float64."""
    reference = copy.deepcopy(model).double()
    fused.ungroup_shared_input(reference)
    with fused.disabled():
        _loss(reference, x.double(), bf16=False).backward()
    return [p.grad for p in _trainable(reference)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("grouped", [False, True], ids=["ours", "ours+qkv"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("path", PATHS)
def test_lora_training_step_trains_on_every_path(path: str, dtype: str, grouped: bool) -> None:
    if grouped and path == "compile-max-autotune-no-cudagraphs":
        pytest.skip("compiled steps take the separate layers; one compiled grouped mode is enough")
    bf16 = dtype == "bf16"
    model = _model(grouped)
    x = torch.randn(4, 16, WIDTH, device="cuda")
    expected = _reference_grads(model, x)
    before = [p.detach().clone() for p in _trainable(model)]
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2, fused=True, capturable=True)
    runner: nn.Module = model
    if path.startswith("compile"):
        torch._dynamo.reset()
        mode = None if path == "compile" else path.removeprefix("compile-")
        runner = torch.compile(model, fullgraph=True, mode=mode)

    def step() -> torch.Tensor:
        loss = _loss(runner, x, bf16)
        loss.backward()
        optimizer.step()
        return loss

    if path == "graph":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, then the weights are put back
            warm_optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2, fused=True, capturable=True)
            for _ in range(2):
                warm_optimizer.zero_grad(set_to_none=True)
                _loss(model, x, bf16).backward()
                warm_optimizer.step()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():
            for param, old in zip(_trainable(model), before, strict=True):
                param.copy_(old)
                param.grad = torch.zeros_like(param)
        # AdamW's state must exist before capture: one step with lr 0 on zero gradients makes it.
        optimizer.param_groups[0]["lr"] = 0.0
        optimizer.step()
        optimizer.param_groups[0]["lr"] = 1e-2
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step()

        def run() -> torch.Tensor:
            for param in _trainable(model):
                param.grad.zero_()
            graph.replay()
            return static_loss

    else:

        def run() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            return step()

    losses = [run().item()]
    for got, want in zip([p.grad for p in _trainable(model)], expected, strict=True):
        assert got.dtype == torch.float32
        assert _rel(got, want) < (3e-2 if bf16 else 1e-3)
    losses += [run().item() for _ in range(2)]
    torch.cuda.synchronize()
    assert all(torch.isfinite(torch.tensor(losses)))
    for param, old in zip(_trainable(model), before, strict=True):
        assert torch.isfinite(param).all() and not torch.equal(param, old)
