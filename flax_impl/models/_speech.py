"""What the Flax twins of wav2vec2, HuBERT and WavLM share: configs read by attribute name, the
convolutional feature encoder, the weight-normed positional convolution, the transformer encoder
(post-norm and "stable" pre-norm), and the reduction of a sample-level attention mask to frames.

Every submodule sits at the dotted name ``named_modules()`` gives for the transformers model, so a
torch ``state_dict`` converts key for key and one list of glob patterns selects the same layers in
both frameworks. Layout: the Flax twins compute channels-last (``(batch, time, channels)``), so
convolution kernels are ``(k, in, out)`` (the interchange layout rules do the transposition).

PyTorch semantics, declared explicitly (SPEC, "Writing twins"): every LayerNorm and GroupNorm uses
PyTorch's epsilon (``1e-5`` unless the config says ``layer_norm_eps``) and the two-pass variance;
``"gelu"`` is the exact erf form; convolutions use explicit symmetric integer padding; the grouped
positional convolution uses ``feature_group_count``; weight norm is ``v * (g / ||v||)`` with the
norm taken over every axis but PyTorch's ``dim=2`` (the kernel axis), as
``torch.nn.utils.parametrizations.weight_norm`` computes it.

This module does not import torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..interchange import KIND_OF_TYPE
from .bert import ACTIVATIONS, Activation

__all__ = [
    "Layers",
    "SpeechAttention",
    "SpeechConfig",
    "SpeechEncoder",
    "SpeechEncoderLayer",
    "SpeechEncoderLayerStableLayerNorm",
    "SpeechEncoderStableLayerNorm",
    "SpeechFeatureEncoder",
    "SpeechFeedForward",
    "SpeechModel",
    "SpeechPositionalConvEmbedding",
    "WeightNorm",
    "WeightNormConv",
    "compute_mask_indices",
    "config_value",
    "feature_vector_attention_mask",
    "feat_extract_output_lengths",
    "read_config",
]


def config_value(config: Any, name: str, default: Any) -> Any:
    """``config.name`` for an object (a transformers config), ``config[name]`` for a dict (its
    ``config.json``), else ``default``.

    >>> config_value({"hidden_size": 8}, "hidden_size", 768), config_value(object(), "x", 1)
    (8, 1)
    """
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def read_config(cls: type, config: Any) -> Any:
    """An instance of the dataclass ``cls`` with the fields ``config`` has (by attribute name, or
    key of a ``config.json`` dict); the others keep ``cls``'s defaults. Lists become tuples."""
    if isinstance(config, cls):
        return config
    values = {}
    for f in dataclasses.fields(cls):
        missing = object()
        value = config_value(config, f.name, missing)
        if value is missing:
            continue
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


def _activation_name(config: Any, name: str) -> None:
    value = getattr(config, name)
    if value not in ACTIVATIONS:
        raise ValueError(
            f"{type(config).__name__}.{name} {value!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
        )


