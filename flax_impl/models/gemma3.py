"""Flax NNX twins of ``transformers.Gemma3TextModel`` and ``Gemma3ForCausalLM`` (Gemma 3's text model).

The shared decoder (:mod:`flax_impl.models.decoder`) with Gemma's options, after transformers
5.24's ``modeling_gemma3.py``: RMSNorm as ``normed * (1 + weight)`` in float32 (weights start at
zero); each block's attention and MLP both pre- and post-normed; per-head q/k norm; embeddings
times ``sqrt(hidden_size)`` rounded to the compute dtype; ``query_pre_attn_scalar ** -0.5`` as the
attention scale; GELU-tanh gating; local (``sliding_attention``, window ``sliding_window``) and
global layers from ``layer_types`` or the older ``sliding_window_pattern`` (every n-th layer
global), each type with its own RoPE (``rope_parameters`` nested by layer type, or the older
``rope_theta`` (global), ``rope_local_base_freq`` (local) and ``rope_scaling`` (global));
final logit softcapping where the config sets it. Embeddings are tied by default.

``attn_logit_softcapping`` is read and, as in transformers 5.24 (whose ``Gemma3Attention`` does not
pass it to the attention function, eager or SDPA), not applied: the twin computes what
transformers computes. (The released Gemma 3 configs set it to ``null``.)

Not computed (refused when the config asks): ``use_bidirectional_attention`` (EmbeddingGemma's
encoder mode).

**Multimodal checkpoints.** gemma-3-4b/12b/27b (``-pt``, ``-it``) are released as
``Gemma3ForConditionalGeneration`` (``config.json``: ``model_type`` ``gemma3``, a nested
``text_config`` and ``vision_config``). The twins are its *text* model: built from such a config
they read ``text_config`` (with the top level's ``tie_word_embeddings``, which ties transformers'
``lm_head``, and without ``final_logit_softcapping``, which that model does not apply: see
:func:`text_config`); ``from_pretrained`` reads the language model's tensors in either spelling of
:data:`MULTIMODAL_LAYOUTS` and leaves the SigLIP vision tower and the multi-modal projector out
(named in the loading report's notes: there is no image path here). On text-only ``input_ids``
the logits are those of ``Gemma3ForConditionalGeneration``. The model records
``peft_layout`` (the language model's names in transformers), so that a PEFT adapter trained on
the whole model's language layers loads into it and is written back in its own names (see
:mod:`flax_impl.pretrained`).

Example
-------
>>> from flax import nnx
>>> config = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
...           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
...           "sliding_window": 4, "sliding_window_pattern": 3}
>>> model = Gemma3ForCausalLM(config, rngs=nnx.Rngs(0))
>>> model.config.layer_types
('sliding_attention', 'sliding_attention', 'full_attention')
>>> [r.theta for _, r in model.config.rope]
[1000000.0, 10000.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._speech import config_value
from .decoder import FULL, SLIDING, DecoderConfig, DecoderForCausalLM, DecoderModel, read_rope
from .pretrained import CheckpointLayout

__all__ = ["MULTIMODAL_LAYOUTS", "Gemma3ForCausalLM", "Gemma3TextModel", "gemma3_config", "text_config"]

#: transformers' Gemma3TextConfig defaults (the fields the twin reads).
GEMMA3_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131_072,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=True,
    attention_bias=False,
    attention_dropout=0.0,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    layer_types=None,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
    use_bidirectional_attention=False,
)
_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}  # Gemma3TextConfig.default_theta


#: ``Gemma3ForConditionalGeneration``'s config (``Gemma3Config``).
MULTIMODAL_MODEL_TYPE = "gemma3"
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
#: The prefixes of what the text twin leaves out, in either spelling.
_VISION_PARTS = (
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "vision_tower.",
    "multi_modal_projector.",
)

#: Where ``Gemma3ForConditionalGeneration`` keeps :class:`Gemma3ForCausalLM`'s tensors. First,
#: transformers' module names since 4.52 (what PEFT's adapter keys say, and what files saved by
#: transformers 4.52 to 4.57 hold); then the original hub files' spelling, which transformers 5
#: also writes back on ``save_pretrained`` (its conversion mapping reversed).
MULTIMODAL_LAYOUTS: dict[str, CheckpointLayout] = {
    "modules": CheckpointLayout(
        MULTIMODAL_MODEL_TYPE,
        "Gemma3ForConditionalGeneration",
        "language model",
        (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
        _VISION_PARTS,
    ),
    "hub": CheckpointLayout(
        MULTIMODAL_MODEL_TYPE,
        "Gemma3ForConditionalGeneration",
        "language model",
        (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
        _VISION_PARTS,
    ),
}


def text_config(config: Any) -> Any:
    """The text model's config in a ``Gemma3Config`` (``model_type`` ``gemma3``, a
    ``Gemma3ForConditionalGeneration``'s, as object or ``config.json`` dict); any other config as it is.

    Its ``text_config``, with the top level's ``tie_word_embeddings`` (default true), which is
    what ties transformers' ``lm_head`` to the embeddings in the multimodal model; the top
    level's token ids where ``text_config`` has none (the hub files' ``eos_token_id`` ``[1, 106]``);
    and no ``final_logit_softcapping``: transformers 5.24's ``Gemma3ForConditionalGeneration``
    does not apply it (only ``Gemma3ForCausalLM`` does; the released configs set it to null).

    >>> text_config({"model_type": "gemma3", "eos_token_id": [1, 106], "text_config": {"hidden_size": 8}})
    {'hidden_size': 8, 'tie_word_embeddings': True, 'final_logit_softcapping': None, 'eos_token_id': [1, 106]}
    """
    if config_value(config, "model_type", None) != MULTIMODAL_MODEL_TYPE:
        return config
    text = config_value(config, "text_config", None)
    if text is None:
        text = {}  # as transformers' Gemma3Config: Gemma3TextConfig's defaults
    fields = dict(text) if isinstance(text, Mapping) else dict(vars(text))
    if config_value(text, "model_type", "gemma3_text") != "gemma3_text":
        raise ValueError(
            f"gemma3 config: text_config has model_type {config_value(text, 'model_type', None)!r}; the "
            "Gemma 3 twins read a 'gemma3_text' text model"
        )
    fields["tie_word_embeddings"] = config_value(config, "tie_word_embeddings", True)
    fields["final_logit_softcapping"] = None  # the multimodal model's logits are the head's, uncapped
    for name in _TOKEN_IDS:
        top = config_value(config, name, None)
        if config_value(text, name, None) is None and top is not None:
            fields[name] = top
    return fields


def gemma3_config(config: Any) -> DecoderConfig:
    """Read a ``transformers.Gemma3TextConfig`` or its ``config.json`` dict; a multimodal
    ``Gemma3Config`` (``model_type`` ``gemma3``) is read through its text model (:func:`text_config`)."""
    if isinstance(config, DecoderConfig):
        return config
    config = text_config(config)
    f = {name: config_value(config, name, default) for name, default in GEMMA3_DEFAULTS.items()}
    if f["use_bidirectional_attention"]:
        raise ValueError(
            "gemma3_text config: use_bidirectional_attention=True (EmbeddingGemma's encoder mode) is not "
            "supported by the causal-LM twin; set it to false"
        )
    layer_types = f["layer_types"]
    if layer_types is None:
        # Older configs: every pattern-th layer is global ("sliding_window_pattern", default 6).
        pattern = config_value(config, "sliding_window_pattern", None)
        pattern = pattern or config_value(config, "_sliding_window_pattern", 6)
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(f["num_hidden_layers"])]
    ropes = _ropes(config, f["max_position_embeddings"])
    bias = bool(f["attention_bias"])
    return DecoderConfig(
        model_type="gemma3_text",
        vocab_size=f["vocab_size"],
        hidden_size=f["hidden_size"],
        intermediate_size=f["intermediate_size"],
        num_hidden_layers=f["num_hidden_layers"],
        num_attention_heads=f["num_attention_heads"],
        num_key_value_heads=f["num_key_value_heads"],
        head_dim=f["head_dim"],
        hidden_act=f["hidden_activation"],
        max_position_embeddings=f["max_position_embeddings"],
        rms_norm_eps=float(f["rms_norm_eps"]),
        tie_word_embeddings=bool(f["tie_word_embeddings"]),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        norm_plus_one=True,
        sandwich_norms=True,
        scale_embeddings=True,
        attention_scale=float(f["query_pre_attn_scalar"]) ** -0.5,
        attention_dropout=float(f["attention_dropout"] or 0.0),
        # Not f["attn_logit_softcapping"]: transformers' Gemma 3 attention never applies it.
        attn_logit_softcapping=None,
        final_logit_softcapping=f["final_logit_softcapping"],
        layer_types=tuple(layer_types),
        sliding_window=f["sliding_window"],
        rope=tuple(sorted(ropes.items())),
        pad_token_id=f["pad_token_id"],
        bos_token_id=f["bos_token_id"],
        eos_token_id=_eos(f["eos_token_id"]),
    )


def _eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _ropes(config: Any, max_position_embeddings: int) -> dict[str, Any]:
    """Each layer type's RoPE, as ``Gemma3TextConfig.convert_rope_params_to_dict`` resolves it."""
    params = config_value(config, "rope_parameters", None)
    if params and not set(params) <= {FULL, SLIDING}:
        raise ValueError(
            "gemma3_text config: rope_parameters must be nested by layer type "
            f"({{'{FULL}': {{...}}, '{SLIDING}': {{...}}}}), got keys {sorted(params)}"
        )
    nested = {t: dict((params or {}).get(t) or {"rope_type": "default"}) for t in (FULL, SLIDING)}
    scaling = config_value(config, "rope_scaling", None)
    if scaling:
        nested[FULL].update(scaling)
    thetas = {
        FULL: config_value(config, "rope_theta", None),
        SLIDING: config_value(config, "rope_local_base_freq", None),
    }
    return {
        t: read_rope(
            nested[t],
            theta=float(thetas[t] if thetas[t] is not None else _THETA[t]),
            max_position_embeddings=max_position_embeddings,
            where=f"gemma3_text config ({t})",
        )
        for t in (FULL, SLIDING)
    }


