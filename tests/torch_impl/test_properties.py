"""Property tests over Linear and Conv1d/2d/3d geometries.

For any geometry PyTorch accepts (kernel, stride, padding incl. 'same'/'valid', dilation,
padding_mode, 1-3 spatial dims): a LoRA's output has the base layer's shape, a fresh LoRA
changes nothing, merging equals not merging, unmerging restores the weight, and adapter
checkpoints round-trip through both file formats.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_impl import AdaptedModel, LoRA, merge_lora, unmerge_lora

SETTINGS = settings(max_examples=20, deadline=None)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass
class Geometry:
    """A base layer to adapt, an input it accepts, and the LoRA hyper-parameters."""

    make_layer: callable
    input_shape: tuple[int, ...]
    rank: int
    alpha: float
    kind: str  # "linear" or "conv"

    def layer(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make_layer()


@st.composite
def conv_geometries(draw) -> Geometry:
    dims = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if draw(st.booleans()):  # string padding is only legal with stride 1
        stride = (1,) * dims
        padding = draw(st.sampled_from(["same", "valid"]))
        pad = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
        pad = list(padding)
    # Each spatial size fits the dilated kernel and exceeds the padding (reflect needs that).
    sizes = tuple(
        max(d * (k - 1) + 1, p + 1) + draw(st.integers(0, 3))
        for k, d, p in zip(kernel, dilation, pad, strict=True)
    )
    in_channels, out_channels = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    bias = draw(st.booleans())

    def make_layer():
        return CONV_CLASSES[dims](
            in_channels,
            out_channels,
            kernel_size=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            padding_mode=padding_mode,
            bias=bias,
        )

    return Geometry(
        make_layer,
        (2, in_channels, *sizes),
        rank=draw(st.integers(1, 4)),
        alpha=draw(st.floats(0.25, 8.0)),
        kind="conv",
    )


@st.composite
def linear_geometries(draw) -> Geometry:
    in_features, out_features = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    bias = draw(st.booleans())
    leading = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))  # () is an unbatched input

    def make_layer():
        return nn.Linear(in_features, out_features, bias=bias)

    return Geometry(
        make_layer,
        (*leading, in_features),
        rank=draw(st.integers(1, 8)),
        alpha=draw(st.floats(0.25, 8.0)),
        kind="linear",
    )


geometries = st.one_of(linear_geometries(), conv_geometries())


def _randomize_adapters(lora: LoRA, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proj in (lora.adapter_down_proj, lora.adapter_up_proj):
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) * 0.5)


def _input(geometry: Geometry) -> torch.Tensor:
    return torch.randn(geometry.input_shape, generator=torch.Generator().manual_seed(1))


@SETTINGS
@given(geometries)
def test_lora_output_shape_is_the_base_layers_and_a_fresh_lora_changes_nothing(geometry):
    base = geometry.layer()
    x = _input(geometry)
    expected = base(x)
    lora = LoRA(base, rank=geometry.rank, alpha=geometry.alpha)
    out = lora(x)
    assert out.shape == expected.shape
    assert torch.equal(out, expected)
    _randomize_adapters(lora)
    assert lora(x).shape == expected.shape


@SETTINGS
@given(geometries)
def test_lora_equals_speechbrains_formula_in_value_and_gradient(geometry):
    lora = LoRA(geometry.layer(), rank=geometry.rank, alpha=geometry.alpha)
    _randomize_adapters(lora)
    x = _input(geometry).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out = lora(x)
    down, up = lora.adapter_down_proj, lora.adapter_up_proj
    ref_down, ref_up = copy.deepcopy(down), copy.deepcopy(up)
    ref = lora.pretrained_module(x_ref) + ref_up(ref_down(x_ref)) * lora.scaling
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if out.numel():
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(down.weight.grad, ref_down.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(up.weight.grad, ref_up.weight.grad, rtol=1e-5, atol=1e-5)
    assert lora.pretrained_module.weight.grad is None


@SETTINGS
@given(geometries)
def test_merge_equals_unmerged_output_and_unmerge_restores_the_weight(geometry):
    base = geometry.layer()
    original_weight = base.weight.detach().clone()
    model = nn.Sequential(LoRA(base, rank=geometry.rank, alpha=geometry.alpha))
    _randomize_adapters(model[0])
    x = _input(geometry)
    with torch.no_grad():
        before = model(x)
        assert merge_lora(model) == 1
        merged_out = model(x)
        # Merged, the layer is exactly the base layer with the folded weight.
        assert torch.equal(merged_out, base(x))
        torch.testing.assert_close(merged_out, before, rtol=1e-5, atol=1e-5)
        assert merge_lora(model) == 0  # already merged: nothing to do
        assert unmerge_lora(model) == 1
        torch.testing.assert_close(base.weight, original_weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        assert unmerge_lora(model) == 0


@SETTINGS
@given(geometries, st.sampled_from(["adapters.ckpt", "adapters.safetensors"]))
def test_saver_loader_round_trip_restores_adapters_in_both_formats(geometry, filename):
    base = geometry.layer()
    pristine = copy.deepcopy(base)
    selector = {"all_linear": True} if geometry.kind == "linear" else {"all_conv": True}
    adapter_kwargs = {"rank": geometry.rank, "alpha": geometry.alpha}
    model = AdaptedModel(nn.Sequential(base), LoRA, adapter_kwargs=adapter_kwargs, **selector)
    _randomize_adapters(model.adapted_model[0])
    torch.manual_seed(123)  # the fresh model's adapters start elsewhere
    fresh = AdaptedModel(nn.Sequential(pristine), LoRA, adapter_kwargs=adapter_kwargs, **selector)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / filename
        model.saver(path)
        assert [p.name for p in Path(folder).iterdir()] == [filename]  # no temporary left behind
        fresh.loader(path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = _input(geometry)
    assert torch.equal(fresh(x), model(x))