@dataclasses.dataclass(frozen=True)
class SpeechConfig:
    """The hyper-parameters of a wav2vec2-family encoder; defaults are ``transformers.Wav2Vec2Config``'s.

    Field names are transformers' (a transformers config or its ``config.json`` dict is read by
    attribute name with :meth:`from_config`). Options a checkpoint can set and the twin cannot
    compute (``add_adapter``, ``adapter_attn_dim``) are refused, naming the field.

    Example
    -------
    >>> config = SpeechConfig.from_config({"hidden_size": 8, "num_attention_heads": 2,
    ...                                    "num_conv_pos_embedding_groups": 2,
    ...                                    "conv_dim": [4, 4], "conv_kernel": [10, 3],
    ...                                    "conv_stride": [5, 2]})
    >>> config.head_size, config.num_feat_extract_layers
    (4, 2)
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    layerdrop: float = 0.1
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    apply_spec_augment: bool = True
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0
    add_adapter: bool = False
    adapter_attn_dim: int | None = None
    # HuBERT's options (wav2vec2 and WavLM always have the projection's LayerNorm, never BatchNorm).
    feat_proj_layer_norm: bool = True
    conv_pos_batch_norm: bool = False
    # WavLM's relative position bias.
    num_buckets: int = 320
    max_bucket_distance: int = 800

    def __post_init__(self) -> None:
        _positive(
            self,
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_conv_pos_embeddings",
            "num_conv_pos_embedding_groups",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{type(self).__name__}.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(
                f"{type(self).__name__}.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_conv_pos_embedding_groups ({self.num_conv_pos_embedding_groups})"
            )
        if not (len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel)) or not self.conv_dim:
            raise ValueError(
                f"{type(self).__name__}: conv_dim, conv_stride and conv_kernel must have one (equal) length, "
                f"got {len(self.conv_dim)}, {len(self.conv_stride)} and {len(self.conv_kernel)}"
            )
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(
                f"{type(self).__name__}.feat_extract_norm is {self.feat_extract_norm!r}, but has to be one "
                "of ['group', 'layer']"
            )
        _activation_name(self, "hidden_act")
        _activation_name(self, "feat_extract_activation")
        if self.add_adapter:
            raise ValueError(
                f"{type(self).__name__}.add_adapter=True (the convolutional adapter after the encoder) "
                "is not supported by this twin"
            )
        if self.adapter_attn_dim is not None:
            raise ValueError(
                f"{type(self).__name__}.adapter_attn_dim={self.adapter_attn_dim} (MMS attention adapters) "
                "is not supported by this twin"
            )

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def num_feat_extract_layers(self) -> int:
        """Number of convolutions in the feature encoder."""
        return len(self.conv_dim)

    @property
    def has_masked_spec_embed(self) -> bool:
        """Whether the model holds ``masked_spec_embed`` (transformers: if a mask probability > 0)."""
        return self.mask_time_prob > 0.0 or self.mask_feature_prob > 0.0

    @classmethod
    def from_config(cls, config: Any) -> Any:
        """Read the fields from a transformers config object or its ``config.json`` dict."""
        return read_config(cls, config)


#: ``None``: the attention written out in transformers' order of operations (the default, exact
#: reference); ``"xla"``/``"cudnn"``: ``jax.nn.dot_product_attention`` with that implementation
#: (``"cudnn"``: cuDNN flash attention on NVIDIA GPUs, bf16/fp16 only; it never materialises the
#: ``frames x frames`` scores, which is what Whisper's 1500 frames need).
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


class Layers:
    """The keyword arguments every layer of one model shares (dtypes, precision, rngs)."""

    def __init__(
        self,
        config: Any,
        dtype: Any,
        param_dtype: Any,
        precision: Any,
        rngs: nnx.Rngs,
        attention_implementation: str | None = None,
    ) -> None:
        if attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention_implementation!r}"
            )
        self.config = config
        self.dtype, self.param_dtype, self.precision, self.rngs = dtype, param_dtype, precision, rngs
        self.attention_implementation = attention_implementation

    def linear(self, in_features: int, out_features: int, *, use_bias: bool = True) -> nnx.Linear:
        return nnx.Linear(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            rngs=self.rngs,
        )

    def conv(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        use_bias: bool = True,
    ) -> nnx.Conv:
        """A channels-last ``nnx.Conv`` with PyTorch's ``Conv1d`` geometry (symmetric integer padding)."""
        return nnx.Conv(
            in_features,
            out_features,
            kernel_size=(kernel_size,),
            strides=(stride,),
            padding=[(padding, padding)],
            feature_group_count=groups,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            rngs=self.rngs,
        )

    def layer_norm(self, features: int, epsilon: float = 1e-5) -> nnx.LayerNorm:
        return nnx.LayerNorm(
            features,
            epsilon=epsilon,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
        )

    def group_norm(self, features: int, num_groups: int) -> nnx.GroupNorm:
        return nnx.GroupNorm(
            features,
            num_groups=num_groups,
            epsilon=1e-5,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
        )

    def batch_norm(self, features: int) -> nnx.BatchNorm:
        # torch BatchNorm1d(momentum=0.1, eps=1e-5): Flax momentum is 1 - torch's.
        return nnx.BatchNorm(
            features,
            momentum=0.9,
            epsilon=1e-5,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
        )

    def embed(self, num_embeddings: int, features: int) -> nnx.Embed:
        return nnx.Embed(
            num_embeddings, features, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs
        )

    def dropout(self, rate: float) -> nnx.Dropout:
        return nnx.Dropout(rate, rngs=self.rngs)


# ---------------------------------------------------------------------------------------------
# Weight norm


class WeightNorm(nnx.Module):
    """``torch.nn.utils.parametrizations.weight_norm``'s parameters of a conv weight, in Flax layout.

    ``weight_g`` is PyTorch's ``original0`` and ``weight_v`` its ``original1``, both laid out like
    a conv kernel ``(*k, in/groups, out)``; the weight is ``weight_v * (weight_g / norm)`` with the
    2-norm of ``weight_v`` over every axis except PyTorch's ``dim`` (transformers: ``dim=2``, the
    kernel axis). Sits at ``<conv>.parametrizations.weight``, where PyTorch's ``ParametrizationList``
    holds them, so the names match key for key.

    Example
    -------
    >>> norm = WeightNorm((3, 2, 4), dim=2, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    >>> norm.weight_g.shape, norm.weight_v.shape, norm().shape
    ((3, 1, 1), (3, 2, 4), (3, 2, 4))
    """

    def __init__(self, kernel_shape: Sequence[int], *, dim: int, param_dtype: Any, rngs: nnx.Rngs) -> None:
        ndim = len(kernel_shape)
        # PyTorch's axis `dim` of (out, in, *k) in the Flax layout (*k, in, out).
        torch_to_flax = (*range(2, ndim), 1, 0)  # flax axis j holds torch axis torch_to_flax[j]
        self.dim = dim
        self.axis = torch_to_flax.index(dim % ndim)
        v = nnx.initializers.lecun_normal()(rngs.params(), tuple(kernel_shape), param_dtype)
        self.weight_v = nnx.Param(v)
        self.weight_g = nnx.Param(self._norm(v))

    def _norm(self, v: jax.Array) -> jax.Array:
        axes = tuple(a for a in range(v.ndim) if a != self.axis)
        return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))

    def __call__(self) -> jax.Array:
        """The effective kernel ``(*k, in/groups, out)``."""
        v = self.weight_v[...]
        return v * (self.weight_g[...] / self._norm(v))


