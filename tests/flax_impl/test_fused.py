"""The fused LoRA Linear path (``flax_impl.fused``): the plain formula's values, its own backward.

The fused path is off by default (it did not pay on the GPU); these tests switch it on for each
test and compare it with the three layers called one after the other (``fused.disabled()``), for
outputs and for the gradients of the input, both factors and (when someone differentiates it)
the wrapped kernel.
"""

from __future__ import annotations

import contextlib
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_impl import AdaptedModel, LoRA, fused
from tests.zoo.flax_models import SeedMLP


@pytest.fixture(autouse=True)
def _fused_on():
    with fused.enabled():
        yield


def make_lora(in_features=6, out_features=5, rank=3, alpha=2.0, bias=True, dtype=None, seed=0) -> LoRA:
    base = nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, rngs=nnx.Rngs(seed))
    layer = LoRA(base, rank, alpha, rngs=nnx.Rngs(seed + 1))
    up = layer.adapter_up_proj.kernel
    up.set_value(jax.random.normal(jax.random.key(seed + 2), up[...].shape, up[...].dtype))
    return layer


def value_and_grads(layer: LoRA, x: jax.Array, g: jax.Array, wrt=nnx.LoRAParam):
    """Output, and the gradients of ``<layer(x), g>`` w.r.t. ``x`` and the ``nnx.Param`` leaves."""

    def loss(model, x):
        return jnp.sum(model(x).astype(jnp.float32) * g)

    y = layer(x)
    grads_model, grad_x = nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.Param), 1))(layer, x)
    return y, grad_x, {p: v[...] for p, v in nnx.to_flat_state(grads_model)}


def assert_tree_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(
            np.asarray(a[key], np.float32), np.asarray(b[key], np.float32), err_msg=str(key), **tol
        )


