"""Small NNX models for the flax_impl tests, each a few lines, with PyTorch-style names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    """The seed's three-Linear example: ``layer1``, ``layer2``, ``layer3``."""

    def __init__(self, rngs: nnx.Rngs, sizes: tuple[int, int, int, int] = (10, 20, 20, 10), **layer_kwargs):
        self.layer1 = nnx.Linear(sizes[0], sizes[1], rngs=rngs, **layer_kwargs)
        self.layer2 = nnx.Linear(sizes[1], sizes[2], rngs=rngs, **layer_kwargs)
        self.layer3 = nnx.Linear(sizes[2], sizes[3], rngs=rngs, **layer_kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer3(nnx.relu(self.layer2(nnx.relu(self.layer1(x)))))


class Blocks(nnx.Module):
    """Linears in an ``nnx.List`` (names ``blocks.0`` ...) followed by a LayerNorm."""

    def __init__(self, rngs: nnx.Rngs, sizes: tuple[int, ...] = (6, 8, 8, 4)):
        self.blocks = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.norm = nnx.LayerNorm(sizes[-1], epsilon=1e-5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = nnx.gelu(block(x), approximate=False)
        return self.norm(x)


class ConvNet(nnx.Module):
    """Conv2d -> BatchNorm -> Conv2d -> mean pool -> Linear, channels last."""

    def __init__(self, rngs: nnx.Rngs, channels: int = 3, classes: int = 4):
        self.conv1 = nnx.Conv(channels, 8, kernel_size=(3, 3), padding=[(1, 1), (1, 1)], rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, kernel_size=(3, 3), strides=2, padding=[(1, 1), (1, 1)], rngs=rngs)
        self.head = nnx.Linear(8, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.conv1(x)))
        x = nnx.relu(self.conv2(x))
        return self.head(jnp.mean(x, axis=(1, 2)))
