"""A Flax NNX twin of ``transformers.BertModel``: same module names, same math.

Every submodule sits at the dotted name PyTorch's ``named_modules()`` gives for Hugging Face's
``BertModel`` (``embeddings.word_embeddings``, ``encoder.layer.0.attention.self.query``,
``encoder.layer.0.attention.output.LayerNorm``, ``encoder.layer.0.intermediate.dense``,
``pooler.dense``, ...), so a torch ``state_dict`` maps onto it key for key with the layout rules of
``twinformat.kinds``, and one list of glob patterns selects the same layers in both models.

The layers are declared with PyTorch's semantics, which differ from Flax's defaults: LayerNorm
uses the config's ``layer_norm_eps`` and the two-pass variance (``use_fast_variance=False``),
``"gelu"`` is the exact erf form, and the attention mask is Hugging Face's additive mask
(``0`` where attended, the dtype's minimum where masked). Dropout behaves as in PyTorch:
active after construction, off after ``model.eval()``.

This module does not import torch; a Hugging Face ``BertConfig`` is read by attribute name.

Example
-------
>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2,
...                     num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
>>> model = BertModel(config, rngs=nnx.Rngs(0))
>>> model.eval()
>>> ids = jnp.array([[2, 7, 9, 0], [3, 4, 5, 6]])
>>> mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
>>> hidden = model(ids, attention_mask=mask)
>>> hidden.shape, model.pooler(hidden).shape
((2, 4, 8), (2, 8))
"""

from __future__ import annotations

import dataclasses
import os
import types
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ._explicit import embed_ids

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "BertAttention",
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertIntermediate",
    "BertLayer",
    "BertModel",
    "BertOutput",
    "BertPooler",
    "BertSelfAttention",
    "BertSelfOutput",
    "extended_attention_mask",
]

