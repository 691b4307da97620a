"""Model-level conversion: bit-exact round trips, same function, adapters, strict reports."""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import converters
import flax_impl
import torch_impl
from converters.views import ConversionError, UnknownLayerError
from tests.zoo import flax_models, torch_models
from tests.zoo.arrays import (
    flax_arrays,
    flax_output,
    randomize_flax,
    randomize_torch,
    same_bits,
    torch_arrays,
    torch_output,
)
from tests.zoo.flax_models import ZeroConv, ZeroEmbed, ZeroLinear
from tests.zoo.layers import (
    DTYPES,
    LAYER_KINDS,
    conv_batch,
    flax_layer,
    layer_input,
    token_batch,
    torch_layer,
)

NBT = ("num_batches_tracked",)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_torch_to_flax_to_torch_is_bit_exact_for_every_layer_kind_and_dtype(kind, dtype):
    source = torch_layer(kind, dtype)
    twin = flax_layer(kind, dtype, seed=1)
    back = torch_layer(kind, dtype)
    randomize_torch(back, seed=7)

    converters.torch_to_flax(source, twin)
    report = converters.flax_to_torch(twin, back)

    assert report.ok and not same_bits(torch_arrays(source), torch_arrays(back), skip=NBT)
    assert all(a.dtype.name == dtype for k, a in flax_arrays(twin).items() if k not in ("mean", "var"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_flax_to_torch_to_flax_is_bit_exact_for_every_layer_kind_and_dtype(kind, dtype):
    source = flax_layer(kind, dtype, seed=2)
    middle = torch_layer(kind, dtype)
    back = flax_layer(kind, dtype, seed=3)

    converters.flax_to_torch(source, middle)
    converters.torch_to_flax(middle, back)

    assert not same_bits(flax_arrays(source), flax_arrays(back))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_converted_layer_computes_the_same_function(kind):
    source, twin = torch_layer(kind), flax_layer(kind, seed=4)
    converters.torch_to_flax(source, twin)
    x_torch, x_flax = layer_input(kind)
    np.testing.assert_allclose(
        flax_output(twin, x_flax), torch_output(source, x_torch, kind), rtol=1e-5, atol=1e-5
    )


def test_square_linear_is_transposed_and_a_swapped_kernel_computes_a_different_function():
    source = randomize_torch(nn.Linear(4, 4))
    twin = ZeroLinear(4, 4, rngs=nnx.Rngs(0))
    converters.torch_to_flax(source, twin)
    weight = source.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(twin.kernel[...]), weight.T)

    x = np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32)
    expected = source(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(twin(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)
    twin.kernel.set_value(jnp.asarray(weight))  # what a name-and-shape-only converter would load
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(np.asarray(twin(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    in_features=st.integers(1, 6),
    out_features=st.integers(1, 6),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)
def test_linear_geometries_round_trip_bit_exact(in_features, out_features, bias, dtype):
    source = randomize_torch(nn.Linear(in_features, out_features, bias=bias)).to(getattr(torch, dtype))
    twin = ZeroLinear(
        in_features, out_features, use_bias=bias, param_dtype=getattr(jnp, dtype), rngs=nnx.Rngs(0)
    )
    back = nn.Linear(in_features, out_features, bias=bias).to(getattr(torch, dtype))
    converters.torch_to_flax(source, twin)
    converters.flax_to_torch(twin, back)
    assert not same_bits(torch_arrays(source), torch_arrays(back))


@st.composite
def conv_geometries(draw):
    ndim = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
    return {
        "ndim": ndim,
        "in_channels": draw(st.integers(1, 3)),
        "out_channels": draw(st.integers(1, 3)),
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "bias": draw(st.booleans()),
    }


@settings(max_examples=20, deadline=None)
@given(geometry=conv_geometries())
def test_conv_geometries_round_trip_bit_exact_and_compute_the_same_function(geometry):
    g = geometry
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[g["ndim"]]
    source = randomize_torch(
        conv_cls(
            g["in_channels"],
            g["out_channels"],
            g["kernel"],
            stride=g["stride"],
            padding=g["padding"],
            dilation=g["dilation"],
            bias=g["bias"],
        )
    )
    twin = ZeroConv(
        g["in_channels"],
        g["out_channels"],
        g["kernel"],
        strides=g["stride"],
        padding=[(p, p) for p in g["padding"]],
        kernel_dilation=g["dilation"],
        use_bias=g["bias"],
        rngs=nnx.Rngs(0),
    )
    converters.torch_to_flax(source, twin)
    back = conv_cls(g["in_channels"], g["out_channels"], g["kernel"], bias=g["bias"])
    converters.flax_to_torch(twin, back)
    assert not same_bits(torch_arrays(source), torch_arrays(back))

    spatial = [d * (k - 1) + 2 for k, d in zip(g["kernel"], g["dilation"], strict=True)]
    x = np.random.default_rng(0).standard_normal((1, g["in_channels"], *spatial), dtype=np.float32)
    expected = np.moveaxis(source(torch.from_numpy(x)).detach().numpy(), 1, -1)
    np.testing.assert_allclose(
        np.asarray(twin(jnp.asarray(np.moveaxis(x, 1, -1)))), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    ("torch_cls", "flax_cls", "batch"),
    [
        (torch_models.TokenNet, flax_models.TokenNet, token_batch),
        (torch_models.Conv1dNormNet, flax_models.Conv1dNormNet, conv_batch),
    ],
)
def test_converted_models_compute_the_same_function_both_ways(torch_cls, flax_cls, batch):
    source = randomize_torch(torch_cls()).eval()
    twin = flax_cls(nnx.Rngs(0))
    report = converters.torch_to_flax(source, twin)
    x_torch, x_flax = batch()
    np.testing.assert_allclose(flax_output(twin, x_flax), torch_output(source, x_torch), rtol=1e-5, atol=1e-5)

    randomize_flax(twin, seed=5)
    back = torch_cls().eval()
    converters.flax_to_torch(twin, back)
    np.testing.assert_allclose(torch_output(back, x_torch), flax_output(twin, x_flax), rtol=1e-5, atol=1e-5)
    assert report.ok


def test_batchnorm_num_batches_tracked_is_named_in_the_notes_both_ways():
    source = randomize_torch(torch_models.Conv1dNormNet())
    twin = flax_models.Conv1dNormNet(nnx.Rngs(0))
    to_flax = converters.torch_to_flax(source, twin)
    assert any(n.startswith("bn.num_batches_tracked") and "not converted" in n for n in to_flax.notes)
    to_torch = converters.flax_to_torch(twin, torch_models.Conv1dNormNet())
    assert any(n.startswith("bn.num_batches_tracked") and "left as it is" in n for n in to_torch.notes)
    assert "bn.num_batches_tracked" not in to_torch.loaded + to_torch.missing


def _adapted_pair(adapter: str, dtype: str = "float32"):
    if adapter == "lora":
        kwargs = {"rank": 2, "alpha": 3.0}
        torch_model = torch_impl.AdaptedModel(
            torch_models.Conv1dNormNet().to(getattr(torch, dtype)),
            torch_impl.LoRA,
            target_layers=["conv*", "head"],
            adapter_kwargs=kwargs,
        )
        flax_model = flax_impl.AdaptedModel(
            flax_models.Conv1dNormNet(nnx.Rngs(0)),
            flax_impl.LoRA,
            target_layers=["conv*", "head"],
            adapter_kwargs=kwargs,
            rngs=nnx.Rngs(1),
        )
    else:
        kwargs = {"projection_size": 3}
        torch_model = torch_impl.AdaptedModel(
            torch_models.TokenNet().to(getattr(torch, dtype)),
            torch_impl.HoulsbyAdapterLinear,
            target_layers="fc*",
            unfrozen_layers="norm",
            adapter_kwargs=kwargs,
        )
        flax_model = flax_impl.AdaptedModel(
            flax_models.TokenNet(nnx.Rngs(0)),
            flax_impl.HoulsbyAdapterLinear,
            target_layers="fc*",
            unfrozen_layers="norm",
            adapter_kwargs=kwargs,
            rngs=nnx.Rngs(1),
        )
    randomize_torch(torch_model, seed=11)
    return torch_model.eval(), flax_model


@pytest.mark.parametrize("adapter", ["lora", "houlsby"])
def test_adapted_models_round_trip_bit_exact_and_compute_the_same_function(adapter):
    torch_model, flax_model = _adapted_pair(adapter)
    report = converters.torch_to_flax(torch_model, flax_model)
    assert any(".adapter_up_proj." in key for key in report.loaded)
    x_torch, x_flax = conv_batch() if adapter == "lora" else token_batch()
    np.testing.assert_allclose(
        flax_output(flax_model, x_flax), torch_output(torch_model, x_torch), rtol=1e-5, atol=1e-5
    )
    back, _ = _adapted_pair(adapter)
    randomize_torch(back, seed=12)
    converters.flax_to_torch(flax_model, back)
    assert not same_bits(torch_arrays(torch_model), torch_arrays(back), skip=NBT)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_adapter_weights_round_trip_bit_exact_in_half_precision(dtype):
    base = randomize_torch(nn.Sequential(nn.Linear(6, 5), nn.Conv1d(5, 4, 3))).to(getattr(torch, dtype))
    torch_model = torch_impl.AdaptedModel(
        base, torch_impl.LoRA, all_linear=True, all_conv=True, adapter_kwargs={"rank": 2}
    )
    randomize_torch(torch_model, seed=3)

    class FlaxBase(nnx.Module):
        def __init__(self, rngs):
            p = getattr(jnp, dtype)
            self.lin = ZeroLinear(6, 5, param_dtype=p, rngs=rngs)
            self.conv = ZeroConv(5, 4, (3,), padding="VALID", param_dtype=p, rngs=rngs)

    flax_model = flax_impl.AdaptedModel(
        FlaxBase(nnx.Rngs(0)),
        flax_impl.LoRA,
        all_linear=True,
        all_conv=True,
        adapter_kwargs={"rank": 2},
        rngs=nnx.Rngs(1),
    )
    rename = [("adapted_model.0.*", "adapted_model.lin.*"), ("adapted_model.1.*", "adapted_model.conv.*")]
    report = converters.torch_to_flax(torch_model, flax_model, rename=rename)
    assert any(note.startswith("renamed adapted_model.0.adapter_down_proj.weight") for note in report.notes)

    back = torch_impl.AdaptedModel(
        nn.Sequential(nn.Linear(6, 5), nn.Conv1d(5, 4, 3)).to(getattr(torch, dtype)),
        torch_impl.LoRA,
        all_linear=True,
        all_conv=True,
        adapter_kwargs={"rank": 2},
    )
    unrename = [("adapted_model.lin.*", "adapted_model.0.*"), ("adapted_model.conv.*", "adapted_model.1.*")]
    converters.flax_to_torch(flax_model, back, rename=unrename)
    assert not same_bits(torch_arrays(torch_model), torch_arrays(back))
    assert back.adapted_model[0].adapter_up_proj.weight.dtype == getattr(torch, dtype)


def test_adapter_checkpoint_of_either_twin_loads_into_the_other_and_lacks_the_base_by_design(tmp_path):
    torch_model, flax_model = _adapted_pair("lora")
    torch_model.saver(str(tmp_path / "adapter.safetensors"))
    report = converters.torch_to_flax(tmp_path / "adapter.safetensors", flax_model)
    assert sorted(report.loaded) == sorted(torch_model.trainable_state_dict())
    assert report.ok and any("frozen base tensor(s)" in note for note in report.notes)

    flax_model.saver(str(tmp_path / "flax_adapter.safetensors"))
    back, _ = _adapted_pair("lora")
    converters.flax_to_torch(tmp_path / "flax_adapter.safetensors", back)
    for key, value in torch_model.trainable_state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_speechbrain_style_pickled_checkpoint_converts_with_weights_only(tmp_path):
    torch_model, flax_model = _adapted_pair("lora")
    torch_model.saver(str(tmp_path / "adapter.ckpt"))  # torch.save of the trainable state dict
    report = converters.torch_to_flax(tmp_path / "adapter.ckpt", flax_model)
    assert report.ok and len(report.loaded) == len(torch_model.trainable_state_dict())


def test_strict_refusal_lists_missing_unexpected_and_misshaped_keys_and_leaves_the_target_unchanged():
    source = randomize_torch(torch_models.TokenNet())
    state = {k: v.clone() for k, v in source.state_dict().items()}
    del state["fc2.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["fc1.weight"] = torch.zeros(16, 9)
    twin = flax_models.TokenNet(nnx.Rngs(0))
    before = flax_arrays(twin)
    with pytest.raises(ConversionError) as info:
        converters.torch_to_flax(state, twin)
    report = info.value.report
    assert report.missing == ["fc2.bias"] and report.unexpected == ["extra.weight"]
    assert report.mismatched and report.mismatched[0].startswith("fc1.weight")
    assert "fc2.bias" in str(info.value) and "extra.weight" in str(info.value)
    assert not same_bits(before, flax_arrays(twin))


def test_wrong_model_is_refused_and_the_torch_target_is_unchanged():
    target = randomize_torch(torch_models.TokenNet())
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ConversionError, match="conv1.weight"):
        converters.flax_to_torch(flax_models.Conv1dNormNet(nnx.Rngs(0)), target)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_non_strict_loads_what_fits_and_reports_the_rest():
    source = randomize_torch(torch_models.TokenNet())
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc2")}
    state["stray.weight"] = torch.ones(3)
    twin = flax_models.TokenNet(nnx.Rngs(0))
    report = converters.torch_to_flax(state, twin, strict=False)
    assert sorted(report.missing) == ["fc2.bias", "fc2.weight"] and report.unexpected == ["stray.weight"]
    np.testing.assert_array_equal(np.asarray(twin.fc1.kernel[...]), source.fc1.weight.detach().numpy().T)


def test_layer_kind_mismatch_between_source_and_target_is_refused():
    # Same names and shapes: a 4x4 Linear and a 4x4 Embedding differ only by their kind.
    source = nn.Sequential(nn.Linear(4, 4, bias=False))

    class FlaxEmbedHolder(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([ZeroEmbed(4, 4, rngs=nnx.Rngs(0))])

    with pytest.raises(ConversionError, match="linear layer in the source vs a embedding layer"):
        converters.torch_to_flax(source, FlaxEmbedHolder(), rename=[("0.weight", "layers.0.weight")])


def test_dtype_difference_is_refused_when_strict_and_cast_with_a_note_otherwise():
    source = randomize_torch(nn.Linear(3, 2))
    twin = ZeroLinear(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match="dtype F32 in the source vs BF16"):
        converters.torch_to_flax(source, twin)
    report = converters.torch_to_flax(source, twin, strict=False)
    assert any("cast from F32" in note for note in report.notes)
    assert twin.kernel.dtype == jnp.bfloat16


def test_unknown_layer_type_is_refused_by_name():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

    model = nn.Sequential(nn.Linear(3, 3), Scaled())

    class FlaxTwin(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([ZeroLinear(3, 3, rngs=nnx.Rngs(0))])

    with pytest.raises(UnknownLayerError, match=r"'1' \(Scaled\)"):
        converters.torch_to_flax(model, FlaxTwin(), rename=[("0.*", "layers.0.*")])
    report = converters.torch_to_flax(model, FlaxTwin(), rename=[("0.*", "layers.0.*")], strict=False)
    assert any("Scaled" in note for note in report.notes) and report.loaded == [
        "layers.0.weight",
        "layers.0.bias",
    ]


def test_tied_weights_are_named_and_written_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.emb.weight

    source, target = randomize_torch(Tied()), Tied()
    state = {k: v for k, v in source.state_dict().items() if k != "out.weight"}
    report = converters.flax_to_torch(state, target)
    assert any(note.startswith("out.weight: tied alias of emb.weight") for note in report.notes)
    assert torch.equal(target.out.weight, source.emb.weight)

    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["out.weight"] += 1
    with pytest.raises(ConversionError, match="holds different values"):
        converters.flax_to_torch(state, Tied())


def test_rename_patterns_that_match_nothing_raise():
    from twinformat.errors import NoMatchError

    with pytest.raises(NoMatchError, match="nothing.*"):
        converters.torch_to_flax(
            nn.Linear(2, 2), ZeroLinear(2, 2, rngs=nnx.Rngs(0)), rename=[("nothing.*", "x.*")]
        )


def test_wrong_framework_arguments_raise_type_errors():
    with pytest.raises(TypeError, match="use flax_to_torch"):
        converters.torch_to_flax(ZeroLinear(2, 2, rngs=nnx.Rngs(0)), ZeroLinear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="fills a torch.nn.Module"):
        converters.flax_to_torch({}, ZeroLinear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="source must be"):
        converters.torch_to_flax(42, ZeroLinear(2, 2, rngs=nnx.Rngs(0)))


def test_weights_of_an_unknown_torch_layer_are_refused_or_skipped_never_loaded_untransposed():
    class Custom(nn.Module):  # holds a (3, 3) weight, but nothing says in which layout
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 3))

    class FlaxTwin(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([ZeroLinear(3, 3, use_bias=False, rngs=nnx.Rngs(0)) for _ in range(2)])

    source = randomize_flax(FlaxTwin())
    target = nn.Sequential(nn.Linear(3, 3, bias=False), Custom())
    rename = [("layers.*", "*")]
    with pytest.raises(UnknownLayerError, match=r"'1' \(Custom\)"):
        converters.flax_to_torch(source, target, rename=rename)
    report = converters.flax_to_torch(source, target, rename=rename, strict=False)
    assert report.loaded == ["0.weight"] and not report.mismatched
    assert any("Custom has no known PyTorch<->Flax layout, skipped" in note for note in report.notes)
    assert torch.count_nonzero(target[1].weight) == 0
