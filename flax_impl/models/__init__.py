"""Flax NNX twins of well-known PyTorch models, with PyTorch's module names.

A twin's dotted module names equal the PyTorch model's ``named_modules()`` names, so a torch
``state_dict`` converts onto it key for key (``converters.torch_to_flax``) and one list of glob
patterns targets the same layers in both frameworks. Every twin has ``from_pretrained(path)``,
which reads a transformers ``save_pretrained`` directory without torch and returns eval mode.

- :class:`BertModel` (``transformers.BertModel``)
- :class:`Wav2Vec2Model`, :class:`HubertModel`, :class:`WavLMModel` (raw 16 kHz audio in)
- :class:`WhisperEncoder`, :class:`WhisperModel`, :class:`WhisperForConditionalGeneration`
  (log-mel features in, from :func:`whisper_log_mel`; greedy ``generate``)
- decoder LLMs on one shared decoder (:mod:`flax_impl.models.decoder`): :class:`LlamaForCausalLM`,
  :class:`MistralForCausalLM`, :class:`Qwen2ForCausalLM`, :class:`Qwen3ForCausalLM`,
  :class:`Gemma3ForCausalLM` and their headless ``...Model`` (greedy ``generate``); loaded at LLM
  size onto a mesh with :mod:`flax_impl.models.partitioning`'s rules

>>> from flax import nnx
>>> from flax_impl.models import BertConfig, BertModel
>>> config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
...                     num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
>>> model = BertModel(config, rngs=nnx.Rngs(0))
>>> type(model.encoder.layer[0].attention.self.query).__name__
'Linear'
"""

from . import partitioning
from .bert import BertConfig, BertModel, extended_attention_mask
from .gemma3 import Gemma3ForCausalLM, Gemma3TextModel
from .hubert import HubertConfig, HubertModel
from .llama import LlamaForCausalLM, LlamaModel
from .mistral import MistralForCausalLM, MistralModel
from .pretrained import from_pretrained, read_pretrained_tensors
from .qwen2 import Qwen2ForCausalLM, Qwen2Model
from .qwen3 import Qwen3ForCausalLM, Qwen3Model
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
    "Gemma3ForCausalLM",
    "Gemma3TextModel",
    "HubertConfig",
    "HubertModel",
    "LlamaForCausalLM",
    "LlamaModel",
    "MistralForCausalLM",
    "MistralModel",
    "Qwen2ForCausalLM",
    "Qwen2Model",
    "Qwen3ForCausalLM",
    "Qwen3Model",
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
    "partitioning",
    "read_pretrained_tensors",
    "whisper_log_mel",
]