#: Hugging Face ``hidden_act`` names and the functions they denote (``ACT2FN`` in transformers).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": partial(jax.nn.gelu, approximate=False),  # exact erf, as torch.nn.functional.gelu
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The hyper-parameters of a BERT encoder; defaults are Hugging Face's ``BertConfig``'s.

    Arguments
    ---------
    vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size : int
        Vocabulary size, model width, depth, heads per layer and feed-forward width.
        ``hidden_size`` must be a multiple of ``num_attention_heads``.
    max_position_embeddings, type_vocab_size : int
        Rows of the position and token-type embedding tables.
    layer_norm_eps : float
        LayerNorm epsilon (PyTorch's value; Flax's default 1e-6 would give a different model).
    hidden_act : str
        A key of :data:`ACTIVATIONS`; ``"gelu"`` is the exact erf form.
    hidden_dropout_prob, attention_probs_dropout_prob : float
        Dropout rates, active only in training mode.

    Example
    -------
    >>> BertConfig(hidden_size=8, num_attention_heads=2).head_size
    4
    >>> class HuggingFaceLike:  # any object with these attribute names will do
    ...     vocab_size, hidden_size, num_attention_heads = 10, 6, 3
    >>> BertConfig.from_config(HuggingFaceLike()).head_size
    2
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"BertConfig.hidden_act {self.hidden_act!r} is not supported; "
                f"expected one of {sorted(ACTIVATIONS)}"
            )

    @property
    def head_size(self) -> int:
        """Width of one attention head: ``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config: Any) -> BertConfig:
        """Read the fields from any object that has them as attributes (a ``transformers.BertConfig``).

        ``config`` may also be the dict of a ``config.json``. Missing attributes keep their
        defaults. A Hugging Face config with a relative
        ``position_embedding_type`` is refused: this twin has absolute positions only.
        """
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):  # a config.json dict
            config = types.SimpleNamespace(**config)
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"position_embedding_type {position_type!r} is not supported; this twin has "
                "absolute position embeddings only"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: getattr(config, name) for name in fields if hasattr(config, name)})


def extended_attention_mask(attention_mask: jax.Array, dtype: Any) -> jax.Array:
    """Hugging Face's additive mask: ``(batch, seq)`` of 1/0 to ``(batch, 1, 1, seq)``.

    Attended keys get ``0``, masked keys the most negative finite value of ``dtype``, so a
    masked key's softmax weight underflows to exactly zero, as in ``transformers``.

    Example
    -------
    >>> mask = extended_attention_mask(jnp.array([[1, 0]]), jnp.float32)
    >>> mask.shape, mask[0, 0, 0].tolist() == [0.0, float(jnp.finfo(jnp.float32).min)]
    ((1, 1, 1, 2), True)
    """
    mask = jnp.asarray(attention_mask, dtype)[:, None, None, :]
    return (1.0 - mask) * jnp.finfo(dtype).min


class Activation(nnx.Module):
    """An activation by its Hugging Face name, as a module (``intermediate_act_fn`` in torch).

    Example
    -------
    >>> Activation("relu")(jnp.array([-1.0, 2.0])).tolist()
    [0.0, 2.0]
    """

    def __init__(self, name: str) -> None:
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.name](x)


class _Layers:
    """The keyword arguments every layer of one model shares (dtypes, precision, rngs)."""

    def __init__(self, config: BertConfig, dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs):
        self.config = config
        self.dtype, self.param_dtype, self.precision, self.rngs = dtype, param_dtype, precision, rngs

    def linear(self, in_features: int, out_features: int) -> nnx.Linear:
        return nnx.Linear(
            in_features,
            out_features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            rngs=self.rngs,
        )

    def layer_norm(self) -> nnx.LayerNorm:
        return nnx.LayerNorm(
            self.config.hidden_size,
            epsilon=self.config.layer_norm_eps,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
        )

    def embed(self, num_embeddings: int) -> nnx.Embed:
        return nnx.Embed(
            num_embeddings,
            self.config.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
        )

    def dropout(self, rate: float) -> nnx.Dropout:
        return nnx.Dropout(rate, rngs=self.rngs)


class BertEmbeddings(nnx.Module):
    """Word + token-type + absolute position embeddings, then LayerNorm and dropout."""

    def __init__(self, layers: _Layers) -> None:
        config = layers.config
        self.word_embeddings = layers.embed(config.vocab_size)
        self.position_embeddings = layers.embed(config.max_position_embeddings)
        self.token_type_embeddings = layers.embed(config.type_vocab_size)
        self.LayerNorm = layers.layer_norm()
        self.dropout = layers.dropout(config.hidden_dropout_prob)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        seq_length = input_ids.shape[-1]
        if seq_length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"input of {seq_length} tokens is longer than max_position_embeddings "
                f"({self.position_embeddings.num_embeddings})"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        position_ids = jnp.arange(seq_length)[None, :]
        # Same summation order as transformers: (words + token types) + positions.
        embeddings = embed_ids(self.word_embeddings, input_ids) + embed_ids(
            self.token_type_embeddings, token_type_ids
        )
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nnx.Module):
    """Multi-head scaled dot-product attention from three Linear projections.

    Input and output are ``(batch, seq, hidden_size)``; ``mask`` is the additive
    ``(batch, 1, 1, seq)`` mask of :func:`extended_attention_mask` or ``None``.
    """

    def __init__(self, layers: _Layers) -> None:
        config = layers.config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_size
        self.query = layers.linear(config.hidden_size, config.hidden_size)
        self.key = layers.linear(config.hidden_size, config.hidden_size)
        self.value = layers.linear(config.hidden_size, config.hidden_size)
        self.dropout = layers.dropout(config.attention_probs_dropout_prob)

    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        *batch_seq, _ = hidden_states.shape
        heads = (*batch_seq, self.num_attention_heads, self.attention_head_size)
        query = self.query(hidden_states).reshape(heads)
        key = self.key(hidden_states).reshape(heads)
        value = self.value(hidden_states).reshape(heads)
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) * (self.attention_head_size**-0.5)
        if mask is not None:
            scores = scores + mask
        weights = self.dropout(jax.nn.softmax(scores, axis=-1))
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        return context.reshape(*batch_seq, -1)


class BertSelfOutput(nnx.Module):
    """Project the attention output, then ``LayerNorm(dropout(dense(x)) + residual)``."""

    def __init__(self, layers: _Layers) -> None:
        config = layers.config
        self.dense = layers.linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = layers.layer_norm()
        self.dropout = layers.dropout(config.hidden_dropout_prob)

    def __call__(self, hidden_states: jax.Array, input_tensor: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nnx.Module):
    """Self-attention (``self``) followed by its output block (``output``)."""

    def __init__(self, layers: _Layers) -> None:
        self.self = BertSelfAttention(layers)
        self.output = BertSelfOutput(layers)

    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.output(self.self(hidden_states, mask), hidden_states)


class BertIntermediate(nnx.Module):
    """The feed-forward expansion: ``activation(dense(x))``, to ``intermediate_size``."""

    def __init__(self, layers: _Layers) -> None:
        config = layers.config
        self.dense = layers.linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = Activation(config.hidden_act)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nnx.Module):
    """The feed-forward contraction: ``LayerNorm(dropout(dense(x)) + residual)``."""

    def __init__(self, layers: _Layers) -> None:
        config = layers.config
        self.dense = layers.linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = layers.layer_norm()
        self.dropout = layers.dropout(config.hidden_dropout_prob)

    def __call__(self, hidden_states: jax.Array, input_tensor: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nnx.Module):
    """One post-norm transformer block: attention, then the feed-forward network."""

    def __init__(self, layers: _Layers) -> None:
        self.attention = BertAttention(layers)
        self.intermediate = BertIntermediate(layers)
        self.output = BertOutput(layers)

    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        attention_output = self.attention(hidden_states, mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nnx.Module):
    """``num_hidden_layers`` :class:`BertLayer` blocks in an ``nnx.List`` named ``layer``."""

    def __init__(self, layers: _Layers) -> None:
        self.layer = nnx.List([BertLayer(layers) for _ in range(layers.config.num_hidden_layers)])

    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for block in self.layer:
            hidden_states = block(hidden_states, mask)
        return hidden_states


class BertPooler(nnx.Module):
    """``tanh(dense(h[:, 0]))``: the first token's state, projected (``pooler_output``)."""

    def __init__(self, layers: _Layers) -> None:
        self.dense = layers.linear(layers.config.hidden_size, layers.config.hidden_size)
        self.activation = Activation("tanh")

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.activation(self.dense(hidden_states[:, 0]))