class Parametrizations(nnx.Module):
    """The ``parametrizations`` container of a parametrized PyTorch layer: holds ``weight``."""

    def __init__(self, weight: WeightNorm) -> None:
        self.weight = weight


class WeightNormConv(nnx.Module):
    """A channels-last 1-d convolution whose kernel is weight-normed: transformers' positional conv.

    Variables: ``bias`` here, ``parametrizations.weight.weight_g/weight_v`` below (PyTorch:
    ``bias``, ``parametrizations.weight.original0/original1``). PyTorch's geometry: symmetric
    integer ``padding``, ``groups`` as ``feature_group_count``.

    Not an ``nnx.Conv``: ``LoRA`` cannot wrap it (a weight-normed grouped conv has no low-rank
    update of the wrapped kernel), so ``all_conv=True`` in Flax passes it by; select convs by
    name instead (``target_layers=["feature_extractor.conv_layers.*.conv"]``).

    Example
    -------
    >>> conv = WeightNormConv(8, 8, kernel_size=4, padding=2, groups=2, rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((1, 10, 8))).shape
    (1, 11, 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_size: int,
        padding: int,
        groups: int,
        dim: int = 2,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        if in_features % groups or out_features % groups:
            raise ValueError(
                f"WeightNormConv: in_features ({in_features}) and out_features ({out_features}) must be "
                f"multiples of groups ({groups})"
            )
        self.in_features, self.out_features = in_features, out_features
        self.kernel_size, self.padding, self.groups = (kernel_size,), padding, groups
        self.dtype, self.precision = dtype, precision
        shape = (kernel_size, in_features // groups, out_features)
        self.parametrizations = Parametrizations(
            WeightNorm(shape, dim=dim, param_dtype=param_dtype, rngs=rngs)
        )
        bound = 1.0 / np.sqrt(shape[0] * shape[1])
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (out_features,), param_dtype, -bound, bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` ``(batch, time, in)`` to ``(batch, time + 2 * padding - k + 1, out)``."""
        kernel, bias = self.parametrizations.weight(), self.bias[...]
        x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, kernel, bias), dtype=self.dtype)
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(1,),
            padding=[(self.padding, self.padding)],
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=self.groups,
            precision=self.precision,
        )
        return y + bias


class SamePad(nnx.Module):
    """transformers' ``SamePadLayer``: drops the last frame when the positional kernel is even."""

    def __init__(self, num_conv_pos_embeddings: int) -> None:
        self.num_pad_remove = 1 if num_conv_pos_embeddings % 2 == 0 else 0

    def __call__(self, x: jax.Array) -> jax.Array:
        return x[:, : -self.num_pad_remove] if self.num_pad_remove else x


