"""Flax NNX twins of ``transformers.Qwen3Model`` and ``Qwen3ForCausalLM`` (Qwen3 dense).

Llama's math (:mod:`flax_impl.models.decoder`) with an RMSNorm on each query and key head
(``q_norm``, ``k_norm``, before RoPE), ``head_dim`` 128 by default, ``attention_bias`` on q, k, v
and o, and Qwen2's sliding-window options; after transformers 5.24's ``modeling_qwen3.py``.

Example
-------
>>> from flax import nnx
>>> config = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
...           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
>>> attention = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0)).model.layers[0].self_attn
>>> attention.q_norm.scale.shape, attention.q_proj.kernel.shape
((8,), (16, 32))
"""

from __future__ import annotations

from typing import Any

from ._speech import config_value
from .decoder import DecoderConfig, DecoderForCausalLM, DecoderModel, llama_style_config
from .qwen2 import QWEN2_DEFAULTS, qwen_layer_types

__all__ = ["Qwen3ForCausalLM", "Qwen3Model", "qwen3_config"]

#: transformers' Qwen3Config defaults (the fields the twin reads).
QWEN3_DEFAULTS = {**QWEN2_DEFAULTS, "head_dim": 128}


def qwen3_config(config: Any) -> DecoderConfig:
    """Read a ``transformers.Qwen3Config`` or its ``config.json`` dict."""
    if isinstance(config, DecoderConfig):
        return config
    layers = config_value(config, "num_hidden_layers", QWEN3_DEFAULTS["num_hidden_layers"])
    layer_types, window = qwen_layer_types(config, layers)
    bias = bool(config_value(config, "attention_bias", False))
    return llama_style_config(
        config,
        model_type="qwen3",
        defaults=QWEN3_DEFAULTS,
        layer_types=layer_types,
        sliding_window=window,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
    )


class Qwen3Model(DecoderModel):
    """``transformers.Qwen3Model``: ``embed_tokens``, ``layers``, ``norm``."""

    model_type = "qwen3"
    read_config = staticmethod(qwen3_config)


class Qwen3ForCausalLM(DecoderForCausalLM):
    """``transformers.Qwen3ForCausalLM``: :class:`Qwen3Model` plus ``lm_head``."""

    model_type = "qwen3"
    base_class = Qwen3Model
