"""The comparisons can fail: a wrong conversion or a twin declared with Flax's defaults is caught.

Each test first checks that the correctly converted twin passes, then breaks one thing the way a
careless converter or twin author would, and requires the same comparison to fail.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import converters
from tests.zoo import flax_models
from tests.zoo.pairs import CNN, MLP, SPEECH

from . import harness


def _forward_check(twins, batch):
    harness.assert_close(
        harness.torch_outputs(twins, batch),
        harness.flax_outputs(twins, batch),
        atol=1e-5,
        rtol=1e-5,
        what="output",
    )


def test_a_square_kernel_left_untransposed_fails_the_forward_comparison():
    twins = harness.build_twins(MLP, MLP.case("lora"))
    batch = MLP.make_batch(np.random.default_rng(0))
    _forward_check(twins, batch)

    kernel = twins.flax_model.adapted_model.layer2.pretrained_module.kernel  # (16, 16): shape is no guard
    kernel.set_value(kernel.get_value().T)

    with pytest.raises(AssertionError, match="max abs diff"):
        _forward_check(twins, batch)


def test_an_adapter_factor_with_its_rank_axis_reversed_fails_the_gradient_comparison():
    twins = harness.build_twins(MLP, MLP.case("lora"))
    batch = MLP.make_batch(np.random.default_rng(0))
    targets = harness.make_targets(harness.torch_outputs(twins, batch))
    torch_grads = harness.torch_gradients(twins, batch, targets)

    def gradient_check():
        harness.assert_close(
            torch_grads, harness.flax_gradients(twins, batch, targets), atol=1e-4, rtol=1e-4, what="gradient"
        )

    gradient_check()
    down = twins.flax_model.adapted_model.layer1.adapter_down_proj.kernel  # (6, rank): any order fits
    down.set_value(down.get_value()[:, ::-1])

    with pytest.raises(AssertionError, match="max abs diff"):
        gradient_check()


def test_flax_same_padding_on_a_strided_conv_fails_the_forward_comparison():
    twins = harness.build_twins(CNN, None)
    batch = CNN.make_batch(np.random.default_rng(0))
    _forward_check(twins, batch)

    twins.flax_model.conv2.padding = "SAME"  # Flax's default; pads (0, 1) where torch pads (1, 1) at stride 2

    with pytest.raises(AssertionError, match="max abs diff"):
        _forward_check(twins, batch)


class TanhGELU(nnx.Module):
    """``jax.nn.gelu``'s default: the tanh approximation (PyTorch's ``nn.GELU()`` is exact erf)."""

    def __call__(self, x):
        return jax.nn.gelu(x)


def test_speech_encoder_with_flax_default_tanh_gelu_fails_the_forward_comparison():
    twins = harness.build_twins(SPEECH, None)
    batch = SPEECH.make_batch(np.random.default_rng(0))
    _forward_check(twins, batch)

    for layer in twins.flax_model.layers:
        layer.pos_ffn.ffn[1] = TanhGELU()

    with pytest.raises(AssertionError, match="max abs diff"):
        _forward_check(twins, batch)


def test_layer_norm_with_flax_default_variance_and_epsilon_fails_on_inputs_with_a_large_mean():
    torch_norm = torch.nn.LayerNorm(16)
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32) + 10.0
    with torch.no_grad():
        expected = [torch_norm(torch.from_numpy(x)).numpy()]
    twin = flax_models.layer_norm(16, rngs=nnx.Rngs(0))  # epsilon=1e-5, use_fast_variance=False
    flax_default = nnx.LayerNorm(16, rngs=nnx.Rngs(0))  # epsilon=1e-6, use_fast_variance=True
    for flax_norm in (twin, flax_default):
        converters.torch_to_flax(torch_norm, flax_norm)

    harness.assert_close(expected, [np.asarray(twin(x))], atol=1e-5, rtol=1e-5, what="output")
    with pytest.raises(AssertionError, match="max abs diff"):
        harness.assert_close(expected, [np.asarray(flax_default(x))], atol=1e-5, rtol=1e-5, what="output")