class SpeechPositionalConvEmbedding(nnx.Module):
    """The convolutional relative positional embedding: ``activation(pad(conv(x)))``.

    ``conv`` is a :class:`WeightNormConv`; with HuBERT's ``conv_pos_batch_norm`` it is a plain
    grouped ``nnx.Conv`` after a ``batch_norm``, as in transformers.
    """

    def __init__(self, layers: Layers) -> None:
        config = layers.config
        size, k, groups = (
            config.hidden_size,
            config.num_conv_pos_embeddings,
            config.num_conv_pos_embedding_groups,
        )
        if config.conv_pos_batch_norm:
            self.batch_norm = layers.batch_norm(size)
            self.conv: nnx.Conv | WeightNormConv = layers.conv(size, size, k, padding=k // 2, groups=groups)
        else:
            self.conv = WeightNormConv(
                size,
                size,
                kernel_size=k,
                padding=k // 2,
                groups=groups,
                dtype=layers.dtype,
                param_dtype=layers.param_dtype,
                precision=layers.precision,
                rngs=layers.rngs,
            )
        self.padding = SamePad(k)
        self.activation = Activation(config.feat_extract_activation)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        if hasattr(self, "batch_norm"):
            hidden_states = self.batch_norm(hidden_states)
        return self.activation(self.padding(self.conv(hidden_states)))


# ---------------------------------------------------------------------------------------------
# Feature encoder


class ConvLayer(nnx.Module):
    """One feature-encoder convolution: ``conv``, then ``layer_norm`` (a GroupNorm with one group
    per channel, a LayerNorm over channels, or none), then the activation."""

    def __init__(self, layers: Layers, layer_id: int, norm: str | None) -> None:
        config = layers.config
        in_dim = config.conv_dim[layer_id - 1] if layer_id > 0 else 1
        out_dim = config.conv_dim[layer_id]
        self.conv = layers.conv(
            in_dim,
            out_dim,
            config.conv_kernel[layer_id],
            stride=config.conv_stride[layer_id],
            use_bias=config.conv_bias,
        )
        if norm == "group":
            self.layer_norm: nnx.GroupNorm | nnx.LayerNorm = layers.group_norm(out_dim, num_groups=out_dim)
        elif norm == "layer":
            self.layer_norm = layers.layer_norm(out_dim)  # PyTorch's default eps, as transformers
        self.activation = Activation(config.feat_extract_activation)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        hidden_states = self.conv(hidden_states)
        if hasattr(self, "layer_norm"):
            hidden_states = self.layer_norm(hidden_states)
        return self.activation(hidden_states)


class SpeechFeatureEncoder(nnx.Module):
    """Raw audio ``(batch, samples)`` to frames ``(batch, frames, conv_dim[-1])`` (``conv_layers``).

    ``feat_extract_norm="group"``: a GroupNorm after the first convolution only;
    ``"layer"``: a LayerNorm after every convolution.
    """

    def __init__(self, layers: Layers) -> None:
        config = layers.config
        if config.feat_extract_norm == "group":
            norms = ["group"] + [None] * (config.num_feat_extract_layers - 1)
        else:
            norms = ["layer"] * config.num_feat_extract_layers
        self.conv_layers = nnx.List([ConvLayer(layers, i, norm) for i, norm in enumerate(norms)])

    def __call__(self, input_values: jax.Array) -> jax.Array:
        hidden_states = input_values[:, :, None]
        for conv_layer in self.conv_layers:
            hidden_states = conv_layer(hidden_states)
        return hidden_states


class SpeechFeatureProjection(nnx.Module):
    """``dropout(projection(layer_norm(x)))`` (HuBERT: the LayerNorm only if ``feat_proj_layer_norm``)."""

    def __init__(self, layers: Layers, *, layer_norm: bool = True) -> None:
        config = layers.config
        if layer_norm:
            self.layer_norm = layers.layer_norm(config.conv_dim[-1], config.layer_norm_eps)
        self.projection = layers.linear(config.conv_dim[-1], config.hidden_size)
        self.dropout = layers.dropout(config.feat_proj_dropout)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        if hasattr(self, "layer_norm"):
            hidden_states = self.layer_norm(hidden_states)
        return self.dropout(self.projection(hidden_states))


def feat_extract_output_lengths(
    lengths: jax.Array, conv_kernel: Sequence[int], conv_stride: Sequence[int]
) -> Any:
    """Frames the feature encoder makes of ``lengths`` samples: ``floor((L - k) / s) + 1`` per conv.

    >>> int(feat_extract_output_lengths(jnp.array(16000), (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)))
    49
    """
    for kernel, stride in zip(conv_kernel, conv_stride, strict=True):
        lengths = jnp.floor_divide(lengths - kernel, stride) + 1
    return lengths


def feature_vector_attention_mask(num_frames: int, attention_mask: jax.Array, config: Any) -> jax.Array:
    """transformers' ``_get_feature_vector_attention_mask``: ``(batch, samples)`` of 1/0 to
    ``(batch, frames)`` booleans, True for the first ``output_length`` frames of each row.

    As in transformers, only the number of ones in a row counts (not where they are), and a row
    too short to make a frame (``output_length <= 0``) indexes from the end as PyTorch's
    ``mask[row, output_length - 1] = 1`` does.

    >>> mask = jnp.ones((2, 400)).at[1, 200:].set(0)
    >>> config = SpeechConfig(hidden_size=16, num_attention_heads=2, num_conv_pos_embedding_groups=2,
    ...                       conv_dim=(4, 4), conv_kernel=(10, 3), conv_stride=(5, 2))
    >>> feature_vector_attention_mask(39, mask, config).sum(-1).tolist()
    [39, 19]
    """
    lengths = jnp.sum(jnp.asarray(attention_mask).astype(jnp.int32), axis=-1)
    output_lengths = feat_extract_output_lengths(lengths, config.conv_kernel, config.conv_stride)
    last = jnp.mod(output_lengths - 1, num_frames)  # PyTorch's negative indexing
    return jnp.arange(num_frames)[None, :] <= last[:, None]


# ---------------------------------------------------------------------------------------------
# SpecAugment


def _num_masked_spans(
    length: Any, mask_prob: float, mask_length: int, min_masks: int, size: int, epsilon: Any
) -> Any:
    """transformers' ``compute_num_masked_span``, elementwise on ``length`` (Python ints or arrays)."""
    num = jnp.floor(mask_prob * length / mask_length + epsilon).astype(jnp.int32)
    num = jnp.maximum(num, min_masks)
    num = jnp.where(num * mask_length > size, size // mask_length, num)  # at most size // mask_length
    starts = length - (mask_length - 1)
    return jnp.where(starts < num, jnp.maximum(starts, 0), num)  # at most the possible span starts


def compute_mask_indices(
    key: jax.Array,
    shape: tuple[int, int],
    mask_prob: float,
    mask_length: int,
    attention_mask: jax.Array | None = None,
    min_masks: int = 0,
) -> jax.Array:
    """SpecAugment's random spans, drawn as transformers' ``_compute_mask_indices`` draws them, in JAX.

    The same distribution (not the same numbers: NumPy's global generator there, ``key`` here), and
    jit-compatible: ``shape`` is static, the lengths (``attention_mask.sum(-1)``, or ``shape[1]``)
    may be traced. One ``epsilon ~ U[0, 1)`` per call, shared by the batch, rounds
    ``mask_prob * length / mask_length + epsilon`` down to the number of spans of each row; that is
    at least ``min_masks``, at most ``shape[1] // mask_length`` and at most the ``length -
    mask_length + 1`` possible starts. The starts are drawn uniformly without replacement from
    ``[0, length - mask_length]`` and each masks ``mask_length`` frames (spans may overlap). As in
    transformers, nothing is masked when a row of full length would get no span, and a shorter row
    that gets none masks its last frame (a padding frame: the dummy index transformers pads with).

    Parameters
    ----------
    key : jax.Array
        A PRNG key.
    shape : tuple of int
        ``(batch, size)``: the mask's shape (size: frames for time masks, channels for feature masks).
    mask_prob, mask_length, min_masks
        transformers' ``mask_time_prob``/``mask_time_length``/``mask_time_min_masks`` (or the
        ``mask_feature_*`` trio).
    attention_mask : jax.Array, optional
        ``(batch, size)``, 1/True for real frames (right padding): each row draws from its own length.

    Returns
    -------
    jax.Array
        ``(batch, size)`` booleans, True where masked.

    Raises
    ------
    ValueError
        ``mask_length < 1`` or ``mask_length > size``, with transformers' messages.

    Example
    -------
    >>> mask = compute_mask_indices(jax.random.key(0), (2, 50), 0.2, 5, min_masks=1)
    >>> mask.shape, bool(mask.any(-1).all())
    ((2, 50), True)
    """
    batch_size, sequence_length = shape
    if mask_length < 1:
        raise ValueError("`mask_length` has to be bigger than 0.")
    if mask_length > sequence_length:
        raise ValueError(
            f"`mask_length` has to be smaller than `sequence_length`, but got `mask_length`: {mask_length}"
            f" and `sequence_length`: {sequence_length}`"
        )
    # The most spans any row can get (epsilon -> 1): the static width of the start table.
    max_spans = max(int(mask_prob * sequence_length / mask_length + 1.0), min_masks)
    if max_spans * mask_length > sequence_length:
        max_spans = sequence_length // mask_length
    max_spans = min(max_spans, sequence_length - mask_length + 1)
    if max_spans == 0:
        return jnp.zeros(shape, bool)
    epsilon_key, starts_key = jax.random.split(key)
    epsilon = jax.random.uniform(epsilon_key, (), jnp.float32)
    if attention_mask is None:
        lengths = jnp.full((batch_size,), sequence_length, jnp.int32)
    else:
        lengths = jnp.sum(jnp.asarray(attention_mask).astype(jnp.int32), axis=-1)
    num_spans = _num_masked_spans(lengths, mask_prob, mask_length, min_masks, sequence_length, epsilon)
    any_spans = (
        _num_masked_spans(sequence_length, mask_prob, mask_length, min_masks, sequence_length, epsilon) > 0
    )
    # Uniform without replacement: the num_spans highest of i.i.d. random scores over the row's
    # possible starts (the others score 0, below every real score).
    num_starts = sequence_length - mask_length + 1
    scores = (jax.random.bits(starts_key, (batch_size, num_starts), jnp.uint32) >> 1) + 1
    allowed = jnp.arange(num_starts)[None, :] < (lengths - mask_length + 1)[:, None]
    _, starts = jax.lax.top_k(jnp.where(allowed, scores, 0), max_spans)
    used = jnp.arange(max_spans)[None, :] < num_spans[:, None]
    rows = jnp.arange(batch_size)[:, None]
    first = jnp.zeros((batch_size, sequence_length), jnp.int32).at[rows, starts].add(used.astype(jnp.int32))
    # transformers' dummy index for a row without spans: the last frame (its span is clipped there).
    first = first.at[:, sequence_length - 1].add((num_spans == 0).astype(jnp.int32))
    # A frame is masked when a span starts in the mask_length frames up to it.
    count = jnp.cumsum(first, axis=1)
    before = jnp.pad(count, ((0, 0), (mask_length, 0)))[:, :sequence_length]
    return ((count - before) > 0) & any_spans


# ---------------------------------------------------------------------------------------------
# Transformer encoder


def additive_mask(mask: jax.Array | None, dtype: Any) -> jax.Array | None:
    """``(batch, frames)`` booleans to transformers' additive ``(batch, 1, 1, frames)`` mask."""
    if mask is None:
        return None
    return jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(dtype).min).astype(dtype)


class Stochastic(Protocol):
    """A module that draws its own dropout: NNX's ``deterministic`` flag and a random stream."""

    @property
    def deterministic(self) -> bool: ...

    @property
    def rngs(self) -> Any: ...


class DropoutSource(Stochastic, Protocol):
    """What :func:`attention_dropout` reads: a :class:`Stochastic` module with a ``dropout`` rate."""

    @property
    def dropout(self) -> float: ...


def attention_dropout(module: DropoutSource, weights: jax.Array) -> jax.Array:
    """Dropout at ``module.dropout`` on attention weights, in training mode only (``module.eval()``
    sets ``deterministic``), drawing from ``module.rngs``."""
    return nnx.Dropout(module.dropout, deterministic=module.deterministic)(weights, rngs=module.rngs)


class SpeechAttention(nnx.Module):
    """Multi-head self-attention with ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (all biased
    unless ``key_bias=False``, Whisper's ``k_proj``); scores ``(q k^T) * head_dim**-0.5``.

    ``mask`` is additive, ``(batch, 1, 1, frames)``. ``scale_query=True`` scales ``q`` before the
    product, as Whisper does (same function, different rounding).
    """

    def __init__(
        self,
        layers: Layers,
        hidden_size: int,
        num_heads: int,
        dropout: float,
        *,
        key_bias: bool = True,
        scale_query: bool = False,
    ) -> None:
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.scale_query = scale_query
        self.k_proj = layers.linear(hidden_size, hidden_size, use_bias=key_bias)
        self.v_proj = layers.linear(hidden_size, hidden_size)
        self.q_proj = layers.linear(hidden_size, hidden_size)
        self.out_proj = layers.linear(hidden_size, hidden_size)
        # As in PyTorch, the attention dropout is a rate, not a submodule (no extra module name).
        self.dropout = dropout
        self.deterministic = False
        self.rngs = layers.rngs["dropout"].fork()
        self.implementation = layers.attention_implementation

    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        *batch_seq, _ = hidden_states.shape
        heads = (*batch_seq, self.num_heads, self.head_dim)
        dropout_active = self.dropout > 0.0 and not self.deterministic
        if self.implementation is not None and not dropout_active:  # the fused kernel has no dropout
            try:
                context = jax.nn.dot_product_attention(
                    self.q_proj(hidden_states).reshape(heads),
                    self.k_proj(hidden_states).reshape(heads),
                    self.v_proj(hidden_states).reshape(heads),
                    bias=mask,
                    scale=self.scaling,
                    # (``cast``: Layers checked it is one of ATTENTION_IMPLEMENTATIONS.)
                    implementation=cast(Literal["xla", "cudnn"] | None, self.implementation),
                )
            except (NotImplementedError, RuntimeError) as exc:  # cuDNN: absent, or this shape/dtype
                raise ValueError(
                    f"attention_implementation={self.implementation!r} cannot run this attention "
                    f"({heads[-2]} heads of {heads[-1]} over {hidden_states.shape[-2]} frames, "
                    f"{hidden_states.dtype}): {exc}. Build the model with attention_implementation=None "
                    "(the written-out attention) for these inputs"
                ) from exc
            return self.out_proj(context.reshape(*batch_seq, -1))
        query = self.q_proj(hidden_states)
        if self.scale_query:
            query = query * self.scaling
        query = query.reshape(heads)
        key = self.k_proj(hidden_states).reshape(heads)
        value = self.v_proj(hidden_states).reshape(heads)
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key)
        if not self.scale_query:
            scores = scores * self.scaling
        if mask is not None:
            scores = scores + mask
        weights = attention_dropout(self, jax.nn.softmax(scores, axis=-1))
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        return self.out_proj(context.reshape(*batch_seq, -1))


