"""The Pallas kernels of ``flax_impl.kernels`` compiled by Triton on a CUDA GPU (skipped without
one): as accurate as the XLA path on the same GPU, in a layer and in the README's jitted
training step.

Accuracy, not element-wise agreement: the two paths round different intermediates to bf16 (the
kernels keep ``h`` and ``dh`` in float32 registers), so where a factor gradient is a sum of 4096+
terms that nearly cancel, single elements differ by far more than bf16's 2% (on one H100,
2026-12-07: ``d_down`` 0.748 against 0.800 for terms summing to +-300, 3 of 12288 elements). Each
output is compared with a float32 reference of the same bf16 operands: the kernels' normwise error
(Frobenius) may be at most twice the XLA path's, or bf16's unit roundoff. Run on the device machine with ``JAX_PLATFORMS=cuda`` (``tests/conftest.py`` pins the
CPU otherwise); CI has no GPU (``test_kernels.py`` runs the same kernel bodies in Pallas'
interpreter there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_impl import kernels
from tests.flax_impl.test_grouped import gradients
from tests.flax_impl.test_kernels import adapted_attention, operands, takes_the_kernels

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA device")


def _reference(x, down, up, g, scaling):
    """float32 (highest precision) from the same bf16 operands: the outputs of both paths."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        x, down, up, g = f32(x), f32(down.astype(x.dtype)), f32(up.astype(x.dtype)), f32(g)
        h = x @ down
        d_low = g * scaling
        dh = d_low @ up.T
        return h @ up * scaling, h, dh @ down.T, x.T @ dh, h.T @ d_low


def _normwise_error(value, reference) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


UNIT_ROUNDOFF = 2.0**-8  # bf16


@pytest.mark.parametrize(
    "tokens, n_in, n_out, rank",
    [
        (4096, 768, 768, 16),
        (4096, 768, 3072, 16),
        (8192, 2048, 8192, 16),
        (1024, 1152, 6912, 32),
        (48, 64, 80, 16),
    ],
)
def test_the_compiled_kernels_are_as_accurate_as_the_xla_path(tokens, n_in, n_out, rank):
    x, down, up, g = operands(tokens, n_in, n_out, rank)
    forward = jax.jit(kernels._pallas_forward, static_argnums=3)
    backward = jax.jit(kernels._pallas_backward, static_argnums=5)
    low, h = forward(x, down, up, 0.5)
    dx_low, d_down, d_up = backward(g, x, h, down, up, 0.5)
    low_ref, h_ref = jax.jit(kernels._xla_forward, static_argnums=3)(x, down, up, 0.5)
    xla = (low_ref, h_ref, *jax.jit(kernels._xla_backward, static_argnums=5)(g, x, h_ref, down, up, 0.5))
    exact = _reference(x, down, up, g, 0.5)
    for name, ours, theirs, truth in zip(
        ("low", "h", "dx_low", "d_down", "d_up"), (low, h, dx_low, d_down, d_up), xla, exact, strict=True
    ):
        error, xla_error = _normwise_error(ours, truth), _normwise_error(theirs, truth)
        assert error <= max(2 * xla_error, UNIT_ROUNDOFF), (name, error, xla_error)


def test_a_layer_on_the_compiled_kernels_gives_the_default_outputs_and_gradients():
    model = adapted_attention(d_model=256)
    x = jax.random.normal(jax.random.key(3), (4, 64, 256), jnp.bfloat16)
    y_ref = jax.jit(lambda x: model(x))(x)
    gx_ref, grads_ref = gradients(model, x)
    with kernels.enabled():
        assert takes_the_kernels(model, x)
        y = jax.jit(lambda x: model(x))(x)
        gx, grads = gradients(model, x)
    # Normwise: the paths round different intermediates (module docstring), a few units of bf16.
    for name, value, reference in (("y", y, y_ref), ("dx", gx, gx_ref)) + tuple(
        (str(key), grads[key], grads_ref[key]) for key in grads_ref
    ):
        assert _normwise_error(value, reference) <= 4 * UNIT_ROUNDOFF, name
    assert grads.keys() == grads_ref.keys()
