"""The decoder-only transformer that the LLM twins share: Llama, Mistral, Qwen2, Qwen3, Gemma 3.

One implementation, written after ``transformers`` 5.24 (``models/llama/modeling_llama.py``,
``mistral``, ``qwen2``, ``qwen3``, ``gemma3`` and ``modeling_rope_utils.py``/``masking_utils.py``),
with a :class:`DecoderConfig` that says where the families differ:

- **norms**: RMSNorm computed in float32 (Llama: ``w * normed.to(input dtype)``; Gemma:
  ``(normed * (1 + w)).to(input dtype)``, ``norm_plus_one``); Gemma's pre- *and* post-norms around
  attention and MLP (``sandwich_norms``); per-head q/k RMSNorm (Qwen3, Gemma 3: ``qk_norm``);
- **projections**: q/k/v bias (Qwen2), o bias (Llama's ``attention_bias``), MLP bias (``mlp_bias``),
  ``head_dim`` independent of ``hidden_size / heads``, grouped-query attention;
- **attention**: scale ``head_dim ** -0.5`` or ``query_pre_attn_scalar ** -0.5`` (Gemma), logit
  softcapping, sliding-window layers (``layer_types``) with their own RoPE;
- **RoPE**: ``default``, ``linear``, ``dynamic`` (NTK, recomputed from the longest position as
  transformers' ``dynamic_rope_update`` does), ``llama3`` and ``yarn``, per layer type;
- **embeddings and head**: Gemma's embeddings times ``sqrt(hidden_size)`` (the scale rounded to
  the compute dtype first, as transformers does); tied or untied ``lm_head``; final logit softcapping.

Module names are transformers' (``model.embed_tokens``, ``model.layers.0.self_attn.q_proj``,
``model.layers.0.mlp.gate_proj``, ``model.norm``, ``lm_head``), so a ``state_dict`` converts key
for key and one list of glob patterns targets the same layers in both frameworks. RMSNorms are
``nnx.RMSNorm`` subclasses and the scaled embedding an ``nnx.Embed`` subclass: the bridge's
existing kinds (``rms_norm``: ``weight`` <-> ``scale``; ``embedding``) apply unchanged.

Masks follow ``masking_utils``: causal (and sliding: ``kv > q - window``) over token *indices*,
padding from ``attention_mask``; ``packed=True`` reads sequences packed in one row from
``position_ids`` that restart, as transformers does without a mask and without a cache. Without ``position_ids`` the forward uses
``arange(seq)`` as transformers' forward does (left padding shifts the positions);
:func:`generate` derives them from the mask as transformers' ``generate`` does.

This module does not import torch; a transformers config is read by attribute name, a
``config.json`` by key.

Example
-------
>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
...           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
>>> model = DecoderForCausalLM(llama_config(config), rngs=nnx.Rngs(0))
>>> model(jnp.array([[1, 2, 3]])).shape
(1, 3, 32)
>>> model.generate(jnp.array([[1, 2, 3]]), 4).shape
(1, 7)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinformat.adapters import adapter_of

from ._explicit import embed_ids
from ._speech import config_value
from .bert import ACTIVATIONS, Activation

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "Attention",
    "DecoderConfig",
    "DecoderForCausalLM",
    "DecoderLayer",
    "DecoderModel",
    "KVCache",
    "MLP",
    "RMSNorm",
    "Rope",
    "ScaledEmbed",
    "causal_mask",
    "generation_positions",
    "llama_config",
    "rope_inv_freq",
]

FULL = "full_attention"
SLIDING = "sliding_attention"
#: The RoPE types the twins compute (transformers' ``ROPE_INIT_FUNCTIONS`` keys, plus 'default').
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
#: ``None``: the attention written out in transformers' eager order of operations (the exact
#: reference); ``"xla"``/``"cudnn"``: ``jax.nn.dot_product_attention`` with that implementation
#: for the forward without a cache (``"cudnn"``: flash attention on NVIDIA GPUs, bf16/fp16; it
#: never materialises the ``seq x seq`` scores, which long training sequences need).
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class Rope:
    """One layer type's rotary embedding: ``rope_type`` and the parameters that type reads.

    >>> Rope("llama3", 500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    ...      original_max_position_embeddings=8192).rope_type
    'llama3'
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    attention_factor: float = 1.0  # yarn's scale of cos and sin (1 for the other types)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything the shared decoder needs, resolved (a family's reader fills it from a transformers
    config or ``config.json``: :func:`llama_config`, ``mistral.mistral_config`` ...).

    Hashable (tuples only), so a twin's config is static under ``jax.jit``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    attention_scale: float | None = None
    attention_dropout: float = 0.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    rope: tuple[tuple[str, Rope], ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{self.model_type} config: {name} must be a positive integer, got {value!r}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.model_type} config: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"{self.model_type} config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"{self.model_type} config: activation {self.hidden_act!r} is not supported; expected one "
                f"of {sorted(ACTIVATIONS)}"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"{self.model_type} config: layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        ropes = dict(self.rope)
        for i, layer_type in enumerate(self.layer_types):
            if layer_type not in (FULL, SLIDING):
                raise ValueError(
                    f"{self.model_type} config: layer_types[{i}] is {layer_type!r}; the twin computes "
                    f"{FULL!r} and {SLIDING!r} layers"
                )
            if layer_type == SLIDING and self.sliding_window is None:
                raise ValueError(
                    f"{self.model_type} config: layer {i} is a {SLIDING!r} layer but sliding_window is None "
                    "(transformers refuses it too); set sliding_window or make the layer full_attention"
                )
            if layer_type not in ropes:
                raise ValueError(f"{self.model_type} config: no RoPE parameters for {layer_type!r} layers")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"{self.model_type} config: sliding_window must be >= 1, got {self.sliding_window}"
            )

    @property
    def scaling(self) -> float:
        """The factor on ``q . k``: ``attention_scale`` when the family sets one, else ``head_dim ** -0.5``."""
        return self.head_dim**-0.5 if self.attention_scale is None else self.attention_scale

    def rope_of(self, layer_type: str) -> Rope:
        """The :class:`Rope` of ``layer_type`` layers."""
        return dict(self.rope)[layer_type]