class SpeechFeedForward(nnx.Module):
    """``output_dropout(output_dense(intermediate_dropout(act(intermediate_dense(x)))))``."""

    def __init__(self, layers: Layers) -> None:
        config = layers.config
        self.intermediate_dropout = layers.dropout(config.activation_dropout)
        self.intermediate_dense = layers.linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = Activation(config.hidden_act)
        self.output_dense = layers.linear(config.intermediate_size, config.hidden_size)
        self.output_dropout = layers.dropout(config.hidden_dropout)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        hidden_states = self.intermediate_dropout(
            self.intermediate_act_fn(self.intermediate_dense(hidden_states))
        )
        return self.output_dropout(self.output_dense(hidden_states))


class SpeechEncoderLayer(nnx.Module):
    """Post-norm block: ``x = LN(x + drop(attn(x)))``, then ``LN(x + ff(x))``."""

    def __init__(self, layers: Layers, attention: nnx.Module | None = None) -> None:
        config = layers.config
        self.attention = attention or SpeechAttention(
            layers, config.hidden_size, config.num_attention_heads, config.attention_dropout
        )
        self.dropout = layers.dropout(config.hidden_dropout)
        self.layer_norm = layers.layer_norm(config.hidden_size, config.layer_norm_eps)
        self.feed_forward = SpeechFeedForward(layers)
        self.final_layer_norm = layers.layer_norm(config.hidden_size, config.layer_norm_eps)

    def attend(self, hidden_states: jax.Array, mask: Any) -> jax.Array:
        return self.attention(hidden_states, mask)

    def __call__(self, hidden_states: jax.Array, mask: Any = None) -> jax.Array:
        hidden_states = hidden_states + self.dropout(self.attend(hidden_states, mask))
        hidden_states = self.layer_norm(hidden_states)
        hidden_states = hidden_states + self.feed_forward(hidden_states)
        return self.final_layer_norm(hidden_states)