def rel(a, b) -> float:
    """The relative error of ``a`` against ``b`` (Frobenius norms, float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_trains_alike(train) -> None:
    """``train(True)`` (the path under test) and ``train(False)`` (the reference), each giving
    ``(losses, trainable parameters)``, descend alike under float32 matmuls."""
    with jax.default_matmul_precision("highest"):
        losses, params = train(True)
        losses_ref, params_ref = train(False)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, losses_ref, atol=1e-5, rtol=1e-5)
    assert_tree_close(params, params_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(), (4,), (2, 3)])
def test_fused_matches_plain_formula_in_float32(bias, leading):
    layer = make_lora(bias=bias)
    x = jax.random.normal(jax.random.key(7), (*leading, 6))
    g = jax.random.normal(jax.random.key(8), (*leading, 5))
    with jax.default_matmul_precision("highest"):
        y, gx, grads = value_and_grads(layer, x, g)
        with fused.disabled():
            y_ref, gx_ref, grads_ref = value_and_grads(layer, x, g)
    np.testing.assert_array_equal(y, y_ref)  # the forward is the plain formula, op for op
    np.testing.assert_allclose(gx, gx_ref, atol=1e-5, rtol=1e-5)
    # every Param, the frozen kernel and bias too: exact gradients if anyone asks for them
    assert_tree_close(grads, grads_ref, atol=1e-5, rtol=1e-5)


def test_fused_backward_under_bf16_is_as_accurate_as_autodiff_of_the_plain_formula():
    layer = make_lora(48, 40, 8, 16.0, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (3, 10, 48))
    g = jax.random.normal(jax.random.key(2), (3, 10, 40))
    y, gx, grads = value_and_grads(layer, x, g)
    with fused.disabled():
        y_plain, gx_plain, grads_plain = value_and_grads(layer, x, g)
    reference = make_lora(48, 40, 8, 16.0, dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):
        _, gx_ref, grads_ref = value_and_grads(reference, x, g)

    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_plain, np.float32))
    assert rel(gx, gx_ref) <= 1.5 * rel(gx_plain, gx_ref) + 1e-3
    for key in grads_ref:
        assert grads[key].dtype == grads_plain[key].dtype == jnp.float32  # float32 params, float32 grads
        assert rel(grads[key], grads_ref[key]) < 2e-2
        assert rel(grads[key], grads_ref[key]) <= 1.5 * rel(grads_plain[key], grads_ref[key]) + 1e-3


@pytest.mark.parametrize("stacked", [False, True])  # SeedMLP widens 10 -> 20, then narrows 20 -> 10
def test_adapted_model_trains_the_same_under_nnx_jit_with_and_without_the_fused_path(stacked):
    def train(enabled: bool) -> tuple[list[float], dict]:
        model = AdaptedModel(
            SeedMLP(nnx.Rngs(0)), LoRA, all_linear=True, adapter_kwargs={"rank": 4}, rngs=nnx.Rngs(1)
        )
        optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=model.trainable)
        x, y = jax.random.normal(jax.random.key(3), (8, 10)), jax.random.normal(jax.random.key(4), (8, 10))

        @nnx.jit
        def step(model, optimizer):
            loss, grads = nnx.value_and_grad(
                lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, model.trainable)
            )(model)
            optimizer.update(model, grads)
            return loss

        previous = fused.set_enabled(enabled), fused.set_stacked(stacked)
        try:
            losses = [float(step(model, optimizer)) for _ in range(10)]
        finally:
            fused.set_enabled(previous[0])
            fused.set_stacked(previous[1])
        return losses, {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model, model.trainable))}

    assert_trains_alike(train)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("sizes", [(6, 5), (5, 9), (9, 5)])  # equal-ish, widening, narrowing
def test_active_dropout_takes_the_fused_path_with_the_plain_formulas_mask_and_gradients(sizes, stacked):
    """Training with LoRA dropout (PEFT's ``lora_dropout``): the low-rank branch reads
    ``dropout(x)`` drawn as the plain formula draws it (same RNG stream, same mask); the fused
    path's ``custom_vjp`` takes it as a second input whose gradient goes back through the mask."""

    def dropout_layer(seed: int = 0):
        layer = LoRA(nnx.Linear(*sizes, rngs=nnx.Rngs(seed)), 3, 2.0, dropout=0.5, rngs=nnx.Rngs(seed + 1))
        up = layer.adapter_up_proj.kernel
        up.set_value(jax.random.normal(jax.random.key(seed + 2), up[...].shape))
        layer.train()
        return layer

    x = jax.random.normal(jax.random.key(7), (4, 3, sizes[0]))
    g = jax.random.normal(jax.random.key(8), (4, 3, sizes[1]))
    results = {}
    for fused_path in (True, False):
        layer = dropout_layer()
        with (
            jax.default_matmul_precision("highest"),
            fused.enabled() if fused_path else fused.disabled(),
            fused.stacked() if stacked else contextlib.nullcontext(),
        ):
            graphdef, state = nnx.split(layer)
            jaxpr = str(jax.make_jaxpr(lambda s, graphdef=graphdef: nnx.merge(graphdef, s)(x))(state))
            assert ("custom_vjp_call" in jaxpr) is fused_path
            results[fused_path] = value_and_grads(layer, x, g)
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = results[True], results[False]
    if stacked:  # a widening layer's stacked GEMM rounds once (see fused.set_stacked)
        np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    else:  # the same mask, the plain formula's forward
        np.testing.assert_array_equal(y, y_ref)
    assert not np.array_equal(
        y, layer.pretrained_module(x) + layer.adapter_up_proj(layer.adapter_down_proj(x)) * 2 / 3
    )
    np.testing.assert_allclose(gx, gx_ref, atol=1e-5, rtol=1e-5)
    assert_tree_close(grads, grads_ref, atol=1e-5, rtol=1e-5)


def test_switch_and_fallbacks_take_the_plain_layers():
    layer = make_lora()
    calls = []

    class CountingLinear(nnx.Linear):
        def __call__(self, x):
            calls.append(1)
            return super().__call__(x)

    assert fused.can_fuse_linear(layer.pretrained_module, layer.adapter_down_proj, layer.adapter_up_proj)
    with fused.disabled():
        assert not fused.can_fuse_linear(
            layer.pretrained_module, layer.adapter_down_proj, layer.adapter_up_proj
        )
    counting = CountingLinear(6, 5, rngs=nnx.Rngs(0))
    hooked = LoRA(counting, 2, rngs=nnx.Rngs(1))
    hooked(jnp.ones((2, 6)))
    assert calls == [1]  # a subclass overriding __call__ is called, not bypassed
    conv = LoRA(nnx.Conv(3, 4, kernel_size=(3,), padding=[(1, 1)], rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))
    assert conv(jnp.ones((1, 5, 3))).shape == (1, 5, 4)


def test_the_fused_path_is_on_by_default(monkeypatch):
    monkeypatch.delenv("FLAX_IMPL_FUSED", raising=False)
    try:
        assert importlib.reload(fused).is_enabled() is True
        layer = make_lora()
        assert fused.can_fuse_linear(layer.pretrained_module, layer.adapter_down_proj, layer.adapter_up_proj)
        x = jnp.ones((3, 6))
        jaxpr = str(jax.make_jaxpr(lambda x: layer(x))(x))
        assert "custom_vjp_call" in jaxpr
        with fused.disabled():
            assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda x: layer(x))(x))
    finally:
        importlib.reload(fused)


