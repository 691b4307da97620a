"""A Flax NNX twin of ``transformers.WavLMModel``: same module names, same math.

WavLM is wav2vec2's architecture with a gated relative position bias in every attention layer:
the first layer's ``rel_attn_embed`` (``num_buckets`` buckets of log-spaced relative distances up
to ``max_bucket_distance``) gives a per-head bias that every layer gates by its input
(``gru_rel_pos_linear``, ``gru_rel_pos_const``). transformers computes this attention with
``torch.nn.functional.multi_head_attention_forward``: ``q`` is scaled before the product, the bias
is added, padded keys get ``-inf``; so does this twin.

Example
-------
>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = WavLMConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
...                      intermediate_size=32, conv_dim=(8, 8), conv_kernel=(10, 3),
...                      conv_stride=(5, 2), num_conv_pos_embeddings=4,
...                      num_conv_pos_embedding_groups=2, num_buckets=16, max_bucket_distance=40)
>>> model = WavLMModel(config, rngs=nnx.Rngs(0))
>>> model.eval()
>>> model(jnp.zeros((1, 400))).shape, hasattr(model.encoder.layers[1].attention, "rel_attn_embed")
((1, 39, 16), False)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..interchange import KIND_OF_TYPE
from ._speech import (
    Layers,
    SpeechConfig,
    SpeechEncoder,
    SpeechEncoderLayer,
    SpeechModel,
    attention_dropout,
)

__all__ = [
    "WavLMAttention",
    "WavLMConfig",
    "WavLMEncoder",
    "WavLMEncoderLayer",
    "WavLMEncoderLayerStableLayerNorm",
    "WavLMEncoderStableLayerNorm",
    "WavLMModel",
    "relative_position_buckets",
]


@dataclasses.dataclass(frozen=True)
class WavLMConfig(SpeechConfig):
    """``transformers.WavLMConfig``'s fields and defaults (see :class:`SpeechConfig`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_buckets < 4 or self.max_bucket_distance <= self.num_buckets // 4:
            raise ValueError(
                f"WavLMConfig: num_buckets ({self.num_buckets}) must be >= 4 and max_bucket_distance "
                f"({self.max_bucket_distance}) larger than num_buckets // 4"
            )


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """``(length, length)`` bucket of ``key - query`` (int), as WavLM's ``_relative_positions_bucket``.

    Computed once per length, in float32 as transformers does (the lengths are static).

    >>> relative_position_buckets(3, 8, 20).tolist()
    [[0, 5, 6], [1, 0, 5], [2, 1, 0]]
    """
    positions = np.arange(length, dtype=np.int64)
    relative = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    relative = np.abs(relative)
    max_exact = half // 2
    is_small = relative < max_exact
    with np.errstate(divide="ignore"):
        large = np.log(relative.astype(np.float32) / np.float32(max_exact))
    large = large / np.float32(math.log(max_distance / max_exact))
    large = large * np.float32(half - max_exact)
    large = np.where(is_small, 0, (np.float32(max_exact) + large)).astype(
        np.int64
    )  # truncation, as .to(long)
    large = np.minimum(large, half - 1)
    return buckets + np.where(is_small, relative, large)


class WavLMAttention(nnx.Module):
    """Self-attention with WavLM's gated relative position bias.

    ``__call__(x, key_mask, position_bias)`` returns ``(output, position_bias)``: the first layer
    (the one with ``rel_attn_embed``) computes the ungated bias ``(heads, frames, frames)`` and
    every layer passes it on, as transformers does. ``key_mask`` ``(batch, frames)`` is True for
    real frames.
    """

    def __init__(self, layers: Layers, *, has_relative_position_bias: bool) -> None:
        config = layers.config
        self.embed_dim, self.num_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.k_proj = layers.linear(self.embed_dim, self.embed_dim)
        self.v_proj = layers.linear(self.embed_dim, self.embed_dim)
        self.q_proj = layers.linear(self.embed_dim, self.embed_dim)
        self.out_proj = layers.linear(self.embed_dim, self.embed_dim)
        self.num_buckets, self.max_distance = config.num_buckets, config.max_bucket_distance
        self.gru_rel_pos_const = nnx.Param(jnp.ones((1, self.num_heads, 1, 1), layers.param_dtype))
        self.gru_rel_pos_linear = layers.linear(self.head_dim, 8)
        if has_relative_position_bias:
            self.rel_attn_embed = layers.embed(self.num_buckets, self.num_heads)
        self.dropout = config.attention_dropout
        self.deterministic = False
        self.rngs = layers.rngs["dropout"].fork()

    def compute_bias(self, length: int) -> jax.Array:
        """The ungated bias ``(heads, length, length)`` from ``rel_attn_embed``."""
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
        return jnp.transpose(self.rel_attn_embed(jnp.asarray(buckets)), (2, 0, 1))

    def __call__(
        self, hidden_states: jax.Array, key_mask: jax.Array | None = None, position_bias: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        batch, length, _ = hidden_states.shape
        if position_bias is None:
            position_bias = self.compute_bias(length)
        heads = (batch, length, self.num_heads, self.head_dim)
        # The gate, from each head's slice of the input: (batch, heads, frames, 1).
        gated = jnp.transpose(hidden_states.reshape(heads), (0, 2, 1, 3))
        projected = self.gru_rel_pos_linear(gated).reshape(batch, self.num_heads, length, 2, 4).sum(-1)
        gate_a, gate_b = jnp.split(jax.nn.sigmoid(projected), 2, axis=-1)
        gate = gate_a * (gate_b * self.gru_rel_pos_const[...] - 1.0) + 2.0
        bias = gate * position_bias[None]

        # torch.nn.functional.multi_head_attention_forward, need_weights=True path.
        query = self.q_proj(hidden_states).reshape(heads) * math.sqrt(1.0 / self.head_dim)
        key = self.k_proj(hidden_states).reshape(heads)
        value = self.v_proj(hidden_states).reshape(heads)
        scores = bias + jnp.einsum("bqhd,bkhd->bhqk", query, key)
        if key_mask is not None:
            scores = jnp.where(key_mask[:, None, None, :], scores, -jnp.inf)
        weights = attention_dropout(self, jax.nn.softmax(scores, axis=-1))
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, length, self.embed_dim)
        return self.out_proj(context), position_bias


