"""The CUDA-only branches of ``torch_impl.fused`` (skipped without a GPU): factor gradients written
in float32 straight from bf16 GEMMs (``out_dtype``), the grouped q/k/v function, CUDA-graph
capture. Run on the device machine; CI has no GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_impl import LoRA
from torch_impl.fused import group_shared_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _layer(bias: bool = True) -> LoRA:
    torch.manual_seed(0)
    layer = LoRA(nn.Linear(96, 80, bias=bias), rank=8, alpha=16.0).cuda()
    with torch.no_grad():
        layer.adapter_up_proj.weight.normal_()
    return layer


def _grads(fn, layer, x, g):
    x = x.detach().requires_grad_(True)
    y = fn(x)
    return y, torch.autograd.grad(y, [x, layer.adapter_down_proj.weight, layer.adapter_up_proj.weight], g)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_autocast_gradients_are_float32_and_at_least_as_accurate_as_the_plain_formula(bias):
    layer = _layer(bias)
    x, g = torch.randn(4, 33, 96, device="cuda"), torch.randn(4, 33, 80, device="cuda")
    reference = copy.deepcopy(layer).double()
    _, ref = _grads(reference, reference, x.double(), g.double())

    def plain(t):
        return layer.pretrained_module(t) + layer.adapter_up_proj(layer.adapter_down_proj(t)) * layer.scaling

    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, ours = _grads(layer, layer, x, g)
        _, theirs = _grads(plain, layer, x, g)
    assert y.dtype == torch.bfloat16 and y.grad_fn.name() == "_LoRALinearFunctionBackward"
    for mine, other, exact in zip(ours, theirs, ref, strict=True):
        assert mine.dtype == other.dtype
        assert _rel(mine, exact) < 2e-2
        assert _rel(mine, exact) <= 1.5 * _rel(other, exact) + 1e-3


def test_grouped_function_on_cuda_matches_separate_layers_under_autocast():
    torch.manual_seed(0)
    parent = nn.Module()
    parent.query, parent.key, parent.value = (_layer() for _ in range(3))
    separate = copy.deepcopy(parent)
    group_shared_input(parent)
    x = torch.randn(2, 40, 96, device="cuda")
    outs = []
    for module in (parent, separate):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = module.query(x) + 2 * module.key(x) - module.value(x)
        y.float().square().mean().backward()
        outs.append([p.grad for p in module.parameters() if p.requires_grad])
    for mine, theirs in zip(*outs, strict=True):
        assert mine.dtype == theirs.dtype == torch.float32
        assert _rel(mine, theirs) < 1e-2


def test_fused_training_step_captures_in_a_cuda_graph():
    layer = _layer()
    optimizer = torch.optim.AdamW(
        [p for p in layer.parameters() if p.requires_grad], fused=True, capturable=True
    )
    x = torch.randn(64, 96, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = layer(x).float().square().mean()
        loss.backward()
        optimizer.step()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    before = layer.adapter_up_proj.weight.detach().clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and not torch.equal(before, layer.adapter_up_proj.weight)