def _read(config: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: value}`` for every name of ``defaults``, from ``config`` (object or dict) or the default."""
    return {name: config_value(config, name, default) for name, default in defaults.items()}


def _eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def read_rope(
    params: Mapping[str, Any] | None, *, theta: float, max_position_embeddings: int, where: str
) -> Rope:
    """A :class:`Rope` from one (flat) ``rope_parameters``/``rope_scaling`` dict, as transformers'
    ``standardize_rope_params`` reads it: ``type`` is the older spelling of ``rope_type``; a
    missing ``rope_theta`` is ``theta``; ``llama3``'s ``original_max_position_embeddings``
    defaults to ``max_position_embeddings``.

    >>> rope = read_rope({"type": "linear", "factor": 2.0}, theta=1e4, max_position_embeddings=64, where="x")
    >>> rope.rope_type, rope.theta, rope.factor
    ('linear', 10000.0, 2.0)
    >>> read_rope({"rope_type": "yarn", "factor": 4.0}, theta=1e4, max_position_embeddings=64,
    ...           where="x").original_max_position_embeddings
    64
    """
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"{where}: rope_type {rope_type!r} is not supported by the twin; it computes {list(ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise ValueError(
            f"{where}: partial_rotary_factor={partial!r} is not supported (transformers' Llama-family "
            "attention rotates the whole head); remove it from rope_parameters"
        )
    given = params.get("rope_theta")
    theta = float(given) if given is not None else theta
    original = params.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn"):  # standardize_rope_params' default
        original = int(original if original is not None else max_position_embeddings)
    if rope_type == "yarn" and params.get("factor") is None and original is not None:
        params["factor"] = max_position_embeddings / original
    if rope_type != "default" and "factor" not in params:
        raise ValueError(f"{where}: rope_type {rope_type!r} needs a 'factor' in rope_parameters")
    factor = float(params.get("factor", 1.0))
    if rope_type == "llama3":
        missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in params]
        if missing:
            raise ValueError(f"{where}: rope_type 'llama3' needs {missing} in rope_parameters")
    return Rope(
        rope_type,
        theta,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        attention_factor=_yarn_attention_factor(params, factor) if rope_type == "yarn" else 1.0,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
    )


def _yarn_attention_factor(params: Mapping[str, Any], factor: float) -> float:
    """YaRN's ``attention_factor`` as ``_compute_yarn_parameters`` infers it when not given."""
    given = params.get("attention_factor")
    if given is not None:
        return float(given)

    def get_mscale(scale: float, mscale: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


def flat_rope_parameters(config: Any, fields: Mapping[str, Any]) -> dict[str, Any] | None:
    """The one ``rope_parameters`` dict of a Llama-style config: transformers 5 spells it
    ``rope_parameters`` (with ``rope_theta`` inside), older configs ``rope_scaling`` beside a
    top-level ``rope_theta`` (``rope_scaling`` wins where both are set, as in
    ``convert_rope_params_to_dict``)."""
    scaling = config_value(config, "rope_scaling", None)
    params = scaling or config_value(config, "rope_parameters", None)
    return dict(params) if params else None


#: transformers' LlamaConfig defaults (the fields the twin reads).
LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    head_dim=None,
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    attention_dropout=0.0,
    rope_theta=10000.0,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
)