class WavLMEncoderLayer(SpeechEncoderLayer):
    """Post-norm block with :class:`WavLMAttention`; returns ``(hidden, position_bias)``."""

    def __init__(self, layers: Layers, *, has_relative_position_bias: bool) -> None:
        super().__init__(
            layers, WavLMAttention(layers, has_relative_position_bias=has_relative_position_bias)
        )

    def __call__(self, hidden_states: jax.Array, key_mask: Any = None, position_bias: Any = None) -> Any:
        attended, position_bias = self.attention(hidden_states, key_mask, position_bias)
        hidden_states = self.layer_norm(hidden_states + self.dropout(attended))
        hidden_states = hidden_states + self.feed_forward(hidden_states)
        return self.final_layer_norm(hidden_states), position_bias


class WavLMEncoderLayerStableLayerNorm(WavLMEncoderLayer):
    """Pre-norm block with :class:`WavLMAttention`; returns ``(hidden, position_bias)``."""

    def __call__(self, hidden_states: jax.Array, key_mask: Any = None, position_bias: Any = None) -> Any:
        attended, position_bias = self.attention(self.layer_norm(hidden_states), key_mask, position_bias)
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.feed_forward(self.final_layer_norm(hidden_states)), position_bias


class WavLMEncoder(SpeechEncoder):
    """The WavLM encoder: the position bias flows from layer 0 through every layer; LayerDrop never
    skips layer 0 (it makes the bias)."""

    def run_layers(self, hidden_states: jax.Array, mask: jax.Array | None) -> jax.Array:
        keep = self._keep_layers()
        position_bias = None
        for i, layer in enumerate(self.layers):
            new, position_bias = layer(hidden_states, mask, position_bias)
            hidden_states = new if keep is None or i == 0 else jnp.where(keep[i], new, hidden_states)
        return hidden_states


class WavLMEncoderStableLayerNorm(WavLMEncoder):
    """The pre-norm WavLM encoder (``do_stable_layer_norm``)."""

    stable_layer_norm = True


class WavLMModel(SpeechModel):
    """A WavLM encoder whose module names and forward math are ``transformers.WavLMModel``'s.

    Arguments and call as :class:`~flax_impl.models.Wav2Vec2Model`.

    Example
    -------
    >>> from flax import nnx
    >>> from flax_impl.graph import named_modules
    >>> config = WavLMConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                      intermediate_size=16, conv_dim=(4,), conv_kernel=(10,), conv_stride=(5,),
    ...                      num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    >>> [n for n, _ in named_modules(WavLMModel(config, rngs=nnx.Rngs(0))) if "rel" in n]
    ['encoder.layers.0.attention.gru_rel_pos_linear', 'encoder.layers.0.attention.rel_attn_embed']
    """

    config_class = WavLMConfig
    model_type = "wavlm"
    base_model_prefix = "wavlm"

    def make_encoder_layer(self, layers: Layers, index: int) -> nnx.Module:
        layer_class = (
            WavLMEncoderLayerStableLayerNorm if layers.config.do_stable_layer_norm else WavLMEncoderLayer
        )
        return layer_class(layers, has_relative_position_bias=index == 0)

    def make_encoder(self, layers: Layers) -> nnx.Module:
        encoder_class = WavLMEncoderStableLayerNorm if layers.config.do_stable_layer_norm else WavLMEncoder
        return encoder_class(
            layers, [self.make_encoder_layer(layers, i) for i in range(layers.config.num_hidden_layers)]
        )


# The gate constant WavLM's attention owns (twinformat.kinds: gated_relative_position).
KIND_OF_TYPE.append((WavLMAttention, "gated_relative_position"))
