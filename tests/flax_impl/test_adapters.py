"""flax_impl.adapters: LoRA, Houlsby, AdaptedModel and its trainable filter, mirroring torch_impl."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from flax_impl import (
    AdaptedModel,
    AdapterInsertionError,
    HoulsbyAdapterLinear,
    LoRA,
    Swish,
    is_layer_adaptable,
    replace_module,
)
from flax_impl.graph import named_modules
from tests.zoo.flax_models import Conv2dBatchNormNet, SeedMLP, StackedLinears
from twinformat.errors import NoMatchError

SETTINGS = settings(max_examples=15, deadline=None)
FEW = settings(max_examples=8, deadline=None)


def _randomize(variable: nnx.Variable, seed: int) -> None:
    value = variable[...]
    variable[...] = jax.random.normal(jax.random.key(seed), value.shape, value.dtype)


# ---------------------------------------------------------------------------------------------
# Swish


def test_swish_is_silu_of_beta_times_x():
    x = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(Swish()(x), jax.nn.silu(x), rtol=1e-6)
    np.testing.assert_allclose(Swish(beta=0.5)(x), jax.nn.silu(0.5 * x), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# LoRA


@FEW
@given(
    # Few distinct shapes, so that eagerly compiled ops are reused across examples.
    in_features=st.sampled_from([1, 4, 7]),
    out_features=st.sampled_from([1, 4, 7]),
    rank=st.sampled_from([1, 4]),
    alpha=st.floats(0.5, 32.0),
    use_bias=st.booleans(),
)
def test_lora_linear_factor_shapes_scaling_and_zero_init(in_features, out_features, rank, alpha, use_bias):
    base = nnx.Linear(in_features, out_features, use_bias=use_bias, rngs=nnx.Rngs(0))
    lora = LoRA(base, rank=rank, alpha=alpha, rngs=nnx.Rngs(1))
    assert lora.pretrained_module is base
    assert lora.adapter_down_proj.kernel.shape == (in_features, rank)
    assert lora.adapter_up_proj.kernel.shape == (rank, out_features)
    assert lora.adapter_down_proj.bias is None and lora.adapter_up_proj.bias is None
    assert lora.scaling == pytest.approx(alpha / rank)
    assert not jnp.any(lora.adapter_up_proj.kernel[...])
    x = jax.random.normal(jax.random.key(2), (3, in_features))
    np.testing.assert_array_equal(lora(x), base(x))  # a fresh adapter changes nothing


def test_lora_output_is_base_plus_scaled_low_rank_update():
    base = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    lora = LoRA(base, rank=2, alpha=3.0, rngs=nnx.Rngs(1))
    _randomize(lora.adapter_up_proj.kernel, 2)
    x = jax.random.normal(jax.random.key(3), (6, 5))
    down, up = lora.adapter_down_proj.kernel[...], lora.adapter_up_proj.kernel[...]
    np.testing.assert_allclose(lora(x), base(x) + (x @ down @ up) * 1.5, rtol=1e-5, atol=1e-6)


def test_lora_down_projection_starts_like_torch_default_init():
    # PyTorch's default Linear init is U(-1/sqrt(in), 1/sqrt(in)); the twin draws from the same law.
    lora = LoRA(nnx.Linear(400, 8, rngs=nnx.Rngs(0)), rank=64, rngs=nnx.Rngs(1))
    down = np.asarray(lora.adapter_down_proj.kernel[...])
    assert np.abs(down).max() <= 1 / np.sqrt(400)
    assert np.std(down) == pytest.approx(1 / np.sqrt(3 * 400), rel=0.05)


@st.composite
def conv_geometries(draw):
    spatial = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(spatial))
    strides = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(
        st.sampled_from(["SAME", "VALID", "int", "pairs"]).map(
            lambda p: 1 if p == "int" else [(1, 0)] * spatial if p == "pairs" else p
        )
    )
    size = draw(st.integers(5, 7))
    return {
        "spatial": spatial,
        "kernel_size": kernel,
        "strides": strides,
        "kernel_dilation": dilation,
        "padding": padding,
        "size": size,
        "in_features": draw(st.integers(1, 4)),
        "out_features": draw(st.integers(1, 4)),
        "rank": draw(st.integers(1, 3)),
    }


@SETTINGS
@given(geometry=conv_geometries())
def test_lora_conv_copies_geometry_and_keeps_output_shape(geometry):
    g = geometry
    x = jax.ShapeDtypeStruct((2,) + (g["size"],) * g["spatial"] + (g["in_features"],), jnp.float32)

    def build_and_apply(x):
        # Traced only (jax.eval_shape): shapes and geometry without compiling a kernel per example.
        base = nnx.Conv(
            g["in_features"],
            g["out_features"],
            kernel_size=g["kernel_size"],
            strides=g["strides"],
            padding=g["padding"],
            kernel_dilation=g["kernel_dilation"],
            rngs=nnx.Rngs(0),
        )
        lora = LoRA(base, rank=g["rank"], rngs=nnx.Rngs(1))
        down = lora.adapter_down_proj
        assert (down.strides, down.padding, down.kernel_dilation) == (
            g["strides"],
            g["padding"],
            g["kernel_dilation"],
        )
        return lora(x), base(x), down.kernel[...], lora.adapter_up_proj.kernel[...]

    out, base_out, down, up = jax.eval_shape(build_and_apply, x)
    assert down.shape == (*g["kernel_size"], g["in_features"], g["rank"])
    assert up.shape == (1,) * g["spatial"] + (g["rank"], g["out_features"])
    assert out.shape == base_out.shape


@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_lora_conv_fresh_adapter_changes_nothing(spatial):
    base = nnx.Conv(2, 3, kernel_size=(3,) * spatial, strides=2, padding=[(1, 1)] * spatial, rngs=nnx.Rngs(0))
    lora = LoRA(base, rank=2, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (1,) + (5,) * spatial + (2,))
    np.testing.assert_array_equal(lora(x), base(x))


def test_lora_refuses_unsupported_layer_naming_its_type():
    with pytest.raises(ValueError, match=r"LoRA supports nnx.Linear, nnx.Conv.*and nnx.Embed.*LayerNorm"):
        LoRA(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))  # nnx.Embed is supported (PEFT habit)
    with pytest.raises(ValueError, match="LinearGeneral"):
        LoRA(nnx.LinearGeneral(4, (2, 2), rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="ConvTranspose"):
        LoRA(nnx.ConvTranspose(2, 2, kernel_size=(3,), rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "4"])
def test_lora_refuses_rank_below_one_or_not_an_integer(rank):
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got"):
        LoRA(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rank=rank, rngs=nnx.Rngs(1))


def test_lora_refuses_grouped_conv_naming_the_group_count():
    conv = nnx.Conv(4, 4, kernel_size=(3,), feature_group_count=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"feature_group_count != 1, got feature_group_count=2 for nnx.Conv"):
        LoRA(conv, rngs=nnx.Rngs(1))


def test_lora_refuses_masked_and_four_dimensional_convs():
    masked = nnx.Conv(2, 2, kernel_size=(3,), mask=jnp.ones((3, 2, 2)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="masked"):
        LoRA(masked, rngs=nnx.Rngs(1))
    conv4d = nnx.Conv(2, 2, kernel_size=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"1, 2 or 3 spatial dims, got kernel_size=\(1, 1, 1, 1\)"):
        LoRA(conv4d, rngs=nnx.Rngs(1))


def test_lora_factors_follow_the_wrapped_layers_param_dtype_dtype_and_precision():
    base = nnx.Linear(
        4,
        3,
        param_dtype=jnp.bfloat16,
        dtype=jnp.bfloat16,
        precision=jax.lax.Precision.HIGHEST,
        rngs=nnx.Rngs(0),
    )
    lora = LoRA(base, rank=2, rngs=nnx.Rngs(1))
    for factor in (lora.adapter_down_proj, lora.adapter_up_proj):
        assert factor.kernel[...].dtype == jnp.bfloat16
        assert factor.dtype == jnp.bfloat16 and factor.precision == jax.lax.Precision.HIGHEST
    assert lora(jnp.ones((2, 4), jnp.bfloat16)).dtype == jnp.bfloat16
    conv = LoRA(
        nnx.Conv(2, 3, kernel_size=(3,), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1)
    )
    assert conv.adapter_down_proj.kernel[...].dtype == conv.adapter_up_proj.kernel[...].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# Houlsby


def test_houlsby_shapes_zero_biases_and_forward_formula():
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    adapter = HoulsbyAdapterLinear(base, 3, rngs=nnx.Rngs(1))
    assert adapter.pretrained_linear is base
    assert adapter.adapter_down_proj.kernel.shape == (5, 3)
    assert adapter.adapter_up_proj.kernel.shape == (3, 5)
    assert not jnp.any(adapter.adapter_down_proj.bias[...]) and not jnp.any(adapter.adapter_up_proj.bias[...])
    assert isinstance(adapter.activation, Swish)
    x = jax.random.normal(jax.random.key(2), (4, 6))
    h = base(x)
    expected = (
        jax.nn.silu(h @ adapter.adapter_down_proj.kernel[...]) @ adapter.adapter_up_proj.kernel[...] + h
    )
    np.testing.assert_allclose(adapter(x), expected, rtol=1e-5, atol=1e-6)


def test_houlsby_without_bias_and_with_another_activation():
    adapter = HoulsbyAdapterLinear(
        nnx.Linear(4, 4, rngs=nnx.Rngs(0)), 2, activation=nnx.Sequential, bias=False, rngs=nnx.Rngs(1)
    )
    assert adapter.adapter_down_proj.bias is None and adapter.adapter_up_proj.bias is None
    x = jnp.ones((1, 4))
    h = adapter.pretrained_linear(x)
    expected = h @ adapter.adapter_down_proj.kernel[...] @ adapter.adapter_up_proj.kernel[...] + h
    np.testing.assert_allclose(adapter(x), expected, rtol=1e-5)


def test_houlsby_refuses_anything_but_linear_naming_its_type():
    conv = nnx.Conv(2, 2, kernel_size=(3,), rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"HoulsbyLinear currently only supports linear layers, but instead got .*Conv"
    ):
        HoulsbyAdapterLinear(conv, 2, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="projection_size must be an integer >= 1, got 0"):
        HoulsbyAdapterLinear(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 0, rngs=nnx.Rngs(1))


# ---------------------------------------------------------------------------------------------
# is_layer_adaptable, replace_module


def test_is_layer_adaptable_by_type_flags_and_patterns():
    linear = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    conv = nnx.Conv(2, 2, kernel_size=(1,), rngs=nnx.Rngs(0))
    assert is_layer_adaptable("x", linear, True, False, ())
    assert not is_layer_adaptable("x", conv, True, False, ())
    assert is_layer_adaptable("x", conv, False, True, ())
    assert is_layer_adaptable("blocks.1", linear, False, False, ["blocks.*"])
    assert not is_layer_adaptable("", linear, False, False, ["*"])  # the root has no name to match
    # A single string is one pattern (SpeechBrain would iterate its characters).
    assert not is_layer_adaptable("l", linear, False, False, "layer1")


def test_replace_module_assigns_on_parent_including_list_items():
    model = StackedLinears(nnx.Rngs(0))
    replace_module(model, "blocks.1", Swish())
    assert isinstance(model.blocks[1], Swish)
    replace_module(model, "norm", Swish(2.0))
    assert model.norm.beta == 2.0
    with pytest.raises(ValueError, match="root module cannot be replaced"):
        replace_module(model, "", Swish())


# ---------------------------------------------------------------------------------------------
# AdaptedModel


def _seed_example(**kwargs) -> AdaptedModel:
    options = {"target_layers": ["layer[13]"], "unfrozen_layers": ["layer2"], "adapter_kwargs": {"rank": 2}}
    options.update(kwargs)
    return AdaptedModel(SeedMLP(nnx.Rngs(0)), LoRA, rngs=nnx.Rngs(1), **options)


def test_adapted_model_wraps_the_seed_example_like_torch():
    model = _seed_example()
    inner = model.adapted_model
    assert [type(inner.layer1).__name__, type(inner.layer2).__name__, type(inner.layer3).__name__] == [
        "LoRA",
        "Linear",
        "LoRA",
    ]
    assert model.replace_layers == ["layer1", "layer3"] and model.unfrozen_module_names == ["layer2"]
    assert inner.layer1.adapter_down_proj.kernel.shape == (10, 2)
    names = [name for name, _ in named_modules(model)]
    assert "adapted_model.layer1.pretrained_module" in names
    x = jnp.ones((3, 10))
    np.testing.assert_array_equal(model(x), SeedMLP(nnx.Rngs(0))(x))  # fresh adapters change nothing


def test_adapted_model_all_linear_and_all_conv_select_by_type():
    model = AdaptedModel(Conv2dBatchNormNet(nnx.Rngs(0)), LoRA, all_conv=True, rngs=nnx.Rngs(1))
    assert model.replace_layers == ["conv1", "conv2"]
    model = AdaptedModel(Conv2dBatchNormNet(nnx.Rngs(0)), LoRA, all_linear=True, rngs=nnx.Rngs(1))
    assert model.replace_layers == ["head"]


def test_adapted_model_patterns_select_list_items_by_digit_names():
    model = AdaptedModel(StackedLinears(nnx.Rngs(0)), LoRA, target_layers="blocks.[02]", rngs=nnx.Rngs(1))
    assert model.replace_layers == ["blocks.0", "blocks.2"]
    assert isinstance(model.adapted_model.blocks[0], LoRA) and isinstance(
        model.adapted_model.blocks[1], nnx.Linear
    )


def test_adapted_model_single_string_pattern_is_one_pattern():
    # SpeechBrain iterates "layer1" as characters; a one-letter name would then match.
    model = _seed_example(target_layers="layer1", unfrozen_layers="layer2")
    assert model.replace_layers == ["layer1"] and model.unfrozen_module_names == ["layer2"]


@pytest.mark.parametrize("argument", ["target_layers", "unfrozen_layers"])
def test_adapted_model_pattern_matching_nothing_raises_naming_pattern_and_real_names(argument):
    with pytest.raises(NoMatchError, match=rf"{argument} pattern 'layr1' matches no layer.*'layer1'"):
        _seed_example(**{argument: ["layr1"]})


def test_adapted_model_all_linear_or_all_conv_without_such_layers_raises():
    with pytest.raises(NoMatchError, match="all_conv=True but the model has no nnx.Conv layer"):
        AdaptedModel(SeedMLP(nnx.Rngs(0)), LoRA, all_conv=True, rngs=nnx.Rngs(1))
    with pytest.raises(NoMatchError, match="all_linear=True but the model has no nnx.Linear layer"):
        AdaptedModel(nnx.Sequential(Swish()), LoRA, all_linear=True, rngs=nnx.Rngs(1))


def test_adapted_model_target_of_unsupported_type_raises_naming_the_type():
    with pytest.raises(ValueError, match="but instead got .*LayerNorm"):
        AdaptedModel(StackedLinears(nnx.Rngs(0)), LoRA, target_layers="norm", rngs=nnx.Rngs(1))


def test_adapted_model_refuses_non_module_and_bad_rngs():
    with pytest.raises(TypeError, match="model_to_adapt must be an nnx.Module, got int"):
        AdaptedModel(3, LoRA, all_linear=True, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rngs must be an nnx.Rngs"):
        AdaptedModel(SeedMLP(nnx.Rngs(0)), LoRA, all_linear=True, rngs=0)


def test_manual_insertion_waits_then_second_insert_raises_instead_of_double_wrapping():
    model = _seed_example(manual_adapter_insertion=True)
    assert isinstance(model.adapted_model.layer1, nnx.Linear) and not model.adapters_inserted
    model.insert_adapters()
    assert isinstance(model.adapted_model.layer1, LoRA)
    assert "rngs" not in vars(model)  # the kept Rngs is dropped once used
    with pytest.raises(AdapterInsertionError, match=r"already called.*\['layer1', 'layer3'\]"):
        model.insert_adapters(rngs=nnx.Rngs(2))
    assert isinstance(model.adapted_model.layer1.pretrained_module, nnx.Linear)


def test_adapting_a_model_whose_root_is_a_linear_works():
    base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    model = AdaptedModel(base, LoRA, all_linear=True, adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(1))
    assert isinstance(model.adapted_model, LoRA) and model.adapted_model.pretrained_module is base
    assert model.replace_layers == [""]
    paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, model.trainable))}
    assert paths == {
        ("adapted_model", "adapter_down_proj", "kernel"),
        ("adapted_model", "adapter_up_proj", "kernel"),
    }


def test_getattr_falls_back_to_the_adapted_model_without_shadowing_the_wrapper():
    model = _seed_example()
    assert model.layer2 is model.adapted_model.layer2  # fallback
    assert model.replace_layers == ["layer1", "layer3"]  # the wrapper's own attribute
    model.adapted_model.replace_layers = "shadow"
    assert model.replace_layers == ["layer1", "layer3"]
    with pytest.raises(AttributeError, match="no_such_attribute"):
        model.no_such_attribute  # noqa: B018


# ---------------------------------------------------------------------------------------------
# The trainable filter


def test_trainable_selects_adapters_and_unfrozen_layers_only():
    model = _seed_example()
    paths = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, model.trainable))}
    assert paths == {
        "adapted_model.layer1.adapter_down_proj.kernel",
        "adapted_model.layer1.adapter_up_proj.kernel",
        "adapted_model.layer2.kernel",
        "adapted_model.layer2.bias",
        "adapted_model.layer3.adapter_down_proj.kernel",
        "adapted_model.layer3.adapter_up_proj.kernel",
    }


def test_trainable_is_hashable_and_equal_across_accesses():
    model = _seed_example()
    assert model.trainable == model.trainable and hash(model.trainable) == hash(model.trainable)
    assert model.trainable != _seed_example(unfrozen_layers=()).trainable


def test_trainable_excludes_adapted_layers_inside_unfrozen_modules_and_buffers():
    # torch_impl unfreezes the block, then LoRA freezes the layer it wraps again.
    model = AdaptedModel(
        StackedLinears(nnx.Rngs(0)),
        LoRA,
        target_layers="blocks.1",
        unfrozen_layers="blocks",
        rngs=nnx.Rngs(1),
    )
    paths = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, model.trainable))}
    assert "adapted_model.blocks.0.kernel" in paths
    assert "adapted_model.blocks.1.adapter_down_proj.kernel" in paths
    assert not any("pretrained_module" in path for path in paths)
    assert not any(path.startswith("adapted_model.norm") for path in paths)
    conv = AdaptedModel(
        Conv2dBatchNormNet(nnx.Rngs(0)), LoRA, all_conv=True, unfrozen_layers="bn", rngs=nnx.Rngs(1)
    )
    selected = nnx.state(conv, conv.trainable)
    assert set(selected["adapted_model"]["bn"]) == {"scale", "bias"}  # running stats are no Param


def test_grads_through_diffstate_hold_only_trainable_paths():
    model = _seed_example()
    x, y = jnp.ones((2, 10)), jnp.zeros((2, 10))

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    _, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(model)
    grad_paths = {path for path, _ in nnx.to_flat_state(grads)}
    trainable_paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, model.trainable))}
    assert grad_paths == trainable_paths


def test_optimizer_with_wrt_trainable_updates_only_trainable_params():
    model = _seed_example()
    frozen_before = {
        p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(model.trainable)))
    }
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=model.trainable)
    x, y = jnp.ones((2, 10)), jnp.ones((2, 10))
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, model.trainable))(model)
    optimizer.update(model, grads)
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Not(model.trainable))):
        np.testing.assert_array_equal(np.asarray(value[...]), frozen_before[path])
    assert jnp.any(model.adapted_model.layer1.adapter_up_proj.kernel[...])


def test_unfreeze_star_also_selects_the_root_like_speechbrain_and_torch_impl():
    """SpeechBrain fnmatches the root's empty name against unfrozen_layers, so "*" unfreezes
    every weight not wrapped by an adapter; both twins agree."""
    model = AdaptedModel(
        SeedMLP(nnx.Rngs(0)), LoRA, target_layers="layer1", unfrozen_layers="*", rngs=nnx.Rngs(1)
    )
    assert "" in model.unfrozen_module_names
    paths = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, model.trainable))}
    assert "adapted_model.layer2.kernel" in paths and "adapted_model.layer3.bias" in paths
    assert "adapted_model.layer1.pretrained_module.kernel" not in paths


def test_refused_insertion_leaves_the_model_unchanged_and_names_the_layer():
    """Adapters are all built before any layer is replaced: a refused layer changes nothing."""
    base = StackedLinears(nnx.Rngs(0))
    names_before = [name for name, _ in named_modules(base)]
    with pytest.raises(ValueError, match="cannot wrap layer 'norm'"):
        AdaptedModel(base, LoRA, target_layers=["blocks.*", "norm"], rngs=nnx.Rngs(1))
    assert [name for name, _ in named_modules(base)] == names_before


def test_layer_adapter_kwargs_set_one_layers_rank_and_a_name_it_does_not_adapt_is_refused():
    class Two(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.a = nnx.Linear(4, 6, rngs=rngs)
            self.b = nnx.Linear(6, 3, rngs=rngs)

    adapted = AdaptedModel(
        Two(nnx.Rngs(0)),
        LoRA,
        target_layers=["a", "b"],
        adapter_kwargs={"rank": 2},
        layer_adapter_kwargs={"b": {"rank": 5}},
        rngs=nnx.Rngs(1),
    )
    assert adapted.adapted_model.a.adapter_down_proj.kernel.shape == (4, 2)
    assert adapted.adapted_model.b.adapter_down_proj.kernel.shape == (6, 5)
    plain = Two(nnx.Rngs(0))
    with pytest.raises(NoMatchError, match=r"layer_adapter_kwargs names 'c', .* it adapts: 'a', 'b'"):
        AdaptedModel(plain, LoRA, target_layers=["a", "b"], layer_adapter_kwargs={"c": {}}, rngs=nnx.Rngs(1))
    assert type(plain.a) is nnx.Linear