@pytest.mark.parametrize("value, enabled", [("0", False), ("off", False), ("1", True), ("", True)])
def test_environment_variable_sets_the_initial_state(monkeypatch, value, enabled):
    monkeypatch.setenv("FLAX_IMPL_FUSED", value)
    try:
        assert importlib.reload(fused).is_enabled() is enabled
    finally:
        monkeypatch.delenv("FLAX_IMPL_FUSED")
        importlib.reload(fused)
    assert fused.is_enabled()


def test_forward_mode_needs_the_plain_formula_and_second_order_works_on_both():
    """``jax.jvp`` of a forward through a ``custom_vjp`` is refused by JAX (loudly); the plain
    formula (``disabled()``) takes it, and Hessian-vector products (forward over reverse) and
    ``jax.hessian`` work on the fused path with the plain formula's values."""
    layer = make_lora()
    x = jax.random.normal(jax.random.key(3), (3, 6))

    def f(x):
        return jnp.sum(jnp.sin(layer(x)))

    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (x,), (x,))
    with fused.disabled():
        _, tangent = jax.jvp(f, (x,), (x,))
        hvp_ref = jax.jvp(jax.grad(f), (x,), (x,))[1]
        hessian_ref = jax.hessian(f)(x)
    np.testing.assert_allclose(tangent, jnp.sum(jax.grad(f)(x) * x), rtol=1e-5)
    np.testing.assert_allclose(jax.jvp(jax.grad(f), (x,), (x,))[1], hvp_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.hessian(f)(x), hessian_ref, rtol=1e-5, atol=1e-6)


def _stacked_gemms(layer: LoRA, x: jax.Array, g: jax.Array) -> tuple[bool, bool, bool, bool]:
    """Whether the jitted forward, then the jitted gradient of ``x``, have a dot whose contraction
    is stacked (its size ``in + rank`` or ``out + rank``) and one whose output is stacked (its
    last dimension that size)."""

    def loss(model, x):
        return jnp.sum(model(x).astype(jnp.float32) * g)

    graphdef, state = nnx.split(layer)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()
    grad = (
        jax.jit(lambda s, x: jax.grad(lambda x: loss(nnx.merge(graphdef, s), x))(x)).lower(state, x).as_text()
    )
    base = layer.pretrained_module
    rank = layer.adapter_down_proj.kernel.shape[-1]
    stacked_sizes = {base.in_features + rank, base.out_features + rank}
    dots = r"stablehlo\.dot_general[^:]*:\s*\(tensor<([\dx]+)x\w+>[^)]*\)\s*->\s*tensor<([\dx]+)x\w+>"

    # a dot's contracting size: the last dimension of its first operand's type; its output's last
    def stacked(text):
        found = re.findall(dots, text)
        assert found, "no dot_general found: the pattern no longer matches JAX's text"
        return (
            any(int(lhs.split("x")[-1]) in stacked_sizes for lhs, _ in found),
            any(int(out.split("x")[-1]) in stacked_sizes for _, out in found),
        )

    return stacked(fwd) + stacked(grad)