def _without_head(layout: CheckpointLayout) -> CheckpointLayout:
    """``layout`` for the model without a head: the language model's decoder is its root."""
    decoder = next(prefix for prefix, twin in layout.renames if twin == "model.")
    return CheckpointLayout(
        layout.model_type, layout.model_class, layout.part, ((decoder, ""),), layout.other_parts
    )


class Gemma3TextModel(DecoderModel):
    """``transformers.Gemma3TextModel``: ``embed_tokens`` (scaled), ``layers``, ``norm``.

    Also the text model of a ``Gemma3ForConditionalGeneration`` (see the module's docstring):
    ``from_pretrained`` reads its decoder and leaves the head, vision tower and projector out."""

    model_type = "gemma3_text"
    read_config = staticmethod(gemma3_config)
    checkpoint_layouts = tuple(_without_head(layout) for layout in MULTIMODAL_LAYOUTS.values())
    #: The names PEFT gives this twin's layers, where they are not its own (set by from_pretrained).
    peft_layout: CheckpointLayout | None = None


class Gemma3ForCausalLM(DecoderForCausalLM):
    """``transformers.Gemma3ForCausalLM``: :class:`Gemma3TextModel` plus the (usually tied) head.

    Also the text model of a ``Gemma3ForConditionalGeneration`` (see the module's docstring):
    ``from_pretrained`` reads its language model and head, and leaves the vision tower and
    projector out; the logits on text-only ``input_ids`` are the multimodal model's."""

    model_type = "gemma3_text"
    base_class = Gemma3TextModel
    checkpoint_layouts = tuple(MULTIMODAL_LAYOUTS.values())
    #: The names PEFT gives this twin's layers, where they are not its own (set by from_pretrained).
    peft_layout: CheckpointLayout | None = None
