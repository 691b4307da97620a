"""Several LoRA adapters held by one Flax model, trained and run under ``jax.jit`` on a CUDA GPU
(skipped without one): the one-GEMM-pair path of ``LoRA._mixed_delta`` (the batched up GEMM where
a sample has at least as many rows as the summed rank) against the per-adapter loop, in float32
and bfloat16. The same code runs on the CPU in ``test_multi_adapter.py``; XLA:GPU fuses it
differently (the weighting into the batched GEMM's operand), which this file checks on the device.
Run it there with ``JAX_PLATFORMS=cuda`` (``tests/conftest.py`` pins JAX to the CPU otherwise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_impl import AdaptedModel, LoRA
from flax_impl.models.bert import BertConfig, BertModel
from tests.zoo.bert import SMALL_CONFIG

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA device")

TARGETS = ["encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value"]
# 16 rows a sample: at least the summed rank (4 + 4), so the batched up GEMM is the path taken.
IDS = jnp.asarray(np.random.default_rng(0).integers(0, SMALL_CONFIG["vocab_size"], (4, 16)), jnp.int32)
# A regression target: the encoder ends in a LayerNorm, so its mean square alone is ~1 whatever
# the adapters do.
TARGET = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, SMALL_CONFIG["hidden_size"])), jnp.float32)
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _model(dtype) -> AdaptedModel:
    bert = BertModel(BertConfig(**SMALL_CONFIG), dtype=dtype, rngs=nnx.Rngs(0))
    model = AdaptedModel(bert, LoRA, target_layers=TARGETS, adapter_kwargs={"rank": 4}, rngs=nnx.Rngs(1))
    model.add_adapter("b", LoRA, TARGETS, adapter_kwargs={"rank": 4, "alpha": 2.0}, rngs=nnx.Rngs(2))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(3), 256))
    for path, variable in nnx.to_flat_state(params):  # a zero up factor hides bugs
        if "adapter_" in ".".join(map(str, path)):
            variable.set_value(0.3 * jax.random.normal(next(keys), variable.get_value().shape))
    nnx.update(model, params)
    model.eval()  # no dropout: the loss moves with the adapters alone
    return model


def _hidden(out) -> jax.Array:
    return out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)


def _train(model: AdaptedModel, steps: int = 3) -> tuple[list[float], nnx.State]:
    # SGD: its updates are linear in the gradients, so rounding differences stay rounding-sized
    # (AdamW divides near-zero gradients by their own size, and amplifies them).
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=model.trainable)
    graphdef, state = nnx.split((model, optimizer))
    trainable = model.trainable

    @jax.jit
    def step(state, ids):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            return jnp.mean((_hidden(model(ids)).astype(jnp.float32) - TARGET) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    losses = []
    for _ in range(steps):
        loss, state = step(state, IDS)
        losses.append(float(loss))
    nnx.update((model, optimizer), state)
    return losses, nnx.state(model, nnx.Param)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("active", ["b", ["default", "b"]], ids=["one", "both"])
def test_training_with_held_adapters_equals_the_per_adapter_loop(monkeypatch, dtype, active):
    results = []
    for can_mix in (True, False):
        with monkeypatch.context() as patch:
            if not can_mix:
                patch.setattr(LoRA, "_can_mix", lambda self: False)
            model = _model(dtype)
            model.set_adapter(active)
            results.append(_train(model))
    (fast_losses, fast), (loop_losses, loop) = results
    tolerance = TOLERANCE[dtype]
    np.testing.assert_allclose(fast_losses, loop_losses, rtol=tolerance)
    assert fast_losses[-1] < fast_losses[0]
    for (path, a), (_, b) in zip(nnx.to_flat_state(fast), nnx.to_flat_state(loop), strict=True):
        np.testing.assert_allclose(
            np.asarray(a.get_value(), np.float32), np.asarray(b.get_value(), np.float32),
            rtol=tolerance, atol=tolerance, err_msg=str(path),
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_a_jitted_mixed_batch_equals_the_per_adapter_loop(monkeypatch, dtype):
    model = _model(dtype)
    mask = model.adapter_mask(["b", "__base__", "default", "b"])
    graphdef, state = nnx.split(model)

    def forward(state, mask):
        return _hidden(nnx.merge(graphdef, state)(IDS, adapter_mask=mask)).astype(jnp.float32)

    fast = jax.jit(forward)(state, mask)
    monkeypatch.setattr(LoRA, "_can_mix", lambda self: False)
    loop = jax.jit(forward)(state, mask)
    tolerance = TOLERANCE[dtype]
    np.testing.assert_allclose(fast, loop, rtol=tolerance, atol=tolerance)
    assert not np.allclose(fast[0], fast[1], atol=tolerance)  # 'b' shows against the base sample
