"""A Flax NNX twin of the encoder of ``transformers.WhisperModel``: same module names, same math.

``conv1`` (kernel 3, padding 1) and ``conv2`` (kernel 3, stride 2, padding 1), each followed by the
exact GELU, then the ``embed_positions`` table added to all ``max_source_positions`` frames, the
pre-norm ``layers`` (``self_attn`` with an unbiased ``k_proj`` and the query scaled before the
product, ``fc1``/``fc2``), and the final ``layer_norm``. Module names are those of
``WhisperModel().encoder.named_modules()``; :meth:`WhisperEncoder.from_pretrained` reads a
directory saved from ``WhisperModel`` or ``WhisperForConditionalGeneration`` and reports the
decoder's tensors as left out.

The input is transformers' layout, ``(batch, num_mel_bins, frames)`` with ``frames`` equal to
``2 * max_source_positions`` (3000 for the released checkpoints), as Whisper requires.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._speech import Layers, SpeechAttention, Stochastic, _activation_name, _positive, read_config
from .bert import Activation

__all__ = ["WhisperConfig", "WhisperEncoder", "WhisperEncoderLayer", "sinusoids"]


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """The encoder's fields of ``transformers.WhisperConfig``, with its defaults.

    Example
    -------
    >>> WhisperConfig.from_config({"d_model": 512, "encoder_attention_heads": 8}).head_size
    64
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

    def __post_init__(self) -> None:
        _positive(
            self,
            "d_model",
            "encoder_layers",
            "encoder_attention_heads",
            "encoder_ffn_dim",
            "num_mel_bins",
            "max_source_positions",
        )
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"WhisperConfig.d_model ({self.d_model}) must be a multiple of encoder_attention_heads "
                f"({self.encoder_attention_heads})"
            )
        _activation_name(self, "activation_function")

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.encoder_attention_heads

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
        self.conv1 = layers.conv(config.num_mel_bins, config.d_model, 3, padding=1)
        self.conv2 = layers.conv(config.d_model, config.d_model, 3, stride=2, padding=1)
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
