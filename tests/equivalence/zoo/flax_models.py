"""The Flax NNX halves of the twin zoo, in the order of ``torch_models.py``.

Every layer is declared with PyTorch's semantics (SPEC, "Writing twins"): LayerNorm with
``epsilon=1e-5`` and ``use_fast_variance=False``, exact-erf GELU, convs with explicit symmetric
``[(p, p), ...]`` padding and ``kernel_dilation`` for torch's ``dilation``. Convs take channels
last, so the CNN and ConvNet twins take ``(B, *spatial, C)`` where PyTorch takes ``(B, C, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

TORCH_LAYER_NORM_EPS = 1e-5


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's default GELU (exact erf), not ``jax.nn.gelu``'s tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def layer_norm(features: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """An ``nnx.LayerNorm`` that computes what ``torch.nn.LayerNorm(features)`` computes."""
    return nnx.LayerNorm(features, epsilon=TORCH_LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    *,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """An ``nnx.Conv`` declared like ``torch.nn.ConvNd(..., stride, padding, dilation)``."""
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=tuple(kernel_size),
        strides=tuple(stride),
        padding=[(p, p) for p in padding],
        kernel_dilation=tuple(dilation),
        rngs=rngs,
    )


class GELU(nnx.Module):
    """Exact GELU as a module, so it can hold a list slot as ``nn.GELU`` does in ``nn.Sequential``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(x)


class MLP(nnx.Module):
    """Twin of ``torch_models.MLP``. ``(B, in) -> (B, out)``."""

    def __init__(
        self, in_features: int = 6, hidden: int = 16, out_features: int = 3, *, rngs: nnx.Rngs
    ) -> None:
        self.layer1 = nnx.Linear(in_features, hidden, rngs=rngs)
        self.norm = layer_norm(hidden, rngs=rngs)
        self.layer2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm(gelu(self.layer1(x)))
        h = jax.nn.relu(self.layer2(h)) + h
        return self.head(h)


class CNN(nnx.Module):
    """Twin of ``torch_models.CNN``. ``(B, H, W, 3) -> (B, n_classes)``."""

    def __init__(self, in_channels: int = 3, n_classes: int = 5, *, rngs: nnx.Rngs) -> None:
        self.conv1 = conv(in_channels, 8, (3, 5), (2, 1), (1, 2), (1, 2), rngs=rngs)
        self.conv2 = conv(8, 8, (3, 3), (2, 2), (1, 1), (1, 1), rngs=rngs)
        self.conv3 = conv(8, 12, (5,), (2,), (2,), (1,), rngs=rngs)
        self.conv4 = conv(12, 12, (3,), (1,), (2,), (2,), rngs=rngs)
        self.head = nnx.Linear(12, n_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
        h = h.mean(axis=1)  # (B, W, C)
        h = gelu(self.conv4(jax.nn.relu(self.conv3(h))))
        return self.head(h.mean(axis=1))


class ConvNet(nnx.Module):
    """Twin of ``torch_models.ConvNet``. ``(B, *spatial, in_channels) -> (B, 2)``."""

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        *,
        rngs: nnx.Rngs,
    ) -> None:
        if not len(kernel_size) == len(stride) == len(padding) == len(dilation) == ndim:
            raise ValueError(f"every geometry argument needs {ndim} entries")
        self.conv = conv(in_channels, out_channels, kernel_size, stride, padding, dilation, rngs=rngs)
        self.head = nnx.Linear(out_channels, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(self.conv(x))
        spatial = h.shape[1:-1]
        ramp = jnp.linspace(0.5, 1.5, h[0, ..., 0].size, dtype=h.dtype).reshape(spatial)
        return self.head((h * ramp[..., None]).reshape(h.shape[0], -1, h.shape[-1]).mean(axis=1))


class SelfAttention(nnx.Module):
    """Twin of ``torch_models.SelfAttention``."""

    def __init__(self, d_model: int, nhead: int, *, rngs: nnx.Rngs) -> None:
        self.nhead = nhead
        self.q_proj = nnx.Linear(d_model, d_model, rngs=rngs)
        self.k_proj = nnx.Linear(d_model, d_model, rngs=rngs)
        self.v_proj = nnx.Linear(d_model, d_model, rngs=rngs)
        self.out_proj = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, time, d_model = x.shape
        heads = (batch, time, self.nhead, d_model // self.nhead)
        q, k, v = (proj(x).reshape(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d_model // self.nhead) ** -0.5
        context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.out_proj(context.reshape(batch, time, d_model))


class PositionalwiseFeedForward(nnx.Module):
    """Twin of ``torch_models.PositionalwiseFeedForward``: ``ffn`` is a list named like ``nn.Sequential``."""

    def __init__(self, d_model: int, d_ffn: int, *, rngs: nnx.Rngs) -> None:
        self.ffn = nnx.List(
            [nnx.Linear(d_model, d_ffn, rngs=rngs), GELU(), nnx.Linear(d_ffn, d_model, rngs=rngs)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.ffn:
            x = layer(x)
        return x


class TransformerBlock(nnx.Module):
    """Twin of ``torch_models.TransformerBlock``."""

    def __init__(self, d_model: int, nhead: int, d_ffn: int, *, rngs: nnx.Rngs) -> None:
        self.norm1 = layer_norm(d_model, rngs=rngs)
        self.self_att = SelfAttention(d_model, nhead, rngs=rngs)
        self.norm2 = layer_norm(d_model, rngs=rngs)
        self.pos_ffn = PositionalwiseFeedForward(d_model, d_ffn, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_att(self.norm1(x))
        return x + self.pos_ffn(self.norm2(x))


class ConvFrontEnd(nnx.Module):
    """Twin of ``torch_models.ConvFrontEnd``; Flax convs take ``(B, T, F)`` as they come."""

    def __init__(self, n_feats: int, d_model: int, *, rngs: nnx.Rngs) -> None:
        self.conv1 = conv(n_feats, d_model, (3,), (2,), (1,), (1,), rngs=rngs)
        self.conv2 = conv(d_model, d_model, (3,), (2,), (1,), (1,), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(self.conv2(gelu(self.conv1(x))))


class SpeechEncoder(nnx.Module):
    """Twin of ``torch_models.SpeechEncoder``. ``(B, T, n_feats) -> (B, T/4, n_out)``."""

    def __init__(
        self,
        n_feats: int = 20,
        d_model: int = 32,
        nhead: int = 4,
        d_ffn: int = 64,
        num_layers: int = 2,
        n_out: int = 10,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.frontend = ConvFrontEnd(n_feats, d_model, rngs=rngs)
        self.layers = nnx.List(
            [TransformerBlock(d_model, nhead, d_ffn, rngs=rngs) for _ in range(num_layers)]
        )
        self.norm = layer_norm(d_model, rngs=rngs)
        self.output = nnx.Linear(d_model, n_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.frontend(x)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))
