"""LoRA's PEFT options in flax_impl: dropout (training only), rsLoRA, DoRA, nnx.Embed targets;
exact merges; merge_and_unload / unload; under nnx.jit."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_impl import (
    AdaptedModel,
    HoulsbyAdapterLinear,
    LoRA,
    MergeError,
    merge_and_unload,
    merge_lora,
    unload,
    unmerge_lora,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _randomize(layer: LoRA, seed: int = 0) -> LoRA:
    key = jax.random.key(seed)
    for name in ("adapter_down_proj", "adapter_up_proj"):
        module = getattr(layer, name)
        table = module.embedding if isinstance(module, nnx.Embed) else module.kernel
        key, sub = jax.random.split(key)
        table[...] = jax.random.normal(sub, table.shape) * 0.3
    if layer.use_dora:
        key, sub = jax.random.split(key)
        layer.adapter_magnitude[...] = layer.adapter_magnitude[...] * (
            1 + 0.2 * jax.random.normal(sub, layer.adapter_magnitude.shape)
        )
    return layer


LAYERS = {
    "linear": (
        lambda: nnx.Linear(6, 5, rngs=nnx.Rngs(0)),
        lambda: jax.random.normal(jax.random.key(9), (4, 6)),
    ),
    "conv1d": (
        lambda: nnx.Conv(3, 4, (3,), padding=[(1, 1)], rngs=nnx.Rngs(0)),
        lambda: jax.random.normal(jax.random.key(9), (2, 7, 3)),
    ),
    "conv2d": (
        lambda: nnx.Conv(3, 4, (3, 2), strides=(2, 1), padding="VALID", rngs=nnx.Rngs(0)),
        lambda: jax.random.normal(jax.random.key(9), (2, 7, 5, 3)),
    ),
    "conv3d": (
        lambda: nnx.Conv(2, 3, (1, 2, 2), padding="VALID", rngs=nnx.Rngs(0)),
        lambda: jax.random.normal(jax.random.key(9), (2, 3, 4, 4, 2)),
    ),
    "embedding": (lambda: nnx.Embed(9, 4, rngs=nnx.Rngs(0)), lambda: jnp.array([[1, 8, 3], [0, 0, 5]])),
}
OPTIONS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "dropout": {"dropout": 0.3},
}
CASES = [
    (layer, option)
    for layer in LAYERS
    for option in OPTIONS
    if not (layer == "embedding" and option == "dora")
]


@pytest.mark.parametrize(("kind", "option"), CASES)
def test_merge_and_unmerge_are_exact(kind, option):
    make, make_x = LAYERS[kind]
    layer = _randomize(LoRA(make(), rank=2, alpha=3.0, **OPTIONS[option], rngs=nnx.Rngs(1)))
    layer.eval()
    x = make_x()
    before = layer(x)
    kernel_before = np.asarray(layer._table()[...])
    assert merge_lora(layer) == 1
    np.testing.assert_allclose(layer(x), before, **TOL)
    assert unmerge_lora(layer) == 1
    np.testing.assert_allclose(layer(x), before, **TOL)
    np.testing.assert_allclose(layer._table()[...], kernel_before, **TOL)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dora_follows_its_formula_with_the_norm_under_stop_gradient(kind):
    make, make_x = LAYERS[kind]
    base = make()
    layer = _randomize(LoRA(base, rank=2, alpha=3.0, use_dora=True, rngs=nnx.Rngs(1)))
    x = make_x()
    kernel = base.kernel[...]
    delta = layer.delta_weight()
    norm = jnp.sqrt(jnp.sum((kernel + delta).reshape(-1, kernel.shape[-1]) ** 2, axis=0))
    expected_scale = layer.adapter_magnitude[...] / norm
    bias = base.bias[...]
    no_bias = base(x) - bias
    lora = layer.adapter_up_proj(layer.adapter_down_proj(x)) * layer.scaling
    np.testing.assert_allclose(layer(x), expected_scale * (no_bias + lora) + bias, **TOL)

    # The norm is a constant: d/dm = sum over positions of (W x + s up(down x)) / norm.
    grads = nnx.grad(lambda module: jnp.sum(module(x)))(layer)
    grad_m = grads["adapter_magnitude"][...]
    axes = tuple(range(x.ndim - 1))
    np.testing.assert_allclose(grad_m, jnp.sum(no_bias + lora, axis=axes) / norm, atol=1e-4, rtol=1e-4)


def test_dora_magnitude_starts_at_the_column_norms_and_changes_nothing():
    for kind in ("linear", "conv1d", "conv2d", "conv3d"):
        make, make_x = LAYERS[kind]
        base = make()
        layer = LoRA(base, rank=2, use_dora=True, rngs=nnx.Rngs(1))
        kernel = np.asarray(base.kernel[...])
        np.testing.assert_allclose(
            layer.adapter_magnitude[...],
            np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), axis=0),
            rtol=1e-6,
        )
        np.testing.assert_allclose(layer(make_x()), base(make_x()), **TOL)


def test_dropout_acts_on_the_low_rank_branch_in_training_only():
    base = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    layer = _randomize(LoRA(base, rank=4, dropout=0.5, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(3), (64, 8))
    first, second = layer(x), layer(x)
    assert not np.allclose(first, second), "a new mask every call in training mode"
    # Only the low-rank branch is dropped: with the up factor at zero, the output is the base's.
    quiet = LoRA(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), rank=4, dropout=0.5, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(quiet(x), quiet.pretrained_module(x), **TOL)
    layer.eval()
    expected = base(x) + layer.adapter_up_proj(layer.adapter_down_proj(x)) * layer.scaling
    np.testing.assert_allclose(layer(x), expected, **TOL)
    np.testing.assert_allclose(layer(x), layer(x))


def test_rslora_scaling_is_alpha_over_sqrt_rank():
    base = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    assert LoRA(base, 4, 8.0, use_rslora=True, rngs=nnx.Rngs(1)).scaling == 8.0 / math.sqrt(4)
    assert LoRA(base, 4, 8.0, rngs=nnx.Rngs(1)).scaling == 2.0


def test_embedding_lora_starts_at_no_change_and_all_linear_leaves_embeddings_alone():
    embed = nnx.Embed(9, 4, rngs=nnx.Rngs(0))
    layer = LoRA(embed, rank=3, rngs=nnx.Rngs(1))
    idx = jnp.array([0, 3, 8])
    np.testing.assert_array_equal(layer(idx), embed(idx))
    assert layer.adapter_down_proj.embedding.shape == (9, 3) and layer.adapter_up_proj.kernel.shape == (3, 4)
    model = AdaptedModel(
        nnx.Sequential(nnx.Embed(5, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(0))),
        LoRA,
        all_linear=True,
        rngs=nnx.Rngs(1),
    )
    assert isinstance(model.adapted_model.layers[0], nnx.Embed)
    assert isinstance(model.adapted_model.layers[1], LoRA)
    with pytest.raises(ValueError, match="use_dora=True is not supported on embeddings"):
        LoRA(embed, 2, use_dora=True, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("bad", [{"dropout": 1.0}, {"dropout": -0.1}, {"use_dora": 1}, {"use_rslora": "yes"}])
def test_bad_options_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LoRA(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), 2, **bad, rngs=nnx.Rngs(1))


def test_dora_and_dropout_train_under_nnx_jit_with_the_trainable_filter():
    import optax

    model = AdaptedModel(
        nnx.Sequential(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 2, rngs=nnx.Rngs(0))),
        LoRA,
        all_linear=True,
        adapter_kwargs={"rank": 2, "use_dora": True, "dropout": 0.1},
        rngs=nnx.Rngs(1),
    )
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, model.trainable))]
    assert "adapted_model.layers.0.adapter_magnitude" in paths
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=model.trainable)
    x, y = jnp.ones((4, 6)), jnp.zeros((4, 2))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, model.trainable)
        )(model)
        optimizer.update(model, grads)
        return loss

    before = np.asarray(model.adapted_model.layers[0].adapter_magnitude[...])
    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert all(np.isfinite(losses))
    assert not np.allclose(before, model.adapted_model.layers[0].adapter_magnitude[...])
    base_kernel = model.adapted_model.layers[0].pretrained_module.kernel[...]
    np.testing.assert_array_equal(base_kernel, nnx.Linear(6, 6, rngs=nnx.Rngs(0)).kernel[...])


def test_merge_and_unload_and_unload_give_plain_models():
    def build():
        return AdaptedModel(
            nnx.Sequential(nnx.Embed(7, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(0))),
            LoRA,
            target_layers=["layers.0", "layers.1"],
            adapter_kwargs={"rank": 2, "use_rslora": True},
            rngs=nnx.Rngs(1),
        )

    model = build()
    for layer in model.adapted_model.layers:
        _randomize(layer)
    idx = jnp.array([[1, 2, 6]])
    before = model(idx)
    plain = merge_and_unload(model)
    assert isinstance(plain.layers[0], nnx.Embed) and isinstance(plain.layers[1], nnx.Linear)
    np.testing.assert_allclose(plain(idx), before, **TOL)

    fresh_base = nnx.Sequential(nnx.Embed(7, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    model = build()
    for layer in model.adapted_model.layers:
        _randomize(layer)
    merge_lora(model)
    np.testing.assert_allclose(unload(model)(idx), fresh_base(idx), **TOL)


def test_merge_and_unload_refuses_houlsby_and_changes_nothing():
    model = AdaptedModel(
        nnx.Sequential(nnx.Linear(3, 3, rngs=nnx.Rngs(0))),
        HoulsbyAdapterLinear,
        all_linear=True,
        adapter_kwargs={"projection_size": 2},
        rngs=nnx.Rngs(1),
    )
    with pytest.raises(MergeError, match="HoulsbyAdapterLinear"):
        merge_and_unload(model)
    assert isinstance(model.adapted_model.layers[0], HoulsbyAdapterLinear)
    assert type(unload(model).layers[0]) is nnx.Linear


def test_wrapped_attributes_pass_through_but_not_the_kernel_which_would_drop_the_adapter():
    conv = LoRA(nnx.Conv(3, 4, (3,), strides=2, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
    assert (conv.in_features, conv.out_features, conv.strides) == (3, 4, 2)
    assert conv.bias is conv.pretrained_module.bias
    with pytest.raises(AttributeError, match="merged_kernel"):
        _ = conv.kernel
    layer = _randomize(LoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=2, use_dora=True, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(0), (5, 4))
    np.testing.assert_allclose(x @ layer.merged_kernel() + layer.bias[...], layer(x), **TOL)
