"""A Flax NNX twin of ``transformers.Wav2Vec2Model``: same module names, same math.

Module names are those of transformers' ``named_modules()`` (``feature_extractor.conv_layers.0.conv``,
``feature_projection.projection``, ``encoder.pos_conv_embed.conv``, ``encoder.layers.0.attention.q_proj``,
``encoder.layers.0.feed_forward.output_dense``, ...), so a transformers checkpoint converts key for
key and one list of glob patterns adapts the same layers in both frameworks. Both feature-encoder
norms (``feat_extract_norm="group"``/``"layer"``) and both encoders (``do_stable_layer_norm``) are
built as the config says; see :mod:`flax_impl.models._speech` for the PyTorch semantics declared.

Example
-------
>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
...                         intermediate_size=32, conv_dim=(8, 8), conv_kernel=(10, 3),
...                         conv_stride=(5, 2), num_conv_pos_embeddings=4,
...                         num_conv_pos_embedding_groups=2)
>>> model = Wav2Vec2Model(config, rngs=nnx.Rngs(0))
>>> model.eval()
>>> model(jnp.zeros((2, 400)), attention_mask=jnp.ones((2, 400))).shape
(2, 39, 16)
"""

from __future__ import annotations

import dataclasses

from ._speech import SpeechConfig, SpeechModel

__all__ = ["Wav2Vec2Config", "Wav2Vec2Model"]


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config(SpeechConfig):
    """``transformers.Wav2Vec2Config``'s fields and defaults (see :class:`SpeechConfig`)."""


class Wav2Vec2Model(SpeechModel):
    """A wav2vec 2.0 encoder whose module names and forward math are ``transformers.Wav2Vec2Model``'s.

    Arguments
    ---------
    config : Wav2Vec2Config, a ``transformers.Wav2Vec2Config`` or its ``config.json`` dict
        Read by attribute name; no torch import.
    dtype, param_dtype, precision
        Computation dtype, parameter dtype and matmul precision of every layer (Flax's meaning).
    rngs : nnx.Rngs
        Parameter initialisation and dropout randomness.

    Returns
    -------
    ``model(input_values, attention_mask=None)`` returns the last hidden state
    ``(batch, frames, hidden_size)``. Training mode after construction (dropout and SpecAugment
    on), as a torch module; :meth:`from_pretrained` returns eval mode.

    Example
    -------
    >>> from flax import nnx
    >>> from flax_impl.graph import named_modules
    >>> config = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
    ...           "intermediate_size": 16, "conv_dim": [4], "conv_kernel": [10], "conv_stride": [5],
    ...           "num_conv_pos_embeddings": 4, "num_conv_pos_embedding_groups": 2}
    >>> model = Wav2Vec2Model(config, rngs=nnx.Rngs(0))
    >>> sorted(name for name, _ in named_modules(model) if name.endswith("q_proj"))
    ['encoder.layers.0.attention.q_proj']
    """

    config_class = Wav2Vec2Config
    model_type = "wav2vec2"
    base_model_prefix = "wav2vec2"