@pytest.mark.parametrize(
    "in_features, out_features, stacked_where",
    [
        # widening: the output over a stacked contraction, g @ [K; sB].T = [g @ K.T, dh]
        (6, 20, (True, False, False, True)),
        # narrowing: x @ [K | A] = [y, h]; dx over a stacked contraction (x's gradient needs no h)
        (20, 6, (False, True, True, False)),
        (8, 8, (False, False, False, False)),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_stacked_gemms_match_the_plain_formula_in_float32(in_features, out_features, stacked_where, bias):
    layer = make_lora(in_features, out_features, rank=3, bias=bias)
    x = jax.random.normal(jax.random.key(7), (2, 4, in_features))
    g = jax.random.normal(jax.random.key(8), (2, 4, out_features))
    with jax.default_matmul_precision("highest"):
        with fused.disabled():
            y_ref, gx_ref, grads_ref = value_and_grads(layer, x, g)
        with fused.stacked():
            y, gx, grads = value_and_grads(layer, x, g)
            found = _stacked_gemms(layer, x, g)
    # where it applies and only there (forward: contraction, output; gradient: contraction, output)
    assert found == stacked_where
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gx, gx_ref, atol=1e-5, rtol=1e-5)
    assert_tree_close(grads, grads_ref, atol=1e-5, rtol=1e-5)
    if not any(stacked_where):
        np.testing.assert_array_equal(y, y_ref)


@pytest.mark.parametrize(
    "tokens, slices",
    # many tokens, not a multiple of 1024: sliced (whisper's 8 x 1500 encoder frames are 12,000);
    # a multiple of 1024, or few tokens: one GEMM
    [(4160, 32), (4104, 8), (4096, 1), (1000, 1)],
)
def test_factor_gradients_are_sliced_along_tokens_xla_would_pad(tokens, slices):
    layer = make_lora(12, 20, rank=4)
    x = jax.random.normal(jax.random.key(3), (tokens, 12))
    g = jax.random.normal(jax.random.key(4), (tokens, 20))
    with jax.default_matmul_precision("highest"):
        with fused.disabled():
            y_ref, gx_ref, grads_ref = value_and_grads(layer, x, g)
        y, gx, grads = value_and_grads(layer, x, g)
        graphdef, state = nnx.split(layer)
        grad = nnx.grad(lambda m: jnp.sum(m(x) * g), argnums=nnx.DiffState(0, nnx.Param))
        traced = jax.jit(lambda s: grad(nnx.merge(graphdef, s))).trace(state)
        cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
        cpu = traced.lower().as_text()
        # the CUDA branch's arithmetic, run here: the sliced sums against one GEMM
        a, b = x, jax.random.normal(jax.random.key(5), (tokens, 4))
        whole = jnp.dot(a.T, b, preferred_element_type=jnp.float32)
        if slices > 1:
            sliced = fused._sliced_factor_gradient(a, b, slices, None, jnp.float32)
            np.testing.assert_allclose(sliced, whole, atol=1e-3, rtol=1e-5)
    np.testing.assert_allclose(gx, gx_ref, atol=1e-4, rtol=1e-5)
    assert_tree_close(grads, grads_ref, atol=1e-3, rtol=1e-5)
    # lowered for CUDA, the factor gradients as a batched GEMM of `slices` slices (or none); for
    # the CPU (as for a TPU), one GEMM each
    batched = rf"tensor<{slices}x{tokens // slices}x\d+xf32>"
    assert bool(re.findall(batched, cuda)) == (slices > 1)
    assert not re.findall(batched, cpu)


@pytest.mark.parametrize("in_features, out_features", [(48, 160), (160, 48)])
def test_stacked_gemms_under_bf16_are_as_accurate_as_the_plain_formula(in_features, out_features):
    layer = make_lora(in_features, out_features, 8, 16.0, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (3, 10, in_features))
    g = jax.random.normal(jax.random.key(2), (3, 10, out_features))
    with fused.stacked():
        y, gx, grads = value_and_grads(layer, x, g)
    with fused.disabled():
        y_plain, gx_plain, grads_plain = value_and_grads(layer, x, g)
    reference = make_lora(in_features, out_features, 8, 16.0, dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):
        y_ref, gx_ref, grads_ref = value_and_grads(reference, x, g)

    assert y.dtype == y_plain.dtype == jnp.bfloat16
    assert rel(y, y_ref) <= 1.5 * rel(y_plain, y_ref) + 1e-3
    assert rel(gx, gx_ref) <= 1.5 * rel(gx_plain, gx_ref) + 1e-3
    for key in grads_ref:
        assert grads[key].dtype == jnp.float32
        assert rel(grads[key], grads_ref[key]) <= 1.5 * rel(grads_plain[key], grads_ref[key]) + 1e-3


def test_stacked_is_off_by_default_and_set_by_the_environment(monkeypatch):
    monkeypatch.delenv("FLAX_IMPL_STACKED", raising=False)
    try:
        assert importlib.reload(fused).is_stacked() is False
        monkeypatch.setenv("FLAX_IMPL_STACKED", "1")
        assert importlib.reload(fused).is_stacked() is True
    finally:
        monkeypatch.delenv("FLAX_IMPL_STACKED")
        importlib.reload(fused)
    assert not fused.is_stacked()


def train_llama_lora(
    config: dict, ids: jax.Array, steps: int, *, stacked: bool, remat: bool = False
) -> tuple[list[float], dict, int]:
    """A Llama twin (``set_mlp_remat(remat)``) with LoRA on all linear layers, trained ``steps``
    AdamW steps by the README's jitted split-state step traced with the fused path's stacked
    GEMMs on or off: the losses, the trained factors and the compiled step's temporaries."""
    from flax_impl.models.llama import LlamaForCausalLM

    base = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    base.set_mlp_remat(remat)
    model = AdaptedModel(base, LoRA, all_linear=True, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=model.trainable)
    graphdef, state = nnx.split((model, optimizer))

    def step(state):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(m):
            logits = m(ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    previous = fused.set_stacked(stacked)
    try:
        compiled = jax.jit(step).lower(state).compile()
    finally:
        fused.set_stacked(previous)
    losses = []
    for _ in range(steps):
        loss, state = compiled(state)
        losses.append(float(loss))
    model, _ = nnx.merge(graphdef, state)
    params = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model, model.trainable))}
    return losses, params, compiled.memory_analysis().temp_size_in_bytes


