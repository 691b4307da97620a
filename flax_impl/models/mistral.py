"""Flax NNX twins of ``transformers.MistralModel`` and ``MistralForCausalLM``.

Llama's math (:mod:`flax_impl.models.decoder`) without any bias, with every layer a
sliding-window layer when ``sliding_window`` is set (Mistral 7B v0.1: 4096; later releases set
it to ``null``, full attention), as transformers 5.24's ``modeling_mistral.py`` does.

Example
-------
>>> from flax import nnx
>>> config = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
...           "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 3}
>>> MistralForCausalLM(config, rngs=nnx.Rngs(0)).config.layer_types
('sliding_attention', 'sliding_attention')
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

__all__ = ["MistralForCausalLM", "MistralModel", "mistral_config"]

#: transformers' MistralConfig defaults (the fields the twin reads).
MISTRAL_DEFAULTS = {
    **LLAMA_DEFAULTS,
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
}


def mistral_config(config: Any) -> DecoderConfig:
    """Read a ``transformers.MistralConfig`` or its ``config.json`` dict (``sliding_window``
    defaults to 4096, as transformers'; ``None`` makes every layer full attention)."""
    if isinstance(config, DecoderConfig):
        return config
    window = config_value(config, "sliding_window", 4096)
    layers = config_value(config, "num_hidden_layers", MISTRAL_DEFAULTS["num_hidden_layers"])
    return llama_style_config(
        config,
        model_type="mistral",
        defaults=MISTRAL_DEFAULTS,
        layer_types=(FULL if window is None else SLIDING,) * layers,
        sliding_window=window,
    )


class MistralModel(DecoderModel):
    """``transformers.MistralModel``: ``embed_tokens``, ``layers``, ``norm``."""

    model_type = "mistral"
    read_config = staticmethod(mistral_config)


class MistralForCausalLM(DecoderForCausalLM):
    """``transformers.MistralForCausalLM``: :class:`MistralModel` plus ``lm_head``."""

    model_type = "mistral"
    base_class = MistralModel
