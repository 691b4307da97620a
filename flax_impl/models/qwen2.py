"""Flax NNX twins of ``transformers.Qwen2Model`` and ``Qwen2ForCausalLM`` (Qwen2, Qwen2.5).

Llama's math (:mod:`flax_impl.models.decoder`) with a bias on q, k and v (not o), after
transformers 5.24's ``modeling_qwen2.py``. Sliding windows as the config spells them:
``use_sliding_window`` (off in the released checkpoints) turns ``sliding_window`` on, and then the
layers from ``max_window_layers`` on are sliding (transformers' reading), unless ``layer_types``
lists them.

Example
-------
>>> from flax import nnx
>>> config = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
...           "num_attention_heads": 4, "num_key_value_heads": 2, "use_sliding_window": True,
...           "sliding_window": 4, "max_window_layers": 1}
>>> model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
>>> model.config.layer_types, model.model.layers[0].self_attn.q_proj.bias is not None
(('full_attention', 'sliding_attention', 'sliding_attention'), True)
"""

from __future__ import annotations

from typing import Any

from ._speech import config_value
from .decoder import (
    FULL,
    LLAMA_DEFAULTS,
    SLIDING,
    DecoderConfig,
    DecoderForCausalLM,
    DecoderModel,
    llama_style_config,
)

__all__ = ["Qwen2ForCausalLM", "Qwen2Model", "qwen2_config", "qwen_layer_types"]

#: transformers' Qwen2Config defaults (the fields the twin reads).
QWEN2_DEFAULTS = {
    **LLAMA_DEFAULTS,
    "vocab_size": 151936,
    "intermediate_size": 22016,
    "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
    "bos_token_id": None,
    "eos_token_id": None,
}


def qwen_layer_types(config: Any, num_layers: int) -> tuple[tuple[str, ...], int | None]:
    """``(layer_types, sliding_window)`` as Qwen2Config/Qwen3Config's ``__post_init__`` sets them:
    the window only with ``use_sliding_window``; sliding layers from ``max_window_layers`` on.

    >>> qwen_layer_types({"use_sliding_window": False, "sliding_window": 4096}, 2)
    (('full_attention', 'full_attention'), None)
    """
    window = config_value(config, "sliding_window", 4096)
    window = window if config_value(config, "use_sliding_window", False) else None
    layer_types = config_value(config, "layer_types", None)
    if layer_types is None:
        first = config_value(config, "max_window_layers", 28)
        layer_types = [SLIDING if window is not None and i >= first else FULL for i in range(num_layers)]
    return tuple(layer_types), window


def qwen2_config(config: Any) -> DecoderConfig:
    """Read a ``transformers.Qwen2Config`` or its ``config.json`` dict."""
    if isinstance(config, DecoderConfig):
        return config
    layers = config_value(config, "num_hidden_layers", QWEN2_DEFAULTS["num_hidden_layers"])
    layer_types, window = qwen_layer_types(config, layers)
    return llama_style_config(
        config,
        model_type="qwen2",
        defaults=QWEN2_DEFAULTS,
        layer_types=layer_types,
        sliding_window=window,
        qkv_bias=True,
    )


class Qwen2Model(DecoderModel):
    """``transformers.Qwen2Model``: ``embed_tokens``, ``layers``, ``norm``."""

    model_type = "qwen2"
    read_config = staticmethod(qwen2_config)


class Qwen2ForCausalLM(DecoderForCausalLM):
    """``transformers.Qwen2ForCausalLM``: :class:`Qwen2Model` plus ``lm_head``."""

    model_type = "qwen2"
    base_class = Qwen2Model
