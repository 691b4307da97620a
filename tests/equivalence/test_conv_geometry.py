"""LoRA on convolutions of any geometry: the PyTorch and Flax twins agree.

Hypothesis walks kernel size, stride, padding, dilation, channels and input size, in one and
two spatial dimensions (and a few 3-D cases), with a LoRA adapter on the conv (non-zero) and the
Linear head unfrozen. One AdamW step checks forward, gradients and the update together.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.zoo import flax_models, torch_models
from tests.zoo.pairs import AdapterCase, Pair

from . import harness


@st.composite
def conv_geometries(draw):
    ndim = draw(st.sampled_from([1, 1, 2, 2, 3]))
    per_dim = st.tuples(
        st.integers(1, 4 if ndim < 3 else 2),  # kernel
        st.integers(1, 3),  # stride
        st.integers(0, 2),  # padding
        st.integers(1, 2),  # dilation
        st.integers(0, 4),  # input size beyond the minimum that gives one output
    )
    dims = [draw(per_dim) for _ in range(ndim)]
    spatial = tuple(max(1, d * (k - 1) + 1 - 2 * p) + extra for k, _, p, d, extra in dims)
    return {
        "ndim": ndim,
        "in_channels": draw(st.integers(1, 3)),
        "out_channels": draw(st.integers(1, 4)),
        "kernel_size": tuple(k for k, *_ in dims),
        "stride": tuple(s for _, s, *_ in dims),
        "padding": tuple(p for _, _, p, *_ in dims),
        "dilation": tuple(d for *_, d, _ in dims),
        "spatial": spatial,
        "rank": draw(st.integers(1, 3)),
    }


def _conv_pair(geometry: dict) -> Pair:
    geometry = dict(geometry)
    spatial, rank = geometry.pop("spatial"), geometry.pop("rank")
    channels_last = (0, *range(2, 2 + geometry["ndim"]), 1)
    shape = (2, geometry["in_channels"], *spatial)
    return Pair(
        name="conv",
        make_torch=lambda: torch_models.ConvGeometryNet(**geometry),
        make_flax=lambda rngs: flax_models.ConvGeometryNet(**geometry, rngs=rngs),
        make_batch=lambda rng: {"x": rng.standard_normal(shape, dtype=np.float32)},
        run_torch=lambda model, batch: (model(torch.from_numpy(batch["x"])),),
        run_flax=lambda model, batch: (model(batch["x"].transpose(channels_last)),),
        cases=(
            AdapterCase(
                "lora",
                "LoRA",
                {"rank": rank, "alpha": 2.0},
                target_layers=("conv",),
                unfrozen_layers=("head",),
            ),
        ),
    )


@settings(max_examples=15, deadline=None)
@given(geometry=conv_geometries())
def test_lora_conv_twins_agree_for_any_geometry(geometry):
    pair = _conv_pair(geometry)

    result = harness.run_pair(pair, pair.cases[0], steps=1)

    what = f"conv {geometry}"
    harness.assert_close(
        result.torch_outputs, result.flax_outputs, atol=1e-5, rtol=1e-5, what=f"{what} output"
    )
    harness.assert_close(result.torch_grads, result.flax_grads, atol=1e-4, rtol=1e-4, what=f"{what} gradient")
    harness.assert_close(
        result.torch_after, result.flax_after, atol=1e-4, rtol=0, what=f"{what} after one step"
    )
