"""A Flax NNX twin of ``transformers.HubertModel``: same module names, same math.

HuBERT is wav2vec2's architecture with two options of its own: ``feat_proj_layer_norm`` (the
feature projection's LayerNorm, on by default) and ``conv_pos_batch_norm`` (a BatchNorm before a
plain grouped positional convolution instead of weight norm). Both are honoured. As in
transformers, HuBERT's random SpecAugment time spans are drawn over all frames (its forward does not
pass the attention mask on), where wav2vec2 and WavLM keep them within each row's real frames.

Example
-------
>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = HubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
...                       intermediate_size=32, conv_dim=(8, 8), conv_kernel=(10, 3),
...                       conv_stride=(5, 2), num_conv_pos_embeddings=4,
...                       num_conv_pos_embedding_groups=2, feat_proj_layer_norm=False)
>>> model = HubertModel(config, rngs=nnx.Rngs(0))
>>> model.eval()
>>> hasattr(model.feature_projection, "layer_norm"), model(jnp.zeros((1, 400))).shape
(False, (1, 39, 16))
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from ._speech import Layers, SpeechConfig, SpeechFeatureProjection, SpeechModel

__all__ = ["HubertConfig", "HubertModel"]


@dataclasses.dataclass(frozen=True)
class HubertConfig(SpeechConfig):
    """``transformers.HubertConfig``'s fields and defaults (see :class:`SpeechConfig`)."""


class HubertModel(SpeechModel):
    """A HuBERT encoder whose module names and forward math are ``transformers.HubertModel``'s.

    Arguments and call as :class:`~flax_impl.models.Wav2Vec2Model`.

    Example
    -------
    >>> from flax import nnx
    >>> config = HubertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                       intermediate_size=16, conv_dim=(4,), conv_kernel=(10,), conv_stride=(5,),
    ...                       num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
    ...                       conv_pos_batch_norm=True)
    >>> type(HubertModel(config, rngs=nnx.Rngs(0)).encoder.pos_conv_embed.batch_norm).__name__
    'BatchNorm'
    """

    config_class = HubertConfig
    model_type = "hubert"
    base_model_prefix = "hubert"
    # transformers' HubertModel.forward calls _mask_hidden_states without the attention mask.
    spec_augment_reads_attention_mask = False

    def make_feature_projection(self, layers: Layers) -> nnx.Module:
        return SpeechFeatureProjection(layers, layer_norm=layers.config.feat_proj_layer_norm)
