"""The opt-in Pallas kernels of ``flax_impl.kernels`` (issue 24).

On the CPU the kernels run in Pallas' interpreter (``kernels._INTERPRET``): the same kernel
bodies the CUDA lowering compiles, tile by tile. Each is compared with the plain formula, and the
layer's CPU/TPU path (``jax.lax.platform_dependent``'s default branch) with the default layer.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_impl import AdaptedModel, LoRA, kernels
from flax_impl.models.bert import BertConfig, BertModel
from tests.flax_impl.test_grouped import assert_trees_close, gradients, randomize_up_factors
from tests.zoo.bert import SMALL_CONFIG
from tests.zoo.flax_models import SelfAttention

BF16 = jnp.bfloat16
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
# One rounding of a bf16 value (2^-8 relative) on each side of a sum: the kernels accumulate the
# rank-r products tile by tile, XLA in one GEMM.
BF16_CLOSE = {"rtol": 2e-2, "atol": 2e-2}


@contextlib.contextmanager
def interpreted_kernels():
    previous = kernels._INTERPRET
    kernels._INTERPRET = True
    try:
        with kernels.enabled():
            yield
    finally:
        kernels._INTERPRET = previous


def adapted_attention(d_model: int = 64, rank: int = 16, dtype=BF16, **lora_kwargs) -> AdaptedModel:
    model = SelfAttention(d_model, 4, rngs=nnx.Rngs(0))
    for proj in PROJECTIONS:
        getattr(model, proj).dtype = dtype
    adapted = AdaptedModel(
        model,
        LoRA,
        target_layers=list(PROJECTIONS),
        adapter_kwargs={"rank": rank, "alpha": 8.0, **lora_kwargs},
        rngs=nnx.Rngs(1),
    )
    randomize_up_factors(adapted, 2)
    return adapted


def operands(tokens: int, n_in: int, n_out: int, rank: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (tokens, n_in), BF16)
    down = 0.1 * jax.random.normal(keys[1], (n_in, rank))
    up = 0.1 * jax.random.normal(keys[2], (rank, n_out))
    g = jax.random.normal(keys[3], (tokens, n_out), BF16)
    return x, down, up, g


@pytest.mark.parametrize(
    "tokens, n_in, n_out, rank",
    # the last: 128 row tiles of 32 rows; 16 slices of 256 rows for the factor gradients
    [(64, 64, 32, 16), (96, 48, 80, 32), (4096, 256, 512, 16)],
)
def test_the_kernels_compute_what_the_xla_path_computes(tokens, n_in, n_out, rank):
    x, down, up, g = operands(tokens, n_in, n_out, rank)
    with interpreted_kernels():
        low, h = kernels._pallas_forward(x, down, up, 0.5)
        dx_low, d_down, d_up = kernels._pallas_backward(g, x, h, down, up, 0.5)
    low_ref, h_ref = kernels._xla_forward(x, down, up, 0.5)
    dx_low_ref, d_down_ref, d_up_ref = kernels._xla_backward(g, x, h_ref, down, up, 0.5)
    for name, value, reference in [
        ("low", low, low_ref),
        ("h", h, h_ref),
        ("dx_low", dx_low, dx_low_ref),
        ("d_down", d_down, d_down_ref),
        ("d_up", d_up, d_up_ref),
    ]:
        assert value.dtype == reference.dtype and value.shape == reference.shape, name
        np.testing.assert_allclose(
            np.asarray(value, np.float32), np.asarray(reference, np.float32), err_msg=name, **BF16_CLOSE
        )
    assert d_down.dtype == jnp.float32 and d_up.dtype == jnp.float32


@pytest.mark.parametrize("interpret", [False, True], ids=["xla-path", "pallas-interpreted"])
def test_a_lora_layer_on_the_kernels_gives_the_default_outputs_and_gradients(interpret):
    model = adapted_attention()
    x = jax.random.normal(jax.random.key(3), (2, 16, 64), BF16)
    y_ref = model(x)
    gx_ref, grads_ref = gradients(model, x)
    with interpreted_kernels() if interpret else kernels.enabled():
        assert kernels.can_use(
            *(model.q_proj.pretrained_module, model.q_proj.adapter_down_proj, model.q_proj.adapter_up_proj), x
        )
        y = model(x)
        gx, grads = gradients(model, x)
    if interpret:
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), **BF16_CLOSE)
    else:  # the CPU path is the plain formula's forward, operation for operation
        np.testing.assert_array_equal(y, y_ref)
    # The factor gradients are float32 where autodiff rounds them to bf16 first: bf16 apart.
    np.testing.assert_allclose(np.asarray(gx, np.float32), np.asarray(gx_ref, np.float32), **BF16_CLOSE)
    assert_trees_close(grads, grads_ref, **BF16_CLOSE)


def test_the_jitted_readme_step_trains_on_the_kernels_as_on_the_default_path():
    def train(on: bool, steps: int = 3):
        config = BertConfig(**{**SMALL_CONFIG, "hidden_size": 64, "intermediate_size": 128})
        model = BertModel(config, dtype=BF16, rngs=nnx.Rngs(0))
        adapted = AdaptedModel(
            model, LoRA, target_layers=["*.query", "*.value"], adapter_kwargs={"rank": 16}, rngs=nnx.Rngs(1)
        )
        randomize_up_factors(adapted, 3)
        optimizer = nnx.Optimizer(adapted, optax.adamw(1e-2), wrt=adapted.trainable)
        graphdef, state = nnx.split((adapted, optimizer))

        @jax.jit
        def step(state, ids):
            model, optimizer = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(
                lambda m: jnp.mean(jnp.square(m(ids).astype(jnp.float32))),
                argnums=nnx.DiffState(0, model.trainable),
            )(model)
            optimizer.update(model, grads)
            return loss, nnx.state((model, optimizer))

        ids = jax.random.randint(jax.random.key(4), (2, 16), 0, config.vocab_size)
        with interpreted_kernels() if on else contextlib.nullcontext():
            text = str(jax.make_jaxpr(step)(state, ids))
            losses = []
            for _ in range(steps):
                loss, state = step(state, ids)
                losses.append(float(loss))
        merged, _ = nnx.merge(graphdef, state)
        return losses, {p: v[...] for p, v in nnx.to_flat_state(nnx.state(merged, nnx.LoRAParam))}, text

    losses_ref, params_ref, text_ref = train(False)
    losses, params, text = train(True)
    # q and v of every layer, three kernels each (forward; backward rows; factor gradients):
    assert (
        text.count("pallas_call") == 2 * 3 * SMALL_CONFIG["num_hidden_layers"]
        and "pallas_call" not in text_ref
    )
    np.testing.assert_allclose(losses, losses_ref, rtol=2e-2)
    assert_trees_close(params, params_ref, rtol=2e-2, atol=2e-3)


def takes_the_kernels(model: nnx.Module, x: jax.Array) -> bool:
    """Whether ``model(x)`` traces the kernels (``pallas_call`` in its jaxpr; on the CPU the
    lowered program runs the other branch of ``platform_dependent``)."""
    graphdef, state = nnx.split(model)  # (a dropout layer's key count is state)
    return "pallas_call" in str(jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, x))


@pytest.mark.parametrize(
    "change",
    ["float32 layers", "rank 8", "feature size 40", "dropout", "dora", "switched off"],
)
def test_layers_the_kernels_do_not_cover_take_their_usual_path(change):
    d_model = 40 if change == "feature size 40" else 64
    kwargs = {"dropout": 0.1} if change == "dropout" else {"use_dora": True} if change == "dora" else {}
    model = adapted_attention(
        d_model,
        rank=8 if change == "rank 8" else 16,
        dtype=None if change == "float32 layers" else BF16,
        **kwargs,
    )
    model.train()
    x = jax.random.normal(
        jax.random.key(3), (2, 16, d_model), jnp.float32 if change == "float32 layers" else BF16
    )
    reference = adapted_attention(dtype=BF16)
    with contextlib.nullcontext() if change == "switched off" else kernels.enabled():
        assert takes_the_kernels(reference, jnp.ones((2, 16, 64), BF16)) == (change != "switched off")
        assert not takes_the_kernels(model, x)


def test_the_step_on_a_gpu_lowers_the_kernels_and_elsewhere_the_xla_path():
    """``platform_dependent``: lowered for CUDA the step calls Triton, for the CPU it does not."""
    model = adapted_attention()
    x = jnp.ones((2, 16, 64), BF16)
    with kernels.enabled():
        cpu = jax.jit(lambda x: model(x)).lower(x).as_text()
        try:
            cuda = jax.jit(lambda x: model(x)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
        except Exception as error:  # lowering for CUDA needs jaxlib's GPU lowering rules
            pytest.fail(f"lowering for CUDA failed: {error}")
    assert "triton" in cuda.lower() and "lora_forward" in cuda
    assert "triton" not in cpu.lower()