class BertModel(nnx.Module):
    """A BERT encoder whose module names and forward math are ``transformers.BertModel``'s.

    Arguments
    ---------
    config : BertConfig or a ``transformers.BertConfig``-like object
        The hyper-parameters, read by attribute name (see :meth:`BertConfig.from_config`).
    add_pooling_layer : bool
        Whether to build ``pooler`` (as in transformers; ``None`` otherwise).
    dtype, param_dtype, precision
        Computation dtype, parameter dtype and matmul precision of every layer (Flax's meaning).
    rngs : nnx.Rngs
        Parameter initialisation and dropout randomness.

    Returns
    -------
    ``model(input_ids, attention_mask=None, token_type_ids=None)`` returns the last hidden
    state ``(batch, seq, hidden_size)``; ``model.pooler(last_hidden_state)`` gives the pooled
    output ``(batch, hidden_size)``.

    Example
    -------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from flax_impl.graph import named_modules
    >>> config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
    ...                     num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
    >>> model = BertModel(config, rngs=nnx.Rngs(0))
    >>> [name for name, _ in named_modules(model) if name.endswith("query")]
    ['encoder.layer.0.attention.self.query']
    >>> model.eval()
    >>> model(jnp.array([[1, 2, 3]])).shape
    (1, 3, 8)
    """

    model_type = "bert"
    base_model_prefix = "bert"

    def __init__(
        self,
        config: BertConfig | Any,
        *,
        add_pooling_layer: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.config = BertConfig.from_config(config)
        layers = _Layers(self.config, dtype, param_dtype, precision, rngs)
        self.embeddings = BertEmbeddings(layers)
        self.encoder = BertEncoder(layers)
        self.pooler = BertPooler(layers) if add_pooling_layer else None

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Encode ``input_ids`` ``(batch, seq)``; ``attention_mask`` is 1 for tokens, 0 for padding."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        hidden_states = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected the shape of "
                    f"input_ids {tuple(input_ids.shape)}"
                )
            mask = extended_attention_mask(attention_mask, hidden_states.dtype)
        return self.encoder(hidden_states, mask)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> BertModel:
        """Read a transformers ``save_pretrained`` directory (``config.json`` plus ``model.safetensors``
        or a sharded index) without torch; returns the model in eval mode (dropout off).

        A directory saved from a model with a head (``BertForSequenceClassification``) is read
        under ``bert.``, the head left out and noted. A checkpoint without a pooler
        (``BertModel(add_pooling_layer=False)``, the encoder of ``BertForMaskedLM`` or
        ``BertForTokenClassification``) builds the model without one, with a warning and a note
        in the report, unless ``add_pooling_layer`` is given. Keyword arguments: see
        :func:`flax_impl.models.pretrained.from_pretrained` (``strict``, ``output_loading_info``,
        ``dtype``, ``param_dtype``, ``precision``, ``seed``).
        """
        from .pretrained import from_pretrained

        note = None
        if "add_pooling_layer" not in kwargs and not _has_pooler(path):
            kwargs["add_pooling_layer"] = False
            note = (
                "the checkpoint has no pooler (pooler.dense.*, as BertModel(add_pooling_layer=False), "
                "BertForMaskedLM and BertForTokenClassification save it): built without one"
            )
            warnings.warn(f"{os.fspath(path)!r}: {note} (pass add_pooling_layer= to choose)", stacklevel=2)
        loaded = from_pretrained(cls, path, **kwargs)
        if note is not None and isinstance(loaded, tuple):
            loaded[1].notes.insert(0, note)
        return loaded


def _has_pooler(path: str | os.PathLike[str]) -> bool:
    """Whether a ``save_pretrained`` directory holds ``pooler.dense.weight`` (under any prefix), from
    its headers alone; True when they cannot be read (the load then says why)."""
    from .pretrained import _open_checkpoint

    try:
        names = _open_checkpoint(path).specs
    except (OSError, ValueError):
        return True
    return any(name == "pooler.dense.weight" or name.endswith(".pooler.dense.weight") for name in names)
