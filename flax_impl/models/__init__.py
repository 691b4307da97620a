"""Flax NNX twins of well-known PyTorch models, with PyTorch's module names.

A twin's dotted module names equal the PyTorch model's ``named_modules()`` names, so a torch
``state_dict`` converts onto it key for key (``converters.torch_to_flax``) and one list of glob
patterns targets the same layers in both frameworks. Every twin has ``from_pretrained(path)``,
which reads a transformers ``save_pretrained`` directory without torch and returns eval mode.

- :class:`BertModel` (``transformers.BertModel``)
- :class:`Wav2Vec2Model`, :class:`HubertModel`, :class:`WavLMModel` (raw 16 kHz audio in)
- :class:`WhisperEncoder`, :class:`WhisperModel`, :class:`WhisperForConditionalGeneration`
  (log-mel features in, from :func:`whisper_log_mel`; greedy ``generate``)

>>> from flax import nnx
>>> from flax_impl.models import BertConfig, BertModel
>>> config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
...                     num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
>>> model = BertModel(config, rngs=nnx.Rngs(0))
>>> type(model.encoder.layer[0].attention.self.query).__name__
'Linear'
"""

from .bert import BertConfig, BertModel, extended_attention_mask
from .hubert import HubertConfig, HubertModel
from .pretrained import from_pretrained, read_pretrained_tensors
from .wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
from .wavlm import WavLMConfig, WavLMModel
from .whisper import (
    WhisperConfig,
    WhisperEncoder,
    WhisperForConditionalGeneration,
    WhisperModel,
)
from .whisper_features import whisper_log_mel

__all__ = [
    "BertConfig",
    "BertModel",
    "HubertConfig",
    "HubertModel",
    "Wav2Vec2Config",
    "Wav2Vec2Model",
    "WavLMConfig",
    "WavLMModel",
    "WhisperConfig",
    "WhisperEncoder",
    "WhisperForConditionalGeneration",
    "WhisperModel",
    "extended_attention_mask",
    "from_pretrained",
    "read_pretrained_tensors",
    "whisper_log_mel",
]
