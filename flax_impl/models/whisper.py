"""Flax NNX twins of transformers' Whisper: ``WhisperEncoder``, ``WhisperModel`` (encoder and
decoder) and ``WhisperForConditionalGeneration`` (with greedy decoding): same module names, same math.

Encoder: ``conv1`` (kernel 3, padding 1) and ``conv2`` (kernel 3, stride 2, padding 1), each
followed by the exact GELU, then the ``embed_positions`` table added to all
``max_source_positions`` frames, the pre-norm ``layers`` (``self_attn`` with an unbiased
``k_proj`` and the query scaled before the product, ``fc1``/``fc2``), and the final ``layer_norm``.

Decoder: ``embed_tokens`` plus the learned ``embed_positions`` (positions counted from 0, whatever
the padding, as transformers counts them), pre-norm ``layers`` of causal ``self_attn``,
``encoder_attn`` (cross-attention over the encoder output) and ``fc1``/``fc2``, and the final
``layer_norm``. ``WhisperForConditionalGeneration`` holds the ``WhisperModel`` as ``model`` and
computes the logits through ``model.decoder.embed_tokens`` (transformers' ``proj_out`` is tied to
it): the twin stores that matrix once and declares the tie in :attr:`~WhisperForConditionalGeneration.tied_weights`,
so ``proj_out.weight`` appears in its PyTorch-style state (same values) and is accepted, checked
equal, on the way in. Module names are those of ``named_modules()`` of the transformers model,
except that ``proj_out`` is no module here (see :class:`WhisperForConditionalGeneration`).

Options of released checkpoints that change nothing in transformers' computation change nothing
here either: ``scale_embedding`` (transformers computes ``embed_scale`` and never applies it),
``use_weighted_layer_sum`` and ``classifier_proj_size`` (audio classification heads), ``max_length``
and ``median_filter_width`` (generation and timestamps).

The input is transformers' layout, ``(batch, num_mel_bins, frames)`` with ``frames`` equal to
``2 * max_source_positions`` (3000 for the released checkpoints), as Whisper requires; see
:func:`flax_impl.models.whisper_log_mel` for the features.

Example
-------
>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = WhisperConfig(d_model=8, encoder_layers=1, encoder_attention_heads=2,
...                        encoder_ffn_dim=16, num_mel_bins=4, max_source_positions=6)
>>> model = WhisperEncoder(config, rngs=nnx.Rngs(0))
>>> model.eval()
>>> model(jnp.zeros((2, 4, 12))).shape
(2, 6, 8)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._explicit import embed_ids
from ._speech import (
    Layers,
    SpeechAttention,
    Stochastic,
    _activation_name,
    _positive,
    attention_dropout,
    compute_mask_indices,
    read_config,
)
from .bert import Activation

__all__ = [
    "WhisperAttention",
    "WhisperConfig",
    "WhisperDecoder",
    "WhisperDecoderLayer",
    "WhisperEncoder",
    "WhisperEncoderLayer",
    "WhisperForConditionalGeneration",
    "WhisperModel",
    "sinusoids",
]


def _as_tuples(value: Any) -> Any:
    """Lists (nested, from a config.json) as tuples: the config is a static, hashable part of the model."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """The fields of ``transformers.WhisperConfig`` (released checkpoints' ``config.json``), with
    transformers' defaults.

    Read by attribute name (a ``transformers.WhisperConfig``) or key (its ``config.json`` dict) with
    :meth:`from_config`; unknown keys are ignored. Covers the multilingual and English-only
    checkpoints (vocab 51865/51864), 80 and 128 mel bins (large-v3: 128, vocab 51866), and every
    size from tiny to large-v3 and the distilled ones (few ``decoder_layers``).

    Example
    -------
    >>> WhisperConfig.from_config({"d_model": 512, "encoder_attention_heads": 8}).head_size
    64
    >>> WhisperConfig.from_config({"begin_suppress_tokens": [220, 50257]}).begin_suppress_tokens
    (220, 50257)
    """

    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    num_mel_bins: int = 80
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    # The decoder.
    vocab_size: int = 51865
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    decoder_layerdrop: float = 0.0
    max_target_positions: int = 448
    scale_embedding: bool = False
    tie_word_embeddings: bool = True
    # Special tokens and the generation options a config.json carries.
    pad_token_id: int | None = 50256
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    decoder_start_token_id: int = 50257
    suppress_tokens: tuple[int, ...] | None = None
    begin_suppress_tokens: tuple[int, ...] | None = (220, 50256)
    forced_decoder_ids: tuple[tuple[int, int], ...] | None = None
    max_length: int | None = None
    use_cache: bool = True
    # SpecAugment on the input features (WhisperModel, training mode).
    apply_spec_augment: bool = False
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0
    # Read, no effect on these twins (initialisation scale; audio-classification head; timestamps).
    init_std: float = 0.02
    use_weighted_layer_sum: bool = False
    classifier_proj_size: int = 256
    median_filter_width: int = 7
    is_encoder_decoder: bool = True

    def __post_init__(self) -> None:
        for f in ("suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids"):
            object.__setattr__(self, f, _as_tuples(getattr(self, f)))
        _positive(
            self,
            "d_model",
            "encoder_layers",
            "encoder_attention_heads",
            "encoder_ffn_dim",
            "num_mel_bins",
            "max_source_positions",
            "vocab_size",
            "decoder_layers",
            "decoder_attention_heads",
            "decoder_ffn_dim",
            "max_target_positions",
        )
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"WhisperConfig.d_model ({self.d_model}) must be a multiple of encoder_attention_heads "
                f"({self.encoder_attention_heads})"
            )
        _activation_name(self, "activation_function")

    def check_decoder(self) -> None:
        """Refuse, naming the field, what transformers cannot build a decoder from (checked when a
        decoder is built: an encoder-only config may leave the decoder's fields at their defaults)."""
        if self.d_model % self.decoder_attention_heads:
            raise ValueError(
                f"WhisperConfig.d_model ({self.d_model}) must be a multiple of decoder_attention_heads "
                f"({self.decoder_attention_heads})"
            )
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            # torch.nn.Embedding refuses such a padding_idx: transformers cannot build this model either.
            raise ValueError(
                f"WhisperConfig.pad_token_id ({self.pad_token_id}) must lie in [0, vocab_size={self.vocab_size})"
            )

    @property
    def head_size(self) -> int:
        """Width of one attention head of the encoder."""
        return self.d_model // self.encoder_attention_heads

    @property
    def decoder_head_size(self) -> int:
        """Width of one attention head of the decoder."""
        return self.d_model // self.decoder_attention_heads

    @classmethod
    def from_config(cls, config: Any) -> WhisperConfig:
        """Read the fields from a ``transformers.WhisperConfig`` or its ``config.json`` dict."""
        return read_config(cls, config)


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> np.ndarray:
    """Whisper's sinusoidal position table ``(length, channels)`` (transformers' ``sinusoids``),
    the initial value of ``embed_positions``.

    >>> sinusoids(3, 4).shape
    (3, 4)
    """
    if channels % 2:
        raise ValueError(f"sinusoids need an even number of channels, got {channels}")
    log_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-log_increment * np.arange(channels // 2, dtype=np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def _dropout(module: Stochastic, x: jax.Array, rate: float) -> jax.Array:
    # transformers applies Whisper's dropouts functionally (no submodule): so does the twin.
    return nnx.Dropout(rate, deterministic=module.deterministic)(x, rngs=module.rngs)


def _conv(layers: Layers, in_features: int, out_features: int, *, stride: int) -> nnx.Conv:
    """``Conv1d(kernel_size=3, stride, padding=1)`` channels-last. The padding is a tuple (not
    ``Layers.conv``'s list) so that the model's graph definition hashes: ``generate`` compiles
    once per model structure with it as a static argument."""
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(3,),
        strides=(stride,),
        padding=((1, 1),),
        dtype=layers.dtype,
        param_dtype=layers.param_dtype,
        precision=layers.precision,
        rngs=layers.rngs,
    )


class WhisperEncoderLayer(nnx.Module):
    """Pre-norm block: ``x + drop(self_attn(LN(x)))``, then ``x + drop(fc2(drop(act(fc1(LN(x))))))``."""

    def __init__(self, layers: Layers) -> None:
        config = layers.config
        self.self_attn = SpeechAttention(
            layers,
            config.d_model,
            config.encoder_attention_heads,
            config.attention_dropout,
            key_bias=False,
            scale_query=True,
        )
        self.self_attn_layer_norm = layers.layer_norm(config.d_model)
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout
        self.activation_fn = Activation(config.activation_function)
        self.fc1 = layers.linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = layers.linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = layers.layer_norm(config.d_model)
        self.deterministic = False
        self.rngs = layers.rngs["dropout"].fork()

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        attended = self.self_attn(self.self_attn_layer_norm(hidden_states))
        hidden_states = hidden_states + _dropout(self, attended, self.dropout)
        ff = self.activation_fn(self.fc1(self.final_layer_norm(hidden_states)))
        ff = self.fc2(_dropout(self, ff, self.activation_dropout))
        return hidden_states + _dropout(self, ff, self.dropout)


class WhisperEncoder(nnx.Module):
    """Whisper's audio encoder, with the names and math of ``transformers.WhisperModel().encoder``.

    Arguments
    ---------
    config : WhisperConfig, a ``transformers.WhisperConfig`` or its ``config.json`` dict
        Read by attribute name; no torch import.
    dtype, param_dtype, precision
        Computation dtype, parameter dtype and matmul precision of every layer (Flax's meaning).
    attention_implementation : None, "xla" or "cudnn"
        ``None`` writes the attention out as transformers does; ``"cudnn"`` is cuDNN's flash
        attention (NVIDIA GPU, bf16): the fast choice for 1500 frames.
    rngs : nnx.Rngs
        Parameter initialisation and dropout randomness.

    Returns
    -------
    ``model(input_features)`` with ``input_features`` ``(batch, num_mel_bins, 2 * max_source_positions)``
    returns the last hidden state ``(batch, max_source_positions, d_model)``.

    Example
    -------
    >>> from flax import nnx
    >>> from flax_impl.graph import named_modules
    >>> config = WhisperConfig(d_model=8, encoder_layers=1, encoder_attention_heads=2,
    ...                        encoder_ffn_dim=16, num_mel_bins=4, max_source_positions=6)
    >>> [name for name, _ in named_modules(WhisperEncoder(config, rngs=nnx.Rngs(0)))][:4]
    ['', 'conv1', 'conv2', 'embed_positions']
    """

    config_class = WhisperConfig
    model_type = "whisper"
    # WhisperModel saves the encoder under "encoder.", WhisperForConditionalGeneration under "model.encoder.".
    checkpoint_prefixes = ("encoder.", "model.encoder.")

    def __init__(
        self,
        config: Any,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        attention_implementation: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.config = WhisperConfig.from_config(config)
        config = self.config
        layers = Layers(config, dtype, param_dtype, precision, rngs, attention_implementation)
        self.conv1 = _conv(layers, config.num_mel_bins, config.d_model, stride=1)
        self.conv2 = _conv(layers, config.d_model, config.d_model, stride=2)
        self.embed_positions = layers.embed(config.max_source_positions, config.d_model)
        self.embed_positions.embedding.set_value(
            jnp.asarray(sinusoids(config.max_source_positions, config.d_model), param_dtype)
        )
        self.layers = nnx.List([WhisperEncoderLayer(layers) for _ in range(config.encoder_layers)])
        self.layer_norm = layers.layer_norm(config.d_model)
        self.dropout, self.layerdrop = config.dropout, config.encoder_layerdrop
        self.deterministic = False
        self.rngs = rngs["dropout"].fork()

    def __call__(self, input_features: jax.Array, attention_mask: Any = None) -> jax.Array:
        """Encode log-mel ``input_features`` ``(batch, num_mel_bins, frames)``.

        ``attention_mask`` is accepted and ignored, as transformers' Whisper encoder ignores it.
        """
        input_features = jnp.asarray(input_features)
        expected = (self.config.num_mel_bins, 2 * self.config.max_source_positions)
        if input_features.ndim != 3 or tuple(input_features.shape[1:]) != expected:
            raise ValueError(
                f"Whisper expects input_features of shape (batch, {expected[0]}, {expected[1]}) "
                f"(num_mel_bins, 2 * max_source_positions), got {tuple(input_features.shape)}; pad the "
                f"mel features to {expected[1]} frames"
            )
        return self.encode(self.embed(input_features))

    def embed(self, input_features: jax.Array) -> jax.Array:
        """The frames the layers see: ``gelu(conv2(gelu(conv1(x)))) + embed_positions``, dropout."""
        x = jnp.transpose(jnp.asarray(input_features), (0, 2, 1))  # channels last
        x = jax.nn.gelu(self.conv1(x), approximate=False)
        x = jax.nn.gelu(self.conv2(x), approximate=False)
        hidden_states = x + self.embed_positions.embedding[...].astype(x.dtype)
        return _dropout(self, hidden_states, self.dropout)

    def encode(self, hidden_states: jax.Array) -> jax.Array:
        """The ``layers`` (with LayerDrop in training mode) and the final ``layer_norm``."""
        keep = None
        if self.layerdrop > 0.0 and not self.deterministic:
            keep = jax.random.uniform(self.rngs(), (len(self.layers),)) >= self.layerdrop
        for i, layer in enumerate(self.layers):
            new = layer(hidden_states)
            hidden_states = new if keep is None else jnp.where(keep[i], new, hidden_states)
        return self.layer_norm(hidden_states)

    @classmethod
    def from_pretrained(cls, path: Any, **kwargs: Any) -> WhisperEncoder:
        """Read a transformers ``save_pretrained`` directory of ``WhisperModel`` or
        ``WhisperForConditionalGeneration`` (the decoder's tensors are reported as left out); see
        :func:`flax_impl.models.pretrained.from_pretrained`."""
        from .pretrained import from_pretrained

        return from_pretrained(cls, path, **kwargs)


# ---------------------------------------------------------------------------------------------
# The decoder


class WhisperAttention(nnx.Module):
    """transformers' ``WhisperAttention`` as the decoder uses it: ``k_proj`` (no bias), ``v_proj``,
    ``q_proj``, ``out_proj``; the query scaled by ``head_dim ** -0.5`` before the product.

    Keys and values are computed apart (:meth:`key_value`) so that the decoder can keep them: the
    growing self-attention cache, and the cross-attention's, computed once per utterance.
    ``mask`` is boolean, broadcast to ``(batch, heads, queries, keys)``, True where attending;
    masked scores are set to the dtype's lowest value, the value transformers adds.

    Example
    -------
    >>> config = WhisperConfig(d_model=8, encoder_attention_heads=2, decoder_attention_heads=2)
    >>> attention = WhisperAttention(Layers(config, None, jnp.float32, None, nnx.Rngs(0)), 8, 2, 0.0)
    >>> key, value = attention.key_value(jnp.ones((1, 5, 8)))
    >>> key.shape, attention(jnp.ones((1, 3, 8)), key, value).shape
    ((1, 5, 2, 4), (1, 3, 8))
    """

    def __init__(self, layers: Layers, embed_dim: int, num_heads: int, dropout: float) -> None:
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.k_proj = layers.linear(embed_dim, embed_dim, use_bias=False)
        self.v_proj = layers.linear(embed_dim, embed_dim)
        self.q_proj = layers.linear(embed_dim, embed_dim)
        self.out_proj = layers.linear(embed_dim, embed_dim)
        self.dropout = dropout  # a rate, as in PyTorch (no submodule, no extra module name)
        self.deterministic = False
        self.rngs = layers.rngs["dropout"].fork()

    def key_value(self, states: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values ``(batch, length, heads, head_dim)`` of ``states`` ``(batch, length, d_model)``."""
        heads = (*states.shape[:-1], self.num_heads, self.head_dim)
        return self.k_proj(states).reshape(heads), self.v_proj(states).reshape(heads)

    def __call__(
        self, hidden_states: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        """Attend from ``hidden_states`` ``(batch, queries, d_model)`` over ``key``/``value``."""
        *batch_seq, _ = hidden_states.shape
        query = (self.q_proj(hidden_states) * self.scaling).reshape(*batch_seq, self.num_heads, self.head_dim)
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key)
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = attention_dropout(self, jax.nn.softmax(scores, axis=-1))
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        return self.out_proj(context.reshape(*batch_seq, -1))


#: One decoder layer's self-attention cache: keys and values ``(batch, length, heads, head_dim)``.
KeyValue = tuple[jax.Array, jax.Array]


class WhisperDecoderLayer(nnx.Module):
    """Pre-norm block: ``x + drop(self_attn(LN(x)))``, ``x + drop(encoder_attn(LN(x), encoder))``,
    then ``x + drop(fc2(drop(act(fc1(LN(x))))))``."""

    def __init__(self, layers: Layers) -> None:
        config = layers.config
        d_model, heads = config.d_model, config.decoder_attention_heads
        self.self_attn = WhisperAttention(layers, d_model, heads, config.attention_dropout)
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout
        self.activation_fn = Activation(config.activation_function)
        self.self_attn_layer_norm = layers.layer_norm(d_model)
        self.encoder_attn = WhisperAttention(layers, d_model, heads, config.attention_dropout)
        self.encoder_attn_layer_norm = layers.layer_norm(d_model)
        self.fc1 = layers.linear(d_model, config.decoder_ffn_dim)
        self.fc2 = layers.linear(config.decoder_ffn_dim, d_model)
        self.final_layer_norm = layers.layer_norm(d_model)
        self.deterministic = False
        self.rngs = layers.rngs["dropout"].fork()

    def __call__(
        self,
        hidden_states: jax.Array,
        mask: jax.Array,
        cross_key_value: KeyValue,
        cache: KeyValue | None = None,
        index: Any = 0,
    ) -> tuple[jax.Array, KeyValue | None]:
        """One block over ``hidden_states`` ``(batch, length, d_model)``.

        Without ``cache`` the self-attention sees these positions only (teacher forcing); with a
        ``cache`` their keys and values are written at ``index`` and the queries attend over the
        whole cache (``mask`` hides the slots not written yet). Returns the new hidden states and
        the new cache.
        """
        normed = self.self_attn_layer_norm(hidden_states)
        key, value = self.self_attn.key_value(normed)
        if cache is not None:
            start = (0, index, 0, 0)
            key = jax.lax.dynamic_update_slice(cache[0], key.astype(cache[0].dtype), start)
            value = jax.lax.dynamic_update_slice(cache[1], value.astype(cache[1].dtype), start)
            cache = (key, value)
        attended = self.self_attn(normed, key, value, mask)
        hidden_states = hidden_states + _dropout(self, attended, self.dropout)
        attended = self.encoder_attn(self.encoder_attn_layer_norm(hidden_states), *cross_key_value)
        hidden_states = hidden_states + _dropout(self, attended, self.dropout)
        ff = self.activation_fn(self.fc1(self.final_layer_norm(hidden_states)))
        ff = self.fc2(_dropout(self, ff, self.activation_dropout))
        return hidden_states + _dropout(self, ff, self.dropout), cache


class WhisperDecoder(nnx.Module):
    """Whisper's text decoder, with the names and math of ``transformers.WhisperModel().decoder``.

    ``embed_tokens`` ``(vocab_size, d_model)`` and the learned ``embed_positions``
    ``(max_target_positions, d_model)``, the ``layers``, the final ``layer_norm``. As PyTorch's
    ``nn.Embedding(padding_idx=pad_token_id)``, the lookup of ``pad_token_id`` passes no gradient to
    its row of ``embed_tokens`` (the tied output projection still does).

    Example
    -------
    >>> config = WhisperConfig(d_model=8, encoder_attention_heads=2, decoder_layers=1,
    ...                        decoder_attention_heads=2, decoder_ffn_dim=16, vocab_size=12, max_target_positions=6,
    ...                        pad_token_id=0)
    >>> decoder = WhisperDecoder(Layers(config, None, jnp.float32, None, nnx.Rngs(0)))
    >>> decoder(jnp.array([[1, 2, 3]]), jnp.ones((1, 4, 8))).shape
    (1, 3, 8)
    """

    def __init__(self, layers: Layers) -> None:
        config = layers.config
        config.check_decoder()
        self.config = config
        self.embed_tokens = layers.embed(config.vocab_size, config.d_model)
        self.embed_positions = layers.embed(config.max_target_positions, config.d_model)
        self.layers = nnx.List([WhisperDecoderLayer(layers) for _ in range(config.decoder_layers)])
        self.layer_norm = layers.layer_norm(config.d_model)
        self.dropout, self.layerdrop = config.dropout, config.decoder_layerdrop
        self.deterministic = False
        self.rngs = layers.rngs["dropout"].fork()

    def __call__(
        self,
        input_ids: jax.Array,
        encoder_hidden_states: jax.Array,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """The last hidden state ``(batch, length, d_model)`` of ``input_ids`` ``(batch, length)``
        (teacher forcing), attending over ``encoder_hidden_states`` ``(batch, frames, d_model)``.

        ``attention_mask`` ``(batch, length)`` is 1 for tokens, 0 for padding: no position attends
        to a padding key (padded positions still get outputs, as in transformers)."""
        input_ids = jnp.asarray(input_ids)
        length = input_ids.shape[1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        hidden_states, _ = self.decode(input_ids, self.cross_key_values(encoder_hidden_states), mask)
        return hidden_states

    def cross_key_values(self, encoder_hidden_states: jax.Array) -> list[KeyValue]:
        """Every layer's cross-attention keys and values of the encoder output (once per utterance)."""
        return [layer.encoder_attn.key_value(encoder_hidden_states) for layer in self.layers]

    def init_cache(self, batch_size: int, length: int, dtype: Any) -> list[KeyValue]:
        """An empty self-attention cache of ``length`` positions for every layer."""
        shape = (batch_size, length, self.config.decoder_attention_heads, self.config.decoder_head_size)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers]

    def decode(
        self,
        input_ids: jax.Array,
        cross_key_values: list[KeyValue],
        mask: jax.Array,
        cache: list[KeyValue] | None = None,
        index: Any = 0,
    ) -> tuple[jax.Array, list[KeyValue] | None]:
        """The layers over ``input_ids`` at positions ``index, index + 1, ...``: the final
        ``layer_norm``'s output and (with a ``cache``) the new cache. ``mask`` is boolean,
        ``(batch or 1, 1, length, keys)``."""
        embeds = embed_ids(self.embed_tokens, input_ids)
        if self.config.pad_token_id is not None:
            # nn.Embedding(padding_idx=...): the padding row gets no gradient from the lookup.
            embeds = jnp.where(
                (input_ids == self.config.pad_token_id)[..., None], jax.lax.stop_gradient(embeds), embeds
            )
        table = self.embed_positions.embedding[...]
        positions = jax.lax.dynamic_slice_in_dim(table, index, input_ids.shape[1], axis=0)
        hidden_states = _dropout(self, embeds + positions.astype(embeds.dtype), self.dropout)
        keep = None
        if self.layerdrop > 0.0 and not self.deterministic:
            keep = jax.random.uniform(self.rngs(), (len(self.layers),)) >= self.layerdrop
        new_cache: list[KeyValue] = []
        for i, layer in enumerate(self.layers):
            new, layer_cache = layer(
                hidden_states, mask, cross_key_values[i], None if cache is None else cache[i], index
            )
            hidden_states = new if keep is None else jnp.where(keep[i], new, hidden_states)
            if layer_cache is not None:
                new_cache.append(layer_cache)
        return self.layer_norm(hidden_states), (None if cache is None else new_cache)


class WhisperModel(nnx.Module):
    """The twin of ``transformers.WhisperModel``: ``encoder`` and ``decoder``.

    Arguments
    ---------
    config : WhisperConfig, a ``transformers.WhisperConfig`` or its ``config.json`` dict
        Read by attribute name; no torch import.
    dtype, param_dtype, precision
        Computation dtype, parameter dtype and matmul precision of every layer (Flax's meaning).
    attention_implementation : None, "xla" or "cudnn"
        The encoder's self-attention (see :class:`WhisperEncoder`); the decoder's is written out.
    rngs : nnx.Rngs
        Parameter initialisation, dropout and SpecAugment randomness.

    Returns
    -------
    ``model(input_features, decoder_input_ids, decoder_attention_mask=None)`` returns the decoder's
    last hidden state ``(batch, target_length, d_model)``; ``encoder_outputs=`` (the encoder's last
    hidden state) may replace ``input_features``. In training mode with
    ``config.apply_spec_augment``, random time and mel-bin spans of the features are zeroed first,
    as transformers' ``_mask_input_features`` does (same distribution, JAX's random numbers).

    Example
    -------
    >>> config = WhisperConfig(d_model=8, encoder_layers=1, encoder_attention_heads=2,
    ...                        encoder_ffn_dim=16, num_mel_bins=4, max_source_positions=6,
    ...                        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=16,
    ...                        vocab_size=12, max_target_positions=6, pad_token_id=0)
    >>> model = WhisperModel(config, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 4, 12)), jnp.array([[1, 2, 3], [1, 4, 0]])).shape
    (2, 3, 8)
    """

    config_class = WhisperConfig
    model_type = "whisper"
    # A WhisperForConditionalGeneration directory holds this model under "model.".
    base_model_prefix = "model"

    def __init__(
        self,
        config: Any,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        attention_implementation: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.config = WhisperConfig.from_config(config)
        self.config.check_decoder()  # before building anything
        self.encoder = WhisperEncoder(
            self.config,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            attention_implementation=attention_implementation,
            rngs=rngs,
        )
        self.decoder = WhisperDecoder(Layers(self.config, dtype, param_dtype, precision, rngs))
        self.deterministic = False
        self.rngs = rngs["dropout"].fork()

    def __call__(
        self,
        input_features: jax.Array | None = None,
        decoder_input_ids: jax.Array | None = None,
        decoder_attention_mask: jax.Array | None = None,
        *,
        encoder_outputs: jax.Array | None = None,
    ) -> jax.Array:
        """The decoder's last hidden state; see the class docstring."""
        if decoder_input_ids is None:
            raise ValueError("WhisperModel needs decoder_input_ids (batch, target_length)")
        encoder_outputs = self.encode(input_features, encoder_outputs)
        return self.decoder(decoder_input_ids, encoder_outputs, decoder_attention_mask)

    def encode(self, input_features: jax.Array | None, encoder_outputs: jax.Array | None = None) -> jax.Array:
        """``encoder_outputs`` if given (its first element, for transformers' tuple), else the
        encoder's last hidden state of the (SpecAugmented, in training) ``input_features``."""
        if encoder_outputs is not None:
            if isinstance(encoder_outputs, (tuple, list)):
                encoder_outputs = encoder_outputs[0]
            return jnp.asarray(encoder_outputs)
        if input_features is None:
            raise ValueError("pass input_features (batch, num_mel_bins, frames) or encoder_outputs")
        return self.encoder(self.mask_input_features(jnp.asarray(input_features)))

    def mask_input_features(self, input_features: jax.Array) -> jax.Array:
        """transformers' ``_mask_input_features``: SpecAugment on ``(batch, num_mel_bins, frames)``,
        in training mode with ``config.apply_spec_augment`` only."""
        config = self.config
        if not config.apply_spec_augment or self.deterministic:
            return input_features
        batch_size, mel_bins, frames = input_features.shape
        if config.mask_time_prob > 0:
            time = compute_mask_indices(
                self.rngs(),
                (batch_size, frames),
                config.mask_time_prob,
                config.mask_time_length,
                min_masks=config.mask_time_min_masks,
            )
            input_features = jnp.where(time[:, None, :], 0, input_features)
        if config.mask_feature_prob > 0:
            bins = compute_mask_indices(
                self.rngs(),
                (batch_size, mel_bins),
                config.mask_feature_prob,
                config.mask_feature_length,
                min_masks=config.mask_feature_min_masks,
            )
            input_features = jnp.where(bins[:, :, None], 0, input_features)
        return input_features

    @classmethod
    def from_pretrained(cls, path: Any, **kwargs: Any) -> Any:
        """Read a transformers ``save_pretrained`` directory of ``WhisperModel`` or
        ``WhisperForConditionalGeneration`` (under ``model.``; ``proj_out`` is left out) without
        torch, in eval mode; see :func:`flax_impl.models.pretrained.from_pretrained`."""
        from .pretrained import from_pretrained

        return from_pretrained(cls, path, **kwargs)


class WhisperForConditionalGeneration(nnx.Module):
    """The twin of ``transformers.WhisperForConditionalGeneration``: ``model`` (a :class:`WhisperModel`)
    and the output projection, with greedy decoding (:meth:`generate`).

    The logits are ``hidden @ model.decoder.embed_tokens.embedding.T``: transformers' ``proj_out``
    is tied to ``embed_tokens``, so the twin has no ``proj_out`` module and stores the matrix once;
    :attr:`tied_weights` declares ``proj_out.weight`` as tied, and the bridge exports it (same
    values) and accepts it (checked equal) under that name. Hence ``all_linear`` does not select an
    output projection here (as PEFT's ``"all-linear"`` does not), while ``torch_impl``'s
    ``all_linear`` on the transformers model wraps ``proj_out`` (an ``nn.Linear``) too. With
    ``tie_word_embeddings=False`` the twin has its own ``proj_out`` ``nnx.Linear`` (no bias).

    Arguments
    ---------
    config, dtype, param_dtype, precision, attention_implementation, rngs
        As :class:`WhisperModel`.

    Returns
    -------
    ``model(input_features, decoder_input_ids, decoder_attention_mask=None)`` returns the logits
    ``(batch, target_length, vocab_size)``; ``encoder_outputs=`` may replace ``input_features``.

    Example
    -------
    >>> config = WhisperConfig(d_model=8, encoder_layers=1, encoder_attention_heads=2,
    ...                        encoder_ffn_dim=16, num_mel_bins=4, max_source_positions=6,
    ...                        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=16,
    ...                        vocab_size=12, max_target_positions=6, pad_token_id=0,
    ...                        eos_token_id=11, decoder_start_token_id=1, begin_suppress_tokens=None)
    >>> model = WhisperForConditionalGeneration(config, rngs=nnx.Rngs(0))
    >>> model.eval()
    >>> features = jnp.ones((2, 4, 12))
    >>> model(features, jnp.array([[1, 2], [1, 3]])).shape
    (2, 2, 12)
    >>> model.generate(features, jnp.array([[1], [1]]), max_new_tokens=3).shape
    (2, 4)
    >>> model.tied_weights
    {'proj_out.weight': 'model.decoder.embed_tokens.weight'}
    """

    config_class = WhisperConfig
    model_type = "whisper"
    base_model_prefix = "model"
    checkpoint_prefixes: tuple[str, ...] = ()  # the file's own names: model.encoder..., proj_out.weight

    def __init__(
        self,
        config: Any,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        attention_implementation: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.config = WhisperConfig.from_config(config)
        self.model = WhisperModel(
            self.config,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            attention_implementation=attention_implementation,
            rngs=rngs,
        )
        if not self.config.tie_word_embeddings:
            self.proj_out = Layers(self.config, dtype, param_dtype, precision, rngs).linear(
                self.config.d_model, self.config.vocab_size, use_bias=False
            )
        self.dtype, self.precision = dtype, precision

    @property
    def tied_weights(self) -> dict[str, str]:
        """``{PyTorch key the twin does not store: the key it is tied to}``."""
        if not self.config.tie_word_embeddings:
            return {}
        return {"proj_out.weight": "model.decoder.embed_tokens.weight"}

    def __call__(
        self,
        input_features: jax.Array | None = None,
        decoder_input_ids: jax.Array | None = None,
        decoder_attention_mask: jax.Array | None = None,
        *,
        encoder_outputs: jax.Array | None = None,
    ) -> jax.Array:
        """The logits ``(batch, target_length, vocab_size)``; see the class docstring."""
        hidden = self.model(
            input_features, decoder_input_ids, decoder_attention_mask, encoder_outputs=encoder_outputs
        )
        return self.logits(hidden)

    def logits(self, hidden_states: jax.Array) -> jax.Array:
        """``proj_out``: ``hidden_states`` ``(..., d_model)`` to ``(..., vocab_size)``."""
        if not self.config.tie_word_embeddings:
            return self.proj_out(hidden_states)
        embedding = self.model.decoder.embed_tokens.embedding[...]
        hidden_states, embedding = nnx.nn.dtypes.promote_dtype((hidden_states, embedding), dtype=self.dtype)
        return jnp.einsum("...d,vd->...v", hidden_states, embedding, precision=self.precision)

    def default_prompt(self, batch_size: int) -> np.ndarray:
        """``decoder_start_token_id`` followed by the ``forced_decoder_ids`` of the config (language,
        task, no-timestamps tokens of the older checkpoints), as transformers' Whisper ``generate``
        builds its initial tokens; ``(batch_size, length)``."""
        tokens = [self.config.decoder_start_token_id]
        for position, token in sorted(self.config.forced_decoder_ids or ()):
            if position != len(tokens):
                raise ValueError(
                    f"forced_decoder_ids {self.config.forced_decoder_ids} do not follow the start token "
                    "position by position; pass decoder_input_ids explicitly"
                )
            tokens.append(token)
        return np.tile(np.asarray(tokens, np.int32), (batch_size, 1))

    def generate(
        self,
        input_features: jax.Array | None = None,
        decoder_input_ids: jax.Array | None = None,
        max_new_tokens: int = 32,
        *,
        eos_token_id: int | None = None,
        encoder_outputs: jax.Array | None = None,
    ) -> jax.Array:
        """Greedy decoding with a key/value cache, the whole loop compiled (``jax.jit``, one
        ``jax.lax.while_loop``; no Python step per token).

        Arguments
        ---------
        input_features : jax.Array
            ``(batch, num_mel_bins, 2 * max_source_positions)`` log-mel features (or pass
            ``encoder_outputs``, the encoder's last hidden state).
        decoder_input_ids : jax.Array, optional
            The prompt ``(batch, prompt_length)``, the same length for every row; default
            :meth:`default_prompt`.
        max_new_tokens : int
            Tokens to generate after the prompt; ``prompt_length + max_new_tokens`` may not exceed
            ``max_target_positions``.
        eos_token_id : int, optional
            Stops a row once generated (default ``config.eos_token_id``; with neither, rows never
            stop). The loop ends early when every row has stopped.

        Returns
        -------
        jax.Array
            ``(batch, prompt_length + max_new_tokens)`` int32: the prompt, then the new tokens, with
            ``eos_token_id`` after a row's end of sequence.

        Each step takes the argmax of the last logits after transformers' logits processors of
        the config: ``suppress_tokens`` never, ``begin_suppress_tokens`` not as the first new token.
        The cross-attention keys and values are computed once; the self-attention cache holds
        ``prompt_length + max_new_tokens`` positions. Runs in eval mode (no dropout), whatever the
        model's mode.
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        encoder_outputs = None if encoder_outputs is None else self.model.encode(None, encoder_outputs)
        if input_features is None and encoder_outputs is None:
            raise ValueError("generate needs input_features (batch, num_mel_bins, frames) or encoder_outputs")
        source = encoder_outputs if encoder_outputs is not None else jnp.asarray(input_features)
        batch_size = source.shape[0]
        prompt = jnp.asarray(
            self.default_prompt(batch_size) if decoder_input_ids is None else decoder_input_ids
        )
        if prompt.ndim != 2 or prompt.shape[0] != batch_size or not jnp.issubdtype(prompt.dtype, jnp.integer):
            raise ValueError(
                f"decoder_input_ids must be integer token ids (batch={batch_size}, prompt_length), got "
                f"{prompt.dtype} of shape {tuple(prompt.shape)}"
            )
        total = prompt.shape[1] + max_new_tokens
        if total > self.config.max_target_positions:
            raise ValueError(
                f"prompt_length ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                f"max_target_positions ({self.config.max_target_positions}), the decoder's position table"
            )
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        if eos_token_id is not None and eos_token_id < 0:
            raise ValueError(f"eos_token_id must be a token id (>= 0) or None, got {eos_token_id}")
        graphdef, state = nnx.split(self)
        features = (
            None if input_features is None or encoder_outputs is not None else jnp.asarray(input_features)
        )
        # The end-of-sequence id is traced, not static: another id reuses the compiled loop.
        eos = jnp.int32(-1 if eos_token_id is None else eos_token_id)
        return _greedy(
            graphdef, state, features, encoder_outputs, prompt.astype(jnp.int32), max_new_tokens, eos
        )

    @classmethod
    def from_pretrained(cls, path: Any, **kwargs: Any) -> Any:
        """Read a transformers ``save_pretrained`` directory of ``WhisperForConditionalGeneration``
        (single or sharded; with or without ``proj_out.weight``) without torch, in eval mode; see
        :func:`flax_impl.models.pretrained.from_pretrained`."""
        from .pretrained import from_pretrained

        return from_pretrained(cls, path, **kwargs)


def _suppressed(tokens: tuple[int, ...] | None, vocab_size: int) -> np.ndarray:
    """``(vocab_size,)`` booleans, True for the listed ids (ids outside the vocabulary are ignored,
    as transformers' ``SuppressTokensLogitsProcessor`` ignores them)."""
    return np.isin(np.arange(vocab_size), np.asarray(tokens or (), np.int64))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_features: jax.Array | None,
    encoder_outputs: jax.Array | None,
    prompt: jax.Array,
    max_new_tokens: int,
    eos_token_id: jax.Array,
) -> jax.Array:
    """The compiled greedy loop of :meth:`WhisperForConditionalGeneration.generate`;
    ``eos_token_id`` -1: rows never stop (no token id is negative)."""
    model = nnx.merge(graphdef, state)
    model.eval()  # a copy: the caller's model keeps its mode
    config = model.config
    encoder_outputs = model.model.encode(input_features, encoder_outputs)
    decoder = model.model.decoder
    cross = decoder.cross_key_values(encoder_outputs)
    batch_size, prompt_length = prompt.shape
    total = prompt_length + max_new_tokens
    cache = decoder.init_cache(batch_size, total, cross[0][0].dtype)
    keys = jnp.arange(total)

    def step(tokens: jax.Array, cache: list[KeyValue], index: Any) -> tuple[jax.Array, list[KeyValue]]:
        # Queries at index, index + 1, ... see the cache slots up to their own position.
        queries = index + jnp.arange(tokens.shape[1])
        mask = (keys[None, :] <= queries[:, None])[None, None]
        hidden, cache = decoder.decode(tokens, cross, mask, cache, index)
        return model.logits(hidden[:, -1]).astype(jnp.float32), cache

    logits, cache = step(prompt, cache, 0)
    suppress = jnp.asarray(_suppressed(config.suppress_tokens, config.vocab_size))
    begin = jnp.asarray(_suppressed(config.begin_suppress_tokens, config.vocab_size))
    fill = jnp.maximum(eos_token_id, 0)  # after a row's end; never read without an eos
    tokens = jnp.full((batch_size, total), fill, jnp.int32).at[:, :prompt_length].set(prompt)
    done = jnp.zeros((batch_size,), bool)

    def cond(carry: tuple[Any, ...]) -> jax.Array:
        i, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        i, logits, cache, tokens, done = carry
        banned = suppress | (begin & (i == 0))
        next_token = jnp.argmax(jnp.where(banned, -jnp.inf, logits), axis=-1).astype(jnp.int32)
        next_token = jnp.where(done, eos_token_id, next_token)
        done = done | (next_token == eos_token_id)
        tokens = jax.lax.dynamic_update_slice(tokens, next_token[:, None], (0, prompt_length + i))
        logits, cache = step(next_token[:, None], cache, prompt_length + i)
        return i + 1, logits, cache, tokens, done

    *_, tokens, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), logits, cache, tokens, done))
    return tokens
