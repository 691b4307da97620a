"""A converted model owns its weights: training one twin in place never moves the other.

The training comparison trains the PyTorch twin first, in place. If ``torch_to_flax`` left the
Flax arrays as views of PyTorch's storage (numpy and ``jax.device_put`` are zero-copy on CPU
for arrays that need no transpose: biases, norms, embeddings), the "immutable" Flax weights
would follow PyTorch's optimizer and the twins would silently share state.
"""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx

import converters
from tests.zoo import flax_models, torch_models

from . import harness


def _bump_all(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)


def test_in_place_torch_update_after_torch_to_flax_leaves_flax_weights_unchanged():
    torch_model, flax_model = torch_models.MLP(), flax_models.MLP(rngs=nnx.Rngs(0))
    converters.torch_to_flax(torch_model, flax_model)
    converted = harness.flax_in_torch_layout(flax_model)

    _bump_all(torch_model)

    moved = [
        k for k, v in harness.flax_in_torch_layout(flax_model).items() if not np.array_equal(v, converted[k])
    ]
    assert not moved, f"Flax weights share memory with the PyTorch source: {moved}"


def test_in_place_torch_update_after_flax_to_torch_leaves_flax_weights_unchanged():
    torch_model, flax_model = torch_models.MLP(), flax_models.MLP(rngs=nnx.Rngs(0))
    converters.flax_to_torch(flax_model, torch_model)
    before = harness.flax_in_torch_layout(flax_model)

    _bump_all(torch_model)

    moved = [
        k for k, v in harness.flax_in_torch_layout(flax_model).items() if not np.array_equal(v, before[k])
    ]
    assert not moved, f"PyTorch weights share memory with the Flax source: {moved}"