def llama_style_config(
    config: Any,
    *,
    model_type: str,
    defaults: Mapping[str, Any],
    layer_types: Sequence[str] | None = None,
    sliding_window: int | None = None,
    **options: Any,
) -> DecoderConfig:
    """A :class:`DecoderConfig` for a family with one global RoPE (Llama, Mistral, Qwen2, Qwen3):
    the fields of ``defaults`` read from ``config``, plus the family's ``options``."""
    f = _read(config, defaults)
    heads = f["num_attention_heads"]
    head_dim = f["head_dim"] or (f["hidden_size"] // heads if isinstance(heads, int) and heads else 0)
    layers = f["num_hidden_layers"]
    layer_types = tuple(layer_types) if layer_types is not None else (FULL,) * layers
    rope = read_rope(
        flat_rope_parameters(config, f),
        theta=float(f["rope_theta"] if f["rope_theta"] is not None else 10000.0),
        max_position_embeddings=f["max_position_embeddings"],
        where=f"{model_type} config",
    )
    return DecoderConfig(
        model_type=model_type,
        vocab_size=f["vocab_size"],
        hidden_size=f["hidden_size"],
        intermediate_size=f["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=f["num_key_value_heads"] or heads,
        head_dim=head_dim,
        hidden_act=f["hidden_act"],
        max_position_embeddings=f["max_position_embeddings"],
        rms_norm_eps=float(f["rms_norm_eps"]),
        tie_word_embeddings=bool(f["tie_word_embeddings"]),
        attention_dropout=float(f["attention_dropout"] or 0.0),
        layer_types=layer_types,
        sliding_window=sliding_window,
        rope=tuple((t, rope) for t in sorted(set(layer_types))),
        pad_token_id=f["pad_token_id"],
        bos_token_id=f["bos_token_id"],
        eos_token_id=_eos(f["eos_token_id"]),
        **options,
    )


def llama_config(config: Any) -> DecoderConfig:
    """Read a ``transformers.LlamaConfig`` (Llama 2, 3, 3.1-3.3) or its ``config.json`` dict.

    ``attention_bias`` puts a bias on q, k, v *and* o; ``mlp_bias`` on the three MLP projections;
    ``head_dim`` may differ from ``hidden_size / num_attention_heads``. ``pretraining_tp`` is
    ignored, as transformers 5 ignores it.

    >>> llama_config({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
    ...               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    ...                                "high_freq_factor": 4.0}, "rope_theta": 500000.0}).rope_of("full_attention").theta
    500000.0
    """
    if isinstance(config, DecoderConfig):
        return config
    bias = bool(config_value(config, "attention_bias", False))
    return llama_style_config(
        config,
        model_type="llama",
        defaults=LLAMA_DEFAULTS,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(config_value(config, "mlp_bias", False)),
    )


# ---------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nnx.RMSNorm):
    """transformers' RMSNorm: statistics in float32, ``scale`` is PyTorch's ``weight``.

    Llama style (``plus_one=False``): ``scale * (x32 * rsqrt(mean(x32**2) + eps)).astype(x.dtype)``.
    Gemma style (``plus_one=True``, ``scale`` starts at 0): ``(normed32 * (1 + scale32)).astype(x.dtype)``.

    Example
    -------
    >>> norm = RMSNorm(4, epsilon=1e-6, rngs=nnx.Rngs(0))
    >>> [round(v, 4) for v in norm(jnp.array([1.0, -1.0, 1.0, -1.0])).tolist()]
    [1.0, -1.0, 1.0, -1.0]
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float,
        plus_one: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        init = nnx.initializers.zeros if plus_one else nnx.initializers.ones
        super().__init__(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, scale_init=init, rngs=rngs
        )
        self.plus_one = plus_one

    def __call__(self, x: jax.Array, mask: Any = None) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        assert self.scale is not None  # built with use_scale=True: transformers' norms all have a weight
        scale = self.scale[...]
        if self.plus_one:
            out = (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        else:
            out = scale * normed.astype(x.dtype)  # torch's promotion: f32 weight * bf16 -> f32
        return out if self.dtype is None else out.astype(self.dtype)


class ScaledEmbed(nnx.Embed):
    """Gemma's embedding: the lookup times ``embed_scale`` (``sqrt(hidden_size)``), the scale first
    rounded to the output dtype as transformers does (55.4256 becomes 55.5 in bfloat16).

    >>> embed = ScaledEmbed(4, 2, embed_scale=2.0, embedding_init=nnx.initializers.ones, rngs=nnx.Rngs(0))
    >>> embed(jnp.array([1])).tolist()
    [[2.0, 2.0]]
    """

    def __init__(self, num_embeddings: int, features: int, *, embed_scale: float, **kwargs: Any) -> None:
        super().__init__(num_embeddings, features, **kwargs)
        self.embed_scale = float(embed_scale)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        out = super().__call__(inputs, out_sharding=out_sharding)
        return out * jnp.asarray(self.embed_scale, jnp.float32).astype(out.dtype)


class _Layers:
    """The keyword arguments every layer of one model shares (dtypes, precision, rngs)."""

    def __init__(
        self,
        config: DecoderConfig,
        dtype: Any,
        param_dtype: Any,
        precision: Any,
        rngs: nnx.Rngs,
        attention_implementation: str | None = None,
    ):
        if attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                f"{attention_implementation!r}"
            )
        self.config, self.dtype, self.param_dtype, self.precision, self.rngs = (
            config,
            dtype,
            param_dtype,
            precision,
            rngs,
        )
        self.attention_implementation = attention_implementation

    def linear(self, in_features: int, out_features: int, bias: bool) -> nnx.Linear:
        return nnx.Linear(
            in_features,
            out_features,
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nnx.initializers.normal(0.02),
            rngs=self.rngs,
        )

    def norm(self, features: int) -> RMSNorm:
        return RMSNorm(
            features,
            epsilon=self.config.rms_norm_eps,
            plus_one=self.config.norm_plus_one,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """One attention layer's key/value cache: ``keys``/``values`` ``(batch, slots, kv_heads, head_dim)``
    and ``index`` ``(slots,)``, the token index each slot holds (-1: empty).

    A full-attention layer has a slot per token; a sliding-window layer a ring of ``window`` slots
    (token ``i`` in slot ``i % window``), so its memory stays the window's. Nothing here is
    specific to self-attention: an encoder-decoder's cross-attention would fill one once.
    """

    keys: jax.Array
    values: jax.Array
    index: jax.Array

    def write(self, keys: jax.Array, values: jax.Array, position: jax.Array) -> KVCache:
        """The cache with one step's ``keys``/``values`` ``(batch, 1, kv_heads, head_dim)`` written
        for token index ``position`` (a scalar)."""
        slot = position % self.index.shape[0]
        return KVCache(
            jax.lax.dynamic_update_slice_in_dim(self.keys, keys.astype(self.keys.dtype), slot, axis=1),
            jax.lax.dynamic_update_slice_in_dim(self.values, values.astype(self.values.dtype), slot, axis=1),
            self.index.at[slot].set(position),
        )


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def rotate_half(x: jax.Array) -> jax.Array:
    """``cat(-x2, x1)`` of the two halves of the last axis (transformers' ``rotate_half``)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
    (and ``q_norm``/``k_norm`` per head where the family has them).

    ``x`` is ``(batch, seq, hidden)``; ``cos``/``sin`` ``(batch, seq, head_dim)``; ``mask`` the
    additive ``(batch, 1, seq, keys)`` mask. With ``cache`` (decoding one step), the step's key and
    value are written at token index ``position`` and the query attends to the whole cache.
    Returns the output and the keys/values (the step's own, or the updated cache).
    """

    def __init__(self, layers: _Layers, layer_idx: int) -> None:
        config = layers.config
        self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scaling = config.scaling
        self.softcap = config.attn_logit_softcapping
        self.precision = layers.precision
        self.layer_type = config.layer_types[layer_idx]
        self.sliding_window = config.sliding_window if self.layer_type == SLIDING else None
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = layers.linear(config.hidden_size, q_out, config.qkv_bias)
        self.k_proj = layers.linear(config.hidden_size, kv_out, config.qkv_bias)
        self.v_proj = layers.linear(config.hidden_size, kv_out, config.qkv_bias)
        self.o_proj = layers.linear(q_out, config.hidden_size, config.o_bias)
        if config.qk_norm:
            self.q_norm = layers.norm(self.head_dim)
            self.k_norm = layers.norm(self.head_dim)
        self.qk_norm = config.qk_norm
        self.dropout = config.attention_dropout
        self.deterministic = False
        self.rngs = layers.rngs["dropout"].fork()
        self.implementation = layers.attention_implementation

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
        position: jax.Array | None = None,
        causal_only: bool = False,
    ) -> tuple[jax.Array, KVCache | tuple[jax.Array, jax.Array]]:
        batch, seq, _ = x.shape
        q = self.q_proj(x).reshape(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        kv: KVCache | tuple[jax.Array, jax.Array]
        if cache is not None:
            if position is None:
                raise ValueError("decoding with a cache needs the token index (position) to write at")
            kv = cache.write(k, v, position)
            keys, values = kv.keys, kv.values
        else:
            keys, values, kv = k, v, (k, v)
        fused = cache is None and self.softcap is None and not (self.dropout > 0.0 and not self.deterministic)
        if self.implementation is not None and fused:
            return self.o_proj(self._fused(q, keys, values, mask, causal_only)), kv
        group = self.num_heads // self.num_kv_heads
        # (b, t, kv_head, group, d): query head h reads kv head h // group, as repeat_kv does.
        q = q.reshape(batch, seq, self.num_kv_heads, group, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(q.dtype), precision=self.precision)
        scores = _softcap(scores * self.scaling, self.softcap)
        scores = scores + mask[:, :, None].astype(scores.dtype)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        if self.dropout > 0.0 and not self.deterministic:
            weights = nnx.Dropout(self.dropout, deterministic=False)(weights, rngs=self.rngs)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, values.astype(q.dtype), precision=self.precision)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim)), kv

    def _fused(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, causal_only: bool
    ) -> jax.Array:
        """``jax.nn.dot_product_attention``: causal (and windowed) by its own flags when nothing
        else is masked, else with the additive mask as its bias."""
        batch, seq = q.shape[:2]
        window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
        try:
            out = jax.nn.dot_product_attention(
                q,
                k.astype(q.dtype),
                v.astype(q.dtype),
                bias=None if causal_only else mask.astype(q.dtype),
                scale=self.scaling,
                is_causal=causal_only,
                local_window_size=window if causal_only else None,
                implementation=self.implementation,  # type: ignore[arg-type]  # one of ATTENTION_IMPLEMENTATIONS
            )
        except (NotImplementedError, RuntimeError, ValueError) as exc:  # cuDNN: absent, or this shape/dtype
            raise ValueError(
                f"attention_implementation={self.implementation!r} cannot run this attention "
                f"({self.num_heads} heads of {self.head_dim} over {seq} tokens, {q.dtype}): {exc}. Build "
                "the model with attention_implementation=None (the written-out attention) for these inputs"
            ) from exc
        return out.reshape(batch, seq, self.num_heads * self.head_dim)


class MLP(nnx.Module):
    """The gated feed-forward block: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

    ``remat`` (off by default; :meth:`DecoderModel.set_mlp_remat`): under autodiff, the block is
    rematerialised with ``jax.checkpoint_policies.dots_saveable``: the GEMMs' outputs are kept
    for the backward, the elementwise results (``act(gate) * up``, the down projection's input)
    are recomputed inside their consumers. A frozen model keeps nothing more either way; a LoRA
    down projection's factor gradient reads its input, which the default keeps (the ~1B Llama of
    ``benchmarks/bench_llm.py``: 128 MiB a layer)."""

    def __init__(self, layers: _Layers) -> None:
        config = layers.config
        self.gate_proj = layers.linear(config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.up_proj = layers.linear(config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.down_proj = layers.linear(config.intermediate_size, config.hidden_size, config.mlp_bias)
        self.act_fn = Activation(config.hidden_act)
        self.remat = False

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.remat:
            return nnx.remat(_mlp, policy=jax.checkpoint_policies.dots_saveable)(self, x)
        return _mlp(self, x)


def _mlp(mlp: MLP, x: jax.Array) -> jax.Array:
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


class DecoderLayer(nnx.Module):
    """One pre-norm block: ``self_attn`` and ``mlp`` with their residuals (Gemma: each also
    post-normed, ``pre_feedforward_layernorm``/``post_feedforward_layernorm``)."""

    def __init__(self, layers: _Layers, layer_idx: int) -> None:
        config = layers.config
        self.self_attn = Attention(layers, layer_idx)
        self.mlp = MLP(layers)
        self.input_layernorm = layers.norm(config.hidden_size)
        self.post_attention_layernorm = layers.norm(config.hidden_size)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = layers.norm(config.hidden_size)
            self.post_feedforward_layernorm = layers.norm(config.hidden_size)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
        position: jax.Array | None = None,
        causal_only: bool = False,
    ) -> tuple[jax.Array, Any]:
        attended, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, position, causal_only)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attended)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), kv
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), kv


# ---------------------------------------------------------------------------------------------
# Positions, RoPE, masks


def rope_inv_freq(rope: Rope, dim: int, max_position_embeddings: int, seq_len: Any = None) -> Any:
    """The inverse frequencies ``(dim // 2,)`` float32 of ``rope``, as transformers computes them.

    ``dynamic`` depends on ``seq_len`` (``max(position_ids) + 1``, a traced scalar allowed): the
    NTK-scaled base when it exceeds ``max_position_embeddings``, the plain frequencies otherwise.

    >>> rope_inv_freq(Rope(), 4, 16).tolist()
    [1.0, 0.009999999776482582]
    """
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(rope, inv_freq)
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, dim)
    if rope.rope_type == "dynamic" and seq_len is not None:
        length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(max_position_embeddings))
        base = jnp.float32(rope.theta) * (
            (rope.factor * length / max_position_embeddings) - (rope.factor - 1)
        ) ** jnp.float32(dim / (dim - 2))
        scaled = 1.0 / (base ** jnp.asarray(exponents))
        return jnp.where(jnp.asarray(seq_len) > max_position_embeddings, scaled, jnp.asarray(inv_freq))
    return inv_freq


def _llama3_inv_freq(rope: Rope, inv_freq: np.ndarray) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling (``_compute_llama3_parameters``), in float32."""
    f32 = np.float32
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old = rope.original_max_position_embeddings
    assert old is not None  # read_rope fills it for llama3
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = (f32(2 * math.pi) / inv_freq).astype(f32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / f32(factor), inv_freq).astype(f32)
    smooth = ((f32(old) / wavelen - f32(low)) / f32(high - low)).astype(f32)
    smoothed = ((1 - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def _yarn_inv_freq(rope: Rope, dim: int) -> np.ndarray:
    """YaRN's blend of interpolated and extrapolated frequencies (``_compute_yarn_parameters``)."""
    f32, base, original = np.float32, rope.theta, rope.original_max_position_embeddings
    assert original is not None  # read_rope fills it for yarn

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = (f32(base) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim))).astype(f32)
    extrapolation = (f32(1.0) / pos_freqs).astype(f32)
    interpolation = (f32(1.0) / (f32(rope.factor) * pos_freqs)).astype(f32)
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    keep = (1 - ramp).astype(f32)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(f32)


def rope_cos_sin(
    rope: Rope, dim: int, max_position_embeddings: int, positions: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """``cos``, ``sin`` ``(batch, seq, dim)`` of integer ``positions``, computed in float32 and cast
    to ``dtype`` (the hidden states' dtype), as transformers' rotary embedding returns them."""
    seq_len = jnp.max(positions) + 1 if rope.rope_type == "dynamic" else None
    inv_freq = jnp.asarray(rope_inv_freq(rope, dim, max_position_embeddings, seq_len), jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if rope.attention_factor != 1.0:  # yarn scales both (transformers' attention_scaling)
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def causal_mask(
    q_pos: jax.Array,
    kv_pos: jax.Array,
    kv_valid: jax.Array,
    window: int | None,
    dtype: Any,
    same_segment: jax.Array | None = None,
) -> jax.Array:
    """The additive mask ``(batch, 1, queries, keys)``: 0 where a query sees a key, the dtype's
    minimum elsewhere (transformers' eager mask).

    A query at ``q_pos`` ``(batch, queries)`` sees a key at ``kv_pos`` ``(batch, keys)`` when
    ``kv_pos <= q_pos``, ``kv_pos > q_pos - window`` for a sliding layer, ``kv_valid`` (not
    padding, not an empty cache slot) and, for packed sequences, ``same_segment``.

    >>> m = causal_mask(jnp.arange(3)[None], jnp.arange(3)[None], jnp.ones((1, 3), bool), 2, jnp.float32)
    >>> (m[0, 0] == 0).astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    q, k = q_pos[:, :, None], kv_pos[:, None, :]
    allowed = (k <= q) & kv_valid[:, None, :]
    if window is not None:
        allowed &= k > q - window
    if same_segment is not None:
        allowed &= same_segment
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)[:, None]


def generation_positions(attention_mask: jax.Array) -> jax.Array:
    """Position ids from a (left-padded) mask, as transformers' ``generate`` derives them:
    ``cumsum(mask) - 1``, 0 on padding.

    >>> generation_positions(jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist()
    [[0, 0, 0, 1], [0, 1, 2, 3]]
    """
    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.where(mask == 0, 0, jnp.cumsum(mask, axis=-1) - 1)


def _packed_segments(position_ids: jax.Array) -> jax.Array:
    """transformers' ``find_packed_sequence_indices``: a new sequence starts where the position
    does not grow by one."""
    first = position_ids[:, :1] - 1
    diff = jnp.diff(position_ids, prepend=first, axis=-1)
    return jnp.cumsum(diff != 1, axis=-1)


# ---------------------------------------------------------------------------------------------
# Models


class DecoderModel(nnx.Module):
    """The decoder without its head (transformers' ``LlamaModel``, ``Qwen2Model``, ``Gemma3TextModel``...):
    ``embed_tokens``, ``layers``, ``norm``. Called on ``input_ids`` ``(batch, seq)`` it returns the
    last hidden state ``(batch, seq, hidden_size)``.

    A family subclass sets ``read_config`` (its config reader) and ``model_type``.
    """

    model_type = "llama"
    base_model_prefix = "model"
    read_config = staticmethod(llama_config)

    def __init__(
        self,
        config: Any,
        *,
        dtype: Any = None,
        param_dtype: Any = None,
        precision: Any = None,
        attention_implementation: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.config = type(self).read_config(config)
        config = self.config
        param_dtype = jnp.float32 if param_dtype is None else param_dtype  # None: Flax's default
        layers = _Layers(config, dtype, param_dtype, precision, rngs, attention_implementation)
        embed_kwargs = dict(
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        if config.scale_embeddings:
            self.embed_tokens: nnx.Embed = ScaledEmbed(
                config.vocab_size, config.hidden_size, embed_scale=config.hidden_size**0.5, **embed_kwargs
            )
        else:
            self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, **embed_kwargs)
        self.layers = nnx.List([DecoderLayer(layers, i) for i in range(config.num_hidden_layers)])
        self.norm = layers.norm(config.hidden_size)

    def set_mlp_remat(self, enabled: bool = True) -> None:
        """Rematerialise every layer's MLP under autodiff (see :class:`MLP`): the same values, less
        memory for a LoRA step on the MLP. A graph setting: call it before ``nnx.split`` (or
        before wrapping the model), it survives ``split``/``merge``.

        With LoRA r=16 on all linear layers and ``flax_impl.fused.stacked()``, XLA's program for
        the ~1B Llama of ``benchmarks/bench_llm.py`` compiled for a simulated H100 keeps 470 MiB
        of temporaries a layer with it, 598 without (the frozen floor: 401), and moves 2% fewer
        bytes. On the default LoRA path it saves nothing (723 MiB either way): there autodiff keeps
        the low-rank outputs, which are GEMM outputs.

        Example
        -------
        >>> from flax_impl.models.llama import LlamaForCausalLM
        >>> config = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        ...               num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        >>> model.set_mlp_remat()
        >>> model.model.layers[0].mlp.remat
        True
        """
        for layer in self.layers:
            layer.mlp.remat = bool(enabled)

    def __call__(
        self,
        input_ids: jax.Array | None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        packed: bool = False,
        inputs_embeds: jax.Array | None = None,
    ) -> jax.Array:
        """The last hidden state ``(batch, seq, hidden_size)``; see :meth:`DecoderForCausalLM.__call__`."""
        return self.prefill(
            input_ids, attention_mask, position_ids, packed=packed, inputs_embeds=inputs_embeds
        )[0]

    def prefill(
        self,
        input_ids: jax.Array | None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        packed: bool = False,
        inputs_embeds: jax.Array | None = None,
    ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        """The last hidden state and every layer's keys/values ``(batch, seq, kv_heads, head_dim)``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds (as transformers)")
        if inputs_embeds is None:
            hidden = embed_ids(self.embed_tokens, _check_ids(input_ids))
        else:
            hidden = jnp.asarray(inputs_embeds)
        batch, seq = hidden.shape[:2]
        index = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        same_segment = None
        if attention_mask is None:
            valid = jnp.ones((batch, seq), bool)
        else:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != (batch, seq):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected the shape of "
                    f"input_ids {(batch, seq)} (a 2-D mask of 1 for tokens, 0 for padding)"
                )
            valid = attention_mask.astype(bool)
        if position_ids is None:
            positions = index
        else:
            positions = jnp.broadcast_to(jnp.asarray(position_ids), (batch, seq))
            if packed:
                if attention_mask is not None:
                    raise ValueError(
                        "packed=True reads the sequences from position_ids; pass no attention_mask "
                        "(transformers detects packed sequences only without one)"
                    )
                # As transformers without a mask and without a cache: the mask compares
                # positions, and sequences do not see each other.
                segments = _packed_segments(positions)
                same_segment = segments[:, :, None] == segments[:, None, :]
        q_pos = kv_pos = positions if same_segment is not None else index
        masks, ropes = {}, {}
        for layer_type in set(self.config.layer_types):
            window = self.config.sliding_window if layer_type == SLIDING else None
            masks[layer_type] = causal_mask(q_pos, kv_pos, valid, window, hidden.dtype, same_segment)
            ropes[layer_type] = self._rope(layer_type, positions, hidden.dtype)
        kvs = []
        # Nothing but causality (and windows) to mask: a fused kernel may use its own flags.
        causal_only = attention_mask is None and same_segment is None
        for layer in self.layers:
            layer_type = layer.self_attn.layer_type
            hidden, kv = layer(hidden, *ropes[layer_type], masks[layer_type], causal_only=causal_only)
            kvs.append(kv)
        return self.norm(hidden), kvs

    def decode_step(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        index: jax.Array,
        valid: jax.Array,
        caches: list[KVCache],
    ) -> tuple[jax.Array, list[KVCache]]:
        """One decoding step: ``input_ids`` ``(batch, 1)`` at ``positions`` ``(batch, 1)`` and token
        index ``index`` (a scalar); ``valid`` ``(batch, total)`` says which token indices are not
        padding. Returns the hidden state ``(batch, 1, hidden)`` and the updated caches."""
        hidden = embed_ids(self.embed_tokens, input_ids)
        ropes = {t: self._rope(t, positions, hidden.dtype) for t in set(self.config.layer_types)}
        new_caches = []
        for layer, cache in zip(self.layers, caches, strict=True):
            layer_type = layer.self_attn.layer_type
            window = self.config.sliding_window if layer_type == SLIDING else None
            slots = cache.index.at[index % cache.index.shape[0]].set(index)
            batch = input_ids.shape[0]
            slot_valid = (slots >= 0)[None, :] & jnp.take(valid, jnp.maximum(slots, 0), axis=1)
            mask = causal_mask(
                jnp.full((batch, 1), index),
                jnp.broadcast_to(slots, (batch, slots.shape[0])),
                slot_valid,
                window,
                hidden.dtype,
            )
            hidden, cache = layer(hidden, *ropes[layer_type], mask, cache, index)
            new_caches.append(cache)
        return self.norm(hidden), new_caches

    def _rope(self, layer_type: str, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
        config = self.config
        return rope_cos_sin(
            config.rope_of(layer_type), config.head_dim, config.max_position_embeddings, positions, dtype
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: Any = None,
        mesh: Any = None,
        rules: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Read a transformers ``save_pretrained`` directory without torch; eval mode. A
        ``...ForCausalLM`` directory is read under ``model.``, its ``lm_head`` left out and noted.
        See :func:`flax_impl.models.pretrained.from_pretrained` for the other keywords."""
        return _from_pretrained(cls, path, dtype=dtype, mesh=mesh, rules=rules, **kwargs)


class DecoderForCausalLM(nnx.Module):
    """A decoder with its language-model head (transformers' ``LlamaForCausalLM`` ...): ``model``
    (a :class:`DecoderModel`) and ``lm_head`` (absent when the embeddings are tied: the logits then
    use ``model.embed_tokens``' table, and :attr:`tied_weights` names the key the twin does not store).

    Arguments
    ---------
    config : a transformers config of the family, its ``config.json`` dict, or a :class:`DecoderConfig`
    dtype, param_dtype, precision
        Computation dtype, parameter dtype and matmul precision of every layer (Flax's meaning).
    attention_implementation : None, "xla" or "cudnn"
        ``None`` writes the attention out as transformers' eager attention does (the reference);
        ``"cudnn"`` is cuDNN's flash attention (NVIDIA GPU, bf16) for the forward without a cache:
        the fast choice for training on long sequences. ``generate``'s steps always use the cache.
    rngs : nnx.Rngs
        Parameter initialisation (and attention dropout, where the config sets it).

    Returns
    -------
    ``model(input_ids, attention_mask=None, position_ids=None)`` returns the logits
    ``(batch, seq, vocab_size)`` in float32 (``logits_dtype`` to choose).

    Example
    -------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> config = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    ...           "num_attention_heads": 2, "tie_word_embeddings": True}
    >>> model = DecoderForCausalLM(config, rngs=nnx.Rngs(0))
    >>> model.tied_weights, hasattr(model, "lm_head")
    ({'lm_head.weight': 'model.embed_tokens.weight'}, False)
    """

    model_type = "llama"
    base_model_prefix = "model"
    base_class: type[DecoderModel] = DecoderModel

    def __init__(
        self,
        config: Any,
        *,
        dtype: Any = None,
        param_dtype: Any = None,
        precision: Any = None,
        attention_implementation: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        param_dtype = jnp.float32 if param_dtype is None else param_dtype  # None: Flax's default
        self.model = type(self).base_class(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            attention_implementation=attention_implementation,
            rngs=rngs,
        )
        self.config = self.model.config
        self.precision = precision
        if not self.config.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                self.config.hidden_size,
                self.config.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                precision=precision,
                kernel_init=nnx.initializers.normal(0.02),
                rngs=rngs,
            )

    def set_mlp_remat(self, enabled: bool = True) -> None:
        """:meth:`DecoderModel.set_mlp_remat` on ``self.model``.

        Example
        -------
        >>> from flax_impl.models.qwen3 import Qwen3ForCausalLM
        >>> config = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        ...               num_attention_heads=2, num_key_value_heads=1, head_dim=4)
        >>> model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))
        >>> model.set_mlp_remat()
        >>> model.model.layers[0].mlp.remat
        True
        """
        self.model.set_mlp_remat(enabled)

    @property
    def tied_weights(self) -> dict[str, str]:
        """``{torch key the twin does not store: the key it shares}``: ``{"lm_head.weight":
        "model.embed_tokens.weight"}`` with tied embeddings, else ``{}``."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def __call__(
        self,
        input_ids: jax.Array | None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        packed: bool = False,
        inputs_embeds: jax.Array | None = None,
        logits_dtype: Any = jnp.float32,
    ) -> jax.Array:
        """Logits ``(batch, seq, vocab_size)`` of ``input_ids`` ``(batch, seq)``.

        ``attention_mask`` ``(batch, seq)`` is 1 for tokens, 0 for padding (left or right).
        ``position_ids`` default to ``arange(seq)`` as in transformers' forward (left padding then
        shifts the real tokens' positions; pass :func:`generation_positions` of the mask to number
        each row from its first token). ``packed=True`` (with ``position_ids``, without a mask)
        makes every restart of the positions a new sequence that does not see the previous ones,
        as transformers does when called with ``use_cache=False`` and no mask (with its default
        ``use_cache=True`` it does not: neither does the twin by default). ``inputs_embeds``
        ``(batch, seq, hidden_size)`` replaces ``input_ids`` (pass ``None`` for them), as in transformers.
        """
        hidden = self.model(
            input_ids, attention_mask, position_ids, packed=packed, inputs_embeds=inputs_embeds
        )
        return self.logits(hidden).astype(logits_dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The head on hidden states: ``lm_head``, or the tied embedding's transpose; softcapped
        where the config says (in the compute dtype, as transformers does)."""
        if self.config.tie_word_embeddings:
            table = _embedding(self.model.embed_tokens).embedding[...]
            logits = jnp.einsum("...h,vh->...v", hidden, table.astype(hidden.dtype), precision=self.precision)
        else:
            logits = self.lm_head(hidden)
        return _softcap(logits, self.config.final_logit_softcapping)

    def generate(
        self,
        input_ids: jax.Array,
        max_new_tokens: int,
        *,
        attention_mask: jax.Array | None = None,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> jax.Array:
        """Greedy decoding with a key/value cache, the loop compiled (``jax.lax.while_loop``).

        Returns ``(batch, seq + max_new_tokens)`` int32: the prompt, then the new tokens. A row
        stops at an ``eos_token_id`` (default: the config's) and is padded with the first eos id
        from then on; the loop ends early when every row has stopped (the rest is eos). Positions
        come from ``attention_mask`` (left padding) as transformers' ``generate`` derives them,
        so the tokens are those of transformers' greedy ``generate`` on the same weights.
        """
        input_ids = _check_ids(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        eos = self.config.eos_token_id if eos_token_id is None else _eos(eos_token_id)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)}"
            )
        return _generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos=tuple(eos))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: Any = None,
        mesh: Any = None,
        rules: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Read a transformers ``save_pretrained`` directory without torch; eval mode. See
        :func:`flax_impl.models.pretrained.from_pretrained` for the other keywords."""
        return _from_pretrained(cls, path, dtype=dtype, mesh=mesh, rules=rules, **kwargs)


def _embedding(module: Any) -> nnx.Embed:
    """The embedding layer itself, also when an adapter wraps it (the head ties to the base table)."""
    kind = adapter_of(module)
    return getattr(module, kind.wrapped) if kind is not None else module


def _check_ids(input_ids: Any) -> jax.Array:
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(
            f"input_ids must be integer token ids of shape (batch, seq), got {input_ids.dtype} "
            f"{tuple(input_ids.shape)}"
        )
    return input_ids


def _from_pretrained(cls: type, path: Any, *, dtype: Any, mesh: Any, rules: Any, **kwargs: Any) -> Any:
    from .pretrained import from_pretrained

    # mesh/rules are passed on only when given: pretrained.from_pretrained gains them separately.
    extra = {k: v for k, v in (("mesh", mesh), ("rules", rules)) if v is not None}
    return from_pretrained(cls, path, dtype=dtype, **extra, **kwargs)


# ---------------------------------------------------------------------------------------------
# Greedy decoding


def _empty_caches(
    model: DecoderForCausalLM, kvs: list[tuple[jax.Array, jax.Array]], total: int
) -> list[KVCache]:
    """Caches holding the prompt's keys/values: a slot per token for full-attention layers, a ring
    of ``sliding_window`` slots (the prompt's last tokens) for sliding layers."""
    config = model.config
    caches = []
    for layer, (k, v) in zip(model.model.layers, kvs, strict=True):
        batch, prompt, heads, dim = k.shape
        window = config.sliding_window if layer.self_attn.layer_type == SLIDING else None
        slots = total if window is None or window >= total else window
        # Static: which prompt token lands in which slot (the later token wins a shared slot).
        index = np.full((slots,), -1, np.int32)
        for i in range(prompt):
            index[i % slots] = i
        take = np.maximum(index, 0)
        keys = jnp.zeros((batch, slots, heads, dim), k.dtype).at[:, index >= 0].set(k[:, take[index >= 0]])
        values = jnp.zeros((batch, slots, heads, dim), v.dtype).at[:, index >= 0].set(v[:, take[index >= 0]])
        caches.append(KVCache(keys, values, jnp.asarray(index)))
    return caches


def _generate_loop(
    model: DecoderForCausalLM,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    max_new_tokens: int,
    eos: tuple[int, ...],
) -> jax.Array:
    batch, prompt = input_ids.shape
    total = prompt + max_new_tokens
    positions = generation_positions(attention_mask)
    hidden, kvs = model.model.prefill(input_ids, attention_mask, positions)
    caches = _empty_caches(model, kvs, total)
    valid = jnp.concatenate([attention_mask.astype(bool), jnp.ones((batch, max_new_tokens), bool)], axis=1)
    pad = eos[0] if eos else 0
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def pick(hidden: jax.Array) -> jax.Array:
        return jnp.argmax(model.logits(hidden[:, -1]).astype(jnp.float32), axis=-1).astype(jnp.int32)

    first = pick(hidden)
    done = jnp.isin(first, eos_ids)
    tokens = jnp.full((batch, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
    state = (1, first, positions[:, -1:] + 1, done, tokens, caches)

    def cond(state: Any) -> jax.Array:
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state: Any) -> Any:
        step, last, position, done, tokens, caches = state
        index = prompt + step - 1  # the token index of ``last`` in the sequence
        hidden, caches = model.model.decode_step(last[:, None], position, index, valid, caches)
        token = jnp.where(done, pad, pick(hidden))
        tokens = tokens.at[:, step].set(token)
        return step + 1, token, position + 1, done | jnp.isin(token, eos_ids), tokens, caches

    tokens = jax.lax.while_loop(cond, body, state)[4]
    return jnp.concatenate([input_ids.astype(jnp.int32), tokens], axis=1)


# Compiled once per (graph, shapes, max_new_tokens, eos): the prefill, the cache and the loop.
_generate: Any = nnx.jit(_generate_loop, static_argnames=("max_new_tokens", "eos"))