LLAMA = {"vocab_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_a_llama_twin_trains_the_same_with_the_stacked_gemms():
    """LoRA on all seven linear layers of a Llama twin (gate/up widen, down narrows, q/k/v/o
    stay as they are): the jitted split-state step's losses and factors, stacked or not."""
    config = {**LLAMA, "hidden_size": 16, "intermediate_size": 40}
    ids = jax.random.randint(jax.random.key(3), (2, 9), 0, config["vocab_size"])
    assert_trains_alike(lambda stacked: train_llama_lora(config, ids, 6, stacked=stacked)[:2])


def test_the_rematerialised_mlp_trains_the_same_and_keeps_less_for_the_stacked_step():
    """``set_mlp_remat`` on a Llama twin: the same losses and factors over four jitted AdamW steps
    (LoRA on all linear layers, stacked GEMMs), fewer temporaries in XLA's compiled step."""
    config = {**LLAMA, "hidden_size": 32, "intermediate_size": 128}
    ids = jax.random.randint(jax.random.key(3), (4, 64), 0, config["vocab_size"])
    losses, params, temporaries = train_llama_lora(config, ids, 4, stacked=True, remat=True)
    losses_ref, params_ref, temporaries_ref = train_llama_lora(config, ids, 4, stacked=True)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, losses_ref, atol=1e-6, rtol=1e-6)
    assert_tree_close(params, params_ref, atol=1e-6, rtol=1e-6)
    # the down projections' inputs, 4 x 63 x 128 float32 a layer, are recomputed, not kept
    assert temporaries < temporaries_ref