class SpeechEncoderLayerStableLayerNorm(SpeechEncoderLayer):
    """Pre-norm block (``do_stable_layer_norm``): ``x + drop(attn(LN(x)))``, then ``x + ff(LN(x))``."""

    def __call__(self, hidden_states: jax.Array, mask: Any = None) -> jax.Array:
        hidden_states = hidden_states + self.dropout(self.attend(self.layer_norm(hidden_states), mask))
        return hidden_states + self.feed_forward(self.final_layer_norm(hidden_states))


class SpeechEncoder(nnx.Module):
    """Zero the padded frames, add the positional conv, ``layer_norm``, dropout, then the ``layers``.

    LayerDrop (``config.layerdrop``) skips whole layers in training mode, as transformers does,
    drawing from the ``dropout`` stream; in eval mode every layer runs.
    """

    stable_layer_norm = False

    def __init__(self, layers: Layers, encoder_layers: Sequence[nnx.Module]) -> None:
        config = layers.config
        self.pos_conv_embed = SpeechPositionalConvEmbedding(layers)
        self.layer_norm = layers.layer_norm(config.hidden_size, config.layer_norm_eps)
        self.dropout = layers.dropout(config.hidden_dropout)
        self.layers = nnx.List(list(encoder_layers))
        self.layerdrop = float(config.layerdrop)

    def _keep_layers(self) -> jax.Array | None:
        """Per layer, whether it runs (None: all do, as in eval mode)."""
        if self.layerdrop <= 0.0 or self.dropout.deterministic or self.dropout.rngs is None:
            return None
        return jax.random.uniform(self.dropout.rngs(), (len(self.layers),)) >= self.layerdrop

    def run_layers(self, hidden_states: jax.Array, mask: jax.Array | None) -> jax.Array:
        additive = additive_mask(mask, hidden_states.dtype)
        keep = self._keep_layers()
        for i, layer in enumerate(self.layers):
            new = layer(hidden_states, additive)
            hidden_states = new if keep is None else jnp.where(keep[i], new, hidden_states)
        return hidden_states

    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if mask is not None:  # padded frames are zero before the positional convolution
            hidden_states = jnp.where(mask[:, :, None], hidden_states, 0.0).astype(hidden_states.dtype)
        hidden_states = hidden_states + self.pos_conv_embed(hidden_states)
        if not self.stable_layer_norm:
            hidden_states = self.layer_norm(hidden_states)
        hidden_states = self.run_layers(self.dropout(hidden_states), mask)
        if self.stable_layer_norm:
            hidden_states = self.layer_norm(hidden_states)
        return hidden_states


