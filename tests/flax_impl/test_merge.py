"""flax_impl.merge: folding LoRA into the wrapped kernel and back, Linear and Conv alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from flax_impl import (
    AdaptedModel,
    AdapterInsertionError,
    HoulsbyAdapterLinear,
    LoRA,
    MergeError,
    merge_lora,
    unmerge_lora,
)
from tests.zoo.flax_models import Conv2dBatchNormNet, SeedMLP


def _randomize_up(lora: LoRA, seed: int) -> None:
    up = lora.adapter_up_proj.kernel
    up[...] = jax.random.normal(jax.random.key(seed), up.shape, up[...].dtype)


# Few distinct shapes, so that eagerly compiled ops are reused across examples.
@settings(max_examples=8, deadline=None)
@given(
    spatial=st.sampled_from([0, 1, 2, 3]),  # 0: Linear
    in_features=st.sampled_from([2, 3]),
    out_features=st.sampled_from([2, 4]),
    rank=st.sampled_from([1, 3]),
    strides_and_dilation=st.sampled_from([(1, 1), (2, 1), (1, 2)]),
    alpha=st.sampled_from([1.0, 8.0]),
)
def test_merge_keeps_outputs_and_unmerge_restores_the_kernel(
    spatial, in_features, out_features, rank, strides_and_dilation, alpha
):
    strides, kernel_dilation = strides_and_dilation
    x_shape = (2,) + (5,) * spatial + (in_features,)

    def build_merge_unmerge(x):
        # One jax.jit per example: a single compile instead of one per eager op.
        if spatial:
            base = nnx.Conv(
                in_features,
                out_features,
                kernel_size=(3,) * spatial,
                strides=strides,
                padding=[(1, 1)] * spatial,
                kernel_dilation=kernel_dilation,
                rngs=nnx.Rngs(0),
            )
        else:
            base = nnx.Linear(in_features, out_features, rngs=nnx.Rngs(0))
        kernel_before = base.kernel[...]
        lora = LoRA(base, rank=rank, alpha=alpha, rngs=nnx.Rngs(2))
        _randomize_up(lora, 3)
        before = lora(x)
        assert merge_lora(lora) == 1 and lora.merged
        merged, base_only = lora(x), base(x)
        assert unmerge_lora(lora) == 1 and not lora.merged
        return kernel_before, base.kernel[...], before, merged, base_only, lora(x)

    x = jax.random.normal(jax.random.key(1), x_shape)
    kernel_before, kernel_after, before, merged, base_only, after = jax.jit(build_merge_unmerge)(x)
    np.testing.assert_allclose(merged, before, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged, base_only)  # merged: the base layer only
    np.testing.assert_allclose(kernel_after, kernel_before, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_merge_lora_counts_layers_and_skips_merged_ones():
    model = AdaptedModel(
        Conv2dBatchNormNet(nnx.Rngs(0)), LoRA, all_conv=True, all_linear=True, rngs=nnx.Rngs(1)
    )
    assert merge_lora(model) == 3
    assert merge_lora(model) == 0
    assert unmerge_lora(model) == 3
    assert unmerge_lora(model) == 0


def test_merge_and_unmerge_twice_on_one_layer_raise():
    lora = LoRA(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), rank=1, rngs=nnx.Rngs(1))
    with pytest.raises(AdapterInsertionError, match="not merged"):
        lora.unmerge()
    lora.merge()
    with pytest.raises(AdapterInsertionError, match="already merged"):
        lora.merge()


def test_merge_refuses_houlsby_before_changing_anything():
    model = AdaptedModel(SeedMLP(nnx.Rngs(0)), LoRA, target_layers="layer1", rngs=nnx.Rngs(1))
    _randomize_up(model.adapted_model.layer1, 2)
    model.adapted_model.layer3 = HoulsbyAdapterLinear(model.adapted_model.layer3, 2, rngs=nnx.Rngs(3))
    kernel = np.asarray(model.adapted_model.layer1.pretrained_module.kernel[...])
    with pytest.raises(MergeError, match=r"layer 'adapted_model.layer3' is a HoulsbyAdapterLinear"):
        merge_lora(model)
    assert not model.adapted_model.layer1.merged
    np.testing.assert_array_equal(model.adapted_model.layer1.pretrained_module.kernel[...], kernel)


def test_merge_keeps_bfloat16_kernel_dtype():
    lora = LoRA(nnx.Linear(4, 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
    _randomize_up(lora, 2)
    merge_lora(lora)
    assert lora.pretrained_module.kernel[...].dtype == jnp.bfloat16
