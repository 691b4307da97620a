"""Flax NNX twins of ``transformers.LlamaModel`` and ``LlamaForCausalLM`` (Llama 2, 3, 3.1-3.3).

The math is the shared decoder's (:mod:`flax_impl.models.decoder`, after transformers 5.24's
``modeling_llama.py``); this file names the classes and reads the config
(:func:`~flax_impl.models.decoder.llama_config`): GQA, ``head_dim``, ``attention_bias`` (q, k, v
and o), ``mlp_bias``, tied or untied embeddings, RoPE ``default``/``linear``/``dynamic``/``llama3``/``yarn``
from ``rope_parameters`` or the older ``rope_scaling`` + ``rope_theta``.

Example
-------
>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
...           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
>>> model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
>>> type(model.model.layers[0].self_attn.q_proj).__name__, model(jnp.array([[1, 2]])).shape
('Linear', (1, 2, 32))
"""

from __future__ import annotations

from .decoder import DecoderForCausalLM, DecoderModel, llama_config

__all__ = ["LlamaForCausalLM", "LlamaModel", "llama_config"]


class LlamaModel(DecoderModel):
    """``transformers.LlamaModel``: ``embed_tokens``, ``layers``, ``norm``; returns the last hidden state."""

    model_type = "llama"
    read_config = staticmethod(llama_config)


class LlamaForCausalLM(DecoderForCausalLM):
    """``transformers.LlamaForCausalLM``: :class:`LlamaModel` as ``model`` plus ``lm_head``; logits,
    :meth:`generate`, :meth:`from_pretrained` (see :class:`~flax_impl.models.decoder.DecoderForCausalLM`)."""

    model_type = "llama"
    base_class = LlamaModel
