"""One twin layer per layer kind, declared with PyTorch's semantics, and the inputs of the twins.

:func:`torch_layer` and :func:`flax_layer` build, for each name in :data:`LAYER_KINDS`, a layer
and its Flax twin that compute the same function once the weights are converted (SPEC "Writing
twins": norms with epsilon=1e-5 and exact variance, explicit symmetric conv padding, BatchNorm
in inference mode with torch's running statistics), in any of :data:`DTYPES`;
:func:`layer_input` gives both the same input. :func:`token_batch` and :func:`conv_batch` are
the inputs of the twin models ``TokenNet`` and ``Conv1dNormNet`` (``torch_models.py``,
``flax_models.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from flax import nnx
from torch import nn

from .arrays import channels_last, randomize_flax, randomize_torch
from .flax_models import ZeroConv, ZeroEmbed, ZeroLinear

DTYPES = ("float32", "bfloat16", "float16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

LAYER_KINDS = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "layernorm",
    "groupnorm",
    "rmsnorm",
    "embedding",
    "batchnorm",
)


def torch_layer(kind: str, dtype: str = "float32") -> nn.Module:
    """A torch layer of ``kind`` with random weights (and running statistics) in ``dtype``."""
    factories = {
        "linear": lambda: nn.Linear(5, 4),
        "conv1d": lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
        "conv2d": lambda: nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
        "conv3d": lambda: nn.Conv3d(2, 3, 2, padding=1),
        "layernorm": lambda: nn.LayerNorm(6),
        "groupnorm": lambda: nn.GroupNorm(2, 6),
        "rmsnorm": lambda: nn.RMSNorm(6, eps=1e-6),
        "embedding": lambda: nn.Embedding(7, 5),
        "batchnorm": lambda: nn.BatchNorm1d(6),
    }
    layer = factories[kind]()
    randomize_torch(layer)
    for param in layer.parameters():
        param.data = param.data.to(TORCH_DTYPES[dtype])
    return layer.eval()


def flax_layer(kind: str, dtype: str = "float32", seed: int = 0) -> nnx.Module:
    """The Flax twin of :func:`torch_layer` (fresh random weights)."""
    rngs = nnx.Rngs(seed)
    p = JAX_DTYPES[dtype]
    factories = {
        "linear": lambda: ZeroLinear(5, 4, param_dtype=p, rngs=rngs),
        "conv1d": lambda: ZeroConv(3, 4, (3,), strides=2, padding=[(1, 1)], param_dtype=p, rngs=rngs),
        "conv2d": lambda: ZeroConv(
            3,
            4,
            (3, 2),
            strides=(1, 2),
            padding=[(1, 1), (0, 0)],
            kernel_dilation=(2, 1),
            param_dtype=p,
            rngs=rngs,
        ),
        "conv3d": lambda: ZeroConv(2, 3, (2, 2, 2), padding=[(1, 1)] * 3, param_dtype=p, rngs=rngs),
        "layernorm": lambda: nnx.LayerNorm(
            6, epsilon=1e-5, use_fast_variance=False, param_dtype=p, rngs=rngs
        ),
        "groupnorm": lambda: nnx.GroupNorm(
            6, num_groups=2, epsilon=1e-5, use_fast_variance=False, param_dtype=p, rngs=rngs
        ),
        "rmsnorm": lambda: nnx.RMSNorm(6, epsilon=1e-6, param_dtype=p, rngs=rngs),
        "embedding": lambda: ZeroEmbed(7, 5, param_dtype=p, rngs=rngs),
        "batchnorm": lambda: nnx.BatchNorm(
            6, momentum=0.9, epsilon=1e-5, use_running_average=True, param_dtype=p, rngs=rngs
        ),
    }
    layer = factories[kind]()
    randomize_flax(layer, seed)
    return layer


def layer_input(kind: str, seed: int = 0) -> tuple[torch.Tensor, jax.Array]:
    """The same float32 input for both twins (channels first for torch, last for Flax)."""
    rng = np.random.default_rng(seed)
    if kind == "embedding":
        tokens = rng.integers(0, 7, size=(2, 4))
        return torch.from_numpy(tokens), jnp.asarray(tokens)
    shapes = {
        "linear": (2, 5),
        "conv1d": (2, 3, 9),
        "conv2d": (2, 3, 7, 6),
        "conv3d": (1, 2, 4, 3, 5),
        "batchnorm": (4, 6),
    }
    x = rng.standard_normal(shapes.get(kind, (3, 6)), dtype=np.float32) * 2 + 0.5
    return torch.from_numpy(x), jnp.asarray(channels_last(x) if kind.startswith("conv") else x)


def token_batch(seed: int = 0) -> tuple[torch.Tensor, jax.Array]:
    """Token ids ``(3, 5)`` below 11 for both halves of ``TokenNet``."""
    tokens = np.random.default_rng(seed).integers(0, 11, size=(3, 5))
    return torch.from_numpy(tokens), jnp.asarray(tokens)


def conv_batch(seed: int = 0) -> tuple[torch.Tensor, jax.Array]:
    """``(2, 3, 10)`` for torch's ``Conv1dNormNet``, the same numbers as ``(2, 10, 3)`` for Flax's."""
    x = np.random.default_rng(seed).standard_normal((2, 3, 10), dtype=np.float32)
    return torch.from_numpy(x), jnp.asarray(channels_last(x))
