"""The Flax NNX models of the test zoo, in the order of ``torch_models.py``.

A class here with a namesake in ``torch_models.py`` is its twin (same dotted names, same
function once the weights are converted). Twins declare every layer with PyTorch's semantics
(SPEC, "Writing twins"): LayerNorm with ``epsilon=1e-5`` and ``use_fast_variance=False``,
exact-erf GELU, convs with explicit symmetric ``[(p, p), ...]`` padding and ``kernel_dilation``
for torch's ``dilation``, BatchNorm in inference mode. Convs take channels last, so a twin takes
``(B, *spatial, C)`` where PyTorch takes ``(B, C, *spatial)``.

Layer builders: :func:`gelu`, :class:`GELU`, :func:`layer_norm`, :func:`conv` (PyTorch's
semantics), and :data:`ZeroLinear`, :data:`ZeroConv`, :data:`ZeroEmbed` (zero initialisers).

Twins (a namesake in ``torch_models.py``): :class:`SeedMLP`, :class:`MLP`, :class:`CNN`,
:class:`ConvGeometryNet`, :class:`SpeechEncoder` (with :class:`SelfAttention`,
:class:`PositionalwiseFeedForward`, :class:`TransformerBlock`, :class:`ConvFrontEnd`), and, with
zero-initialised weights for tests that overwrite them, :class:`TokenNet` and :class:`Conv1dNormNet`.

Flax only:

- :class:`StackedLinears`: Linears in an ``nnx.List`` (``blocks.0`` ...) and a LayerNorm.
- :class:`Conv2dBatchNormNet`: Conv2d, BatchNorm, strided Conv2d, head.
- :class:`PartitionedMLP`: two Linears with Megatron-style kernel partitioning annotations.
- :class:`MixedDtypeLayers`: a Conv1d, a Linear and a bfloat16 Linear (a load target, no forward).
- :class:`BareGainNet`: a Linear and a bare ``gain`` Param that has no PyTorch name (no forward).

BERT's Flax half is ``flax_impl.models.BertModel`` (``bert.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

TORCH_LAYER_NORM_EPS = 1e-5

# Zero-initialised layers for twins whose weights every test overwrites: a random initialiser
# costs a fresh XLA compilation (~0.4 s) per new shape.
ZERO = nnx.initializers.zeros
ZeroLinear = partial(nnx.Linear, kernel_init=ZERO)
ZeroConv = partial(nnx.Conv, kernel_init=ZERO)
ZeroEmbed = partial(nnx.Embed, embedding_init=ZERO)


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


# ============================================================================= twins


class SeedMLP(nnx.Module):
    """Twin of ``torch_models.SeedMLP``: ``layer1``, ``layer2``, ``layer3``, a ReLU after ``layer1``.

    ``sizes`` and ``layer_kwargs`` (``param_dtype``, ``dtype``, ...) are Flax-only variations.
    """

    def __init__(
        self, rngs: nnx.Rngs, sizes: tuple[int, int, int, int] = (10, 20, 20, 10), **layer_kwargs: Any
    ) -> None:
        self.layer1 = nnx.Linear(sizes[0], sizes[1], rngs=rngs, **layer_kwargs)
        self.layer2 = nnx.Linear(sizes[1], sizes[2], rngs=rngs, **layer_kwargs)
        self.layer3 = nnx.Linear(sizes[2], sizes[3], rngs=rngs, **layer_kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer3(self.layer2(nnx.relu(self.layer1(x))))


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


class ConvGeometryNet(nnx.Module):
    """Twin of ``torch_models.ConvGeometryNet``. ``(B, *spatial, in_channels) -> (B, 2)``."""

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


class TokenNet(nnx.Module):
    """Twin of ``torch_models.TokenNet`` (zero-initialised). ``(B, T)`` token ids -> ``(B, T, 6)``."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.emb = ZeroEmbed(11, 8, rngs=rngs)
        self.fc1 = ZeroLinear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.rms = nnx.RMSNorm(16, epsilon=1e-6, rngs=rngs)
        self.fc2 = ZeroLinear(16, 6, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = nnx.relu(self.fc1(self.emb(tokens)))
        return self.fc2(self.rms(self.norm(h)))


class Conv1dNormNet(nnx.Module):
    """Twin of ``torch_models.Conv1dNormNet`` (zero-initialised). ``(B, L, 3) -> (B, 4)``."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = ZeroConv(3, 8, (3,), padding=[(1, 1)], rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=2, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, use_running_average=True, rngs=rngs)
        self.conv2 = ZeroConv(8, 8, (3,), strides=2, padding=[(1, 1)], rngs=rngs)
        self.head = ZeroLinear(8, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn(self.gn(self.conv1(x))))
        return self.head(jnp.mean(nnx.relu(self.conv2(h)), axis=1))


# ============================================================================= Flax only


class StackedLinears(nnx.Module):
    """Linears in an ``nnx.List`` (names ``blocks.0`` ...) followed by a LayerNorm ``norm``."""

    def __init__(self, rngs: nnx.Rngs, sizes: tuple[int, ...] = (6, 8, 8, 4)) -> None:
        self.blocks = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.norm = nnx.LayerNorm(sizes[-1], epsilon=1e-5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = nnx.gelu(block(x), approximate=False)
        return self.norm(x)


class Conv2dBatchNormNet(nnx.Module):
    """``conv1`` -> ``bn`` -> strided ``conv2`` -> mean pool -> ``head``; ``(B, H, W, C) -> (B, classes)``."""

    def __init__(self, rngs: nnx.Rngs, channels: int = 3, classes: int = 4) -> None:
        self.conv1 = nnx.Conv(channels, 8, kernel_size=(3, 3), padding=[(1, 1), (1, 1)], rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, kernel_size=(3, 3), strides=2, padding=[(1, 1), (1, 1)], rngs=rngs)
        self.head = nnx.Linear(8, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.conv1(x)))
        x = nnx.relu(self.conv2(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


class PartitionedMLP(nnx.Module):
    """Megatron-style: ``layer1`` (8 -> 16) split on its output axis, ``layer2`` on its input axis.

    With ``partitioned=False`` the same initialisers carry no partitioning annotation.
    """

    def __init__(self, rngs: nnx.Rngs, partitioned: bool = True) -> None:
        init = nnx.initializers.lecun_normal()

        def kernel_init(spec: tuple[str | None, ...]) -> Any:
            return nnx.with_partitioning(init, spec) if partitioned else init

        self.layer1 = nnx.Linear(8, 16, kernel_init=kernel_init((None, "model")), rngs=rngs)
        self.layer2 = nnx.Linear(16, 8, kernel_init=kernel_init(("model", None)), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer2(nnx.relu(self.layer1(x)))


class MixedDtypeLayers(nnx.Module):
    """``conv`` (Conv1d 4 -> 8, kernel 3), ``fc`` (Linear 8 -> 6), ``half`` (bfloat16 Linear 4 -> 4, no bias).

    A target for loading checkpoints (no forward): its torch names are ``conv.weight`` (8, 4, 3),
    ``conv.bias``, ``fc.weight`` (6, 8), ``fc.bias`` and ``half.weight`` (4, 4) in bfloat16.
    """

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(4, 8, kernel_size=(3,), padding=[(1, 1)], rngs=rngs)
        self.fc = nnx.Linear(8, 6, rngs=rngs)
        self.half = nnx.Linear(4, 4, use_bias=False, param_dtype=jnp.bfloat16, rngs=rngs)


class BareGainNet(nnx.Module):
    """``proj`` (Linear 2 -> 2) and a bare ``gain`` Param: no layer kind, hence no PyTorch name."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.proj = nnx.Linear(2, 2, rngs=rngs)
        self.gain = nnx.Param(jnp.ones((2,)))
