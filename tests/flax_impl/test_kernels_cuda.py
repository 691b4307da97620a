"""The Pallas kernels of ``flax_impl.kernels`` compiled by Triton on a CUDA GPU (skipped without
one): the same numbers as the XLA path on the same GPU, in a layer and in the README's jitted
training step. Run on the device machine with ``JAX_PLATFORMS=cuda`` (``tests/conftest.py`` pins the
CPU otherwise); CI has no GPU (``test_kernels.py`` runs the same kernel bodies in Pallas'
interpreter there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_impl import kernels
from tests.flax_impl.test_grouped import assert_trees_close, gradients
from tests.flax_impl.test_kernels import BF16_CLOSE, adapted_attention, operands, takes_the_kernels

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA device")


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
def test_the_compiled_kernels_compute_what_the_xla_path_computes(tokens, n_in, n_out, rank):
    x, down, up, g = operands(tokens, n_in, n_out, rank)
    forward = jax.jit(kernels._pallas_forward, static_argnums=3)
    backward = jax.jit(kernels._pallas_backward, static_argnums=5)
    low, h = forward(x, down, up, 0.5)
    dx_low, d_down, d_up = backward(g, x, h, down, up, 0.5)
    low_ref, h_ref = jax.jit(kernels._xla_forward, static_argnums=3)(x, down, up, 0.5)
    reference = jax.jit(kernels._xla_backward, static_argnums=5)(g, x, h_ref, down, up, 0.5)
    for name, value, expected in zip(
        ("low", "h", "dx_low", "d_down", "d_up"),
        (low, h, *(dx_low, d_down, d_up)),
        (low_ref, h_ref, *reference),
        strict=True,
    ):
        np.testing.assert_allclose(
            np.asarray(value, np.float32), np.asarray(expected, np.float32), err_msg=name, **BF16_CLOSE
        )


def test_a_layer_on_the_compiled_kernels_gives_the_default_outputs_and_gradients():
    model = adapted_attention(d_model=256)
    x = jax.random.normal(jax.random.key(3), (4, 64, 256), jnp.bfloat16)
    y_ref = jax.jit(lambda x: model(x))(x)
    gx_ref, grads_ref = gradients(model, x)
    with kernels.enabled():
        assert takes_the_kernels(model, x)
        y = jax.jit(lambda x: model(x))(x)
        gx, grads = gradients(model, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), **BF16_CLOSE)
    np.testing.assert_allclose(np.asarray(gx, np.float32), np.asarray(gx_ref, np.float32), **BF16_CLOSE)
    assert_trees_close(grads, grads_ref, **BF16_CLOSE)