class SpeechEncoderStableLayerNorm(SpeechEncoder):
    """The pre-norm encoder: the final ``layer_norm`` comes after the layers."""

    stable_layer_norm = True


class SpeechModel(nnx.Module):
    """The wav2vec2-family model: ``feature_extractor``, ``feature_projection``, optional
    ``masked_spec_embed``, ``encoder``. Subclasses choose the config class and the layers.

    ``model(input_values, attention_mask=None, mask_time_indices=None)`` returns the last hidden
    state ``(batch, frames, hidden_size)``. SpecAugment as transformers' ``_mask_hidden_states``
    applies it to the projected frames, when ``config.apply_spec_augment``: ``mask_time_indices``
    ``(batch, frames)``, if given, replaces those frames by ``masked_spec_embed`` in either mode;
    otherwise, in training mode with ``mask_time_prob > 0``, random time spans are drawn (see
    :func:`compute_mask_indices`; within each row's frames of ``attention_mask``, except for
    HuBERT, whose transformers model draws over all frames) and replaced so; then, in training mode
    with ``mask_feature_prob > 0``, random channel spans are set to 0 on every frame. The spans
    come from the model's own fork of the ``dropout`` stream of ``rngs`` and ``model.train()`` /
    ``model.eval()`` switch them on and off (the ``deterministic`` attribute, as ``nnx.Dropout``);
    eval mode draws nothing.

    ``attention_implementation`` (see :data:`ATTENTION_IMPLEMENTATIONS`): ``None`` writes the
    attention out as transformers does; ``"cudnn"`` uses cuDNN's flash attention (GPU, bf16), falling
    back to the written-out form while attention dropout is active. WavLM's biased attention is
    always written out.

    Example
    -------
    >>> from flax_impl.models import Wav2Vec2Model
    >>> config = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
    ...           "intermediate_size": 16, "conv_dim": [4], "conv_kernel": [10], "conv_stride": [5],
    ...           "num_conv_pos_embeddings": 4, "num_conv_pos_embedding_groups": 2,
    ...           "mask_time_prob": 0.5, "mask_time_length": 2}
    >>> model = Wav2Vec2Model(config, rngs=nnx.Rngs(params=0, dropout=1))
    >>> values = jax.random.normal(jax.random.key(0), (1, 400))
    >>> frames, _ = model.embed(values)  # training mode: 19 or 20 spans of 2 of the 79 frames
    >>> masked = (frames == model.masked_spec_embed[...]).all(-1)
    >>> 20 <= int(masked.sum()) <= 40
    True
    >>> model.eval()
    >>> frames, _ = model.embed(values)
    >>> bool((frames == model.masked_spec_embed[...]).all(-1).any())
    False
    """

    config_class: type[SpeechConfig] = SpeechConfig
    #: Whether the random time spans stay within each row's frames (transformers' HuBERT does not
    #: pass its attention mask to ``_compute_mask_indices``: its spans may fall on padding).
    spec_augment_reads_attention_mask: ClassVar[bool] = True

    def __init__(
        self,
        config: Any,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        attention_implementation: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.config = self.config_class.from_config(config)
        layers = Layers(self.config, dtype, param_dtype, precision, rngs, attention_implementation)
        self.feature_extractor = SpeechFeatureEncoder(layers)
        self.feature_projection = self.make_feature_projection(layers)
        if self.config.has_masked_spec_embed:
            self.masked_spec_embed = nnx.Param(
                jax.random.uniform(rngs.params(), (self.config.hidden_size,), param_dtype)
            )
        self.encoder = self.make_encoder(layers)
        # SpecAugment's random spans: training mode after construction, as the dropout layers;
        # nnx's train()/eval() set ``deterministic``. Forked last, so the other streams are unchanged.
        self.deterministic = False
        self.rngs = rngs["dropout"].fork()

    def make_feature_projection(self, layers: Layers) -> nnx.Module:
        return SpeechFeatureProjection(layers)

    def make_encoder_layer(self, layers: Layers, index: int) -> nnx.Module:
        if layers.config.do_stable_layer_norm:
            return SpeechEncoderLayerStableLayerNorm(layers)
        return SpeechEncoderLayer(layers)

    def make_encoder(self, layers: Layers) -> nnx.Module:
        encoder_class = SpeechEncoderStableLayerNorm if layers.config.do_stable_layer_norm else SpeechEncoder
        return encoder_class(
            layers, [self.make_encoder_layer(layers, i) for i in range(layers.config.num_hidden_layers)]
        )

    def __call__(
        self,
        input_values: jax.Array,
        attention_mask: jax.Array | None = None,
        mask_time_indices: jax.Array | None = None,
    ) -> jax.Array:
        """Encode ``input_values`` ``(batch, samples)``; ``attention_mask`` is 1 for samples, 0 for padding."""
        input_values = jnp.asarray(input_values)
        if input_values.ndim != 2:
            raise ValueError(f"input_values must be (batch, samples), got shape {tuple(input_values.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_values.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected the shape of "
                f"input_values {tuple(input_values.shape)}"
            )
        hidden_states, mask = self.embed(input_values, attention_mask, mask_time_indices)
        return self.encoder(hidden_states, mask)

    def embed(
        self,
        input_values: jax.Array,
        attention_mask: jax.Array | None = None,
        mask_time_indices: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """What the ``encoder`` sees: the projected frames ``(batch, frames, hidden_size)`` and the
        frame mask ``(batch, frames)`` (None without ``attention_mask``)."""
        features = self.feature_extractor(jnp.asarray(input_values))
        mask = None
        if attention_mask is not None:
            mask = feature_vector_attention_mask(features.shape[1], attention_mask, self.config)
        hidden_states = self.mask_hidden_states(self.feature_projection(features), mask_time_indices, mask)
        return hidden_states, mask

    def mask_hidden_states(
        self,
        hidden_states: jax.Array,
        mask_time_indices: jax.Array | None = None,
        frame_mask: jax.Array | None = None,
    ) -> jax.Array:
        """transformers' ``_mask_hidden_states``: SpecAugment on ``(batch, frames, hidden_size)``.

        Time spans (``mask_time_indices``, or drawn in training mode) become ``masked_spec_embed``,
        then feature spans (drawn in training mode) become 0; nothing without
        ``config.apply_spec_augment``. ``frame_mask`` ``(batch, frames)`` bounds each row's time spans.
        """
        config = self.config
        if not config.apply_spec_augment:
            return hidden_states
        batch_size, sequence_length, hidden_size = hidden_states.shape
        training = not self.deterministic
        if mask_time_indices is None and training and config.mask_time_prob > 0.0:
            mask_time_indices = compute_mask_indices(
                self.rngs(),
                (batch_size, sequence_length),
                config.mask_time_prob,
                config.mask_time_length,
                frame_mask if self.spec_augment_reads_attention_mask else None,
                config.mask_time_min_masks,
            )
        if mask_time_indices is not None:
            if not config.has_masked_spec_embed:
                raise ValueError("mask_time_indices given but this model has no masked_spec_embed")
            mask_time_indices = jnp.asarray(mask_time_indices)
            if tuple(mask_time_indices.shape) != (batch_size, sequence_length):
                raise ValueError(
                    f"mask_time_indices has shape {tuple(mask_time_indices.shape)}, expected (batch, frames) "
                    f"= {(batch_size, sequence_length)}"
                )
            embed = self.masked_spec_embed[...].astype(hidden_states.dtype)
            hidden_states = jnp.where(mask_time_indices.astype(bool)[:, :, None], embed, hidden_states)
        if training and config.mask_feature_prob > 0.0:
            mask_feature_indices = compute_mask_indices(
                self.rngs(),
                (batch_size, hidden_size),
                config.mask_feature_prob,
                config.mask_feature_length,
                None,
                config.mask_feature_min_masks,
            )
            hidden_states = jnp.where(mask_feature_indices[:, None, :], 0.0, hidden_states).astype(
                hidden_states.dtype
            )
        return hidden_states

    @classmethod
    def from_pretrained(cls, path: Any, **kwargs: Any) -> Any:
        """Read a transformers ``save_pretrained`` directory; see :func:`flax_impl.models.pretrained.from_pretrained`."""
        from .pretrained import from_pretrained

        return from_pretrained(cls, path, **kwargs)


# One line each in the Flax type table (flax_impl.interchange.KIND_OF_TYPE) for the layer kinds
# these modules hold (twinformat.kinds: conv_weight_norm, masked_spec_embed).
KIND_OF_TYPE.extend(
    [
        (WeightNorm, "conv_weight_norm"),
        (WeightNormConv, "conv"),  # owns its bias; the weight norm sits below it
        (SpeechModel, "masked_spec_embed"),
    ]
)
