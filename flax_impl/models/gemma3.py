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

from typing import Any

from ._speech import config_value
from .decoder import FULL, SLIDING, DecoderConfig, DecoderForCausalLM, DecoderModel, read_rope

__all__ = ["Gemma3ForCausalLM", "Gemma3TextModel", "gemma3_config"]

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


def gemma3_config(config: Any) -> DecoderConfig:
    """Read a ``transformers.Gemma3TextConfig`` or its ``config.json`` dict."""
    if isinstance(config, DecoderConfig):
        return config
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


class Gemma3TextModel(DecoderModel):
    """``transformers.Gemma3TextModel``: ``embed_tokens`` (scaled), ``layers``, ``norm``."""

    model_type = "gemma3_text"
    read_config = staticmethod(gemma3_config)


class Gemma3ForCausalLM(DecoderForCausalLM):
    """``transformers.Gemma3ForCausalLM``: :class:`Gemma3TextModel` plus the (usually tied) head."""

    model_type = "gemma3_text"
    base_class = Gemma3TextModel
