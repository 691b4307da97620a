"""LoRA on an ``nnx.Linear`` or ``nnx.Conv``, with merging: the twin of ``torch_impl.lora``."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from interchange.adapters import LORA, AdapterKind
from interchange.errors import AdapterInsertionError

from . import fused
from ._factors import (
    TORCH_DEFAULT_KERNEL_INIT,
    check_size,
    kernel_spec,
    layer_kwargs,
    place_like,
    sharding_kwargs,
)

__all__ = ["LoRA"]


class LoRA(nnx.Module):
    """LoRA adapter: 'LoRA: Low-Rank Adaptation of Large Language Models'
    (https://arxiv.org/abs/2106.09685).

    Output: ``pretrained_module(x) + adapter_up_proj(adapter_down_proj(x)) * scaling`` with
    ``scaling = alpha / rank``. The up projection starts at zero, so a fresh adapter changes
    nothing. For ``nnx.Conv`` (1, 2 or 3 spatial dims) the down projection copies the
    pretrained conv's geometry (kernel_size, strides, padding, input and kernel dilation) and
    the up projection is pointwise. Factors follow the wrapped kernel's dtype, the layer's
    ``dtype`` and ``precision``, and the kernel's sharding: the down factor is partitioned
    like the kernel's input axis, the up factor like its output axis, the rank axis never.

    Arguments
    ---------
    target_module: nnx.Linear or nnx.Conv
        The pretrained layer this adapter wraps; it is frozen under
        :attr:`AdaptedModel.trainable`.
    rank: int
        Rank of the update (at least 1).
    alpha: float
        Scaling numerator: ``scaling = alpha / rank``.
    rngs: nnx.Rngs
        Random streams for the down projection's initial kernel.

    Example
    -------
    >>> x = jnp.ones((8, 60, 64))
    >>> base_linear = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
    >>> adapt = LoRA(base_linear, 64, 4, rngs=nnx.Rngs(1))
    >>> adapt(x).shape
    (8, 60, 64)

    >>> x = jnp.ones((8, 100, 16))                       # channels last
    >>> base_conv = nnx.Conv(16, 32, kernel_size=(3,), strides=2, padding=[(0, 0)],
    ...                      rngs=nnx.Rngs(0))
    >>> adapt = LoRA(base_conv, rank=4, rngs=nnx.Rngs(1))
    >>> adapt(x).shape == base_conv(x).shape
    True
    """

    adapter_kind: ClassVar[AdapterKind] = LORA

    def __init__(
        self, target_module: nnx.Linear | nnx.Conv, rank: int = 16, alpha: float = 1.0, *, rngs: nnx.Rngs
    ) -> None:
        if not isinstance(target_module, (nnx.Linear, nnx.Conv)):
            raise ValueError(
                "LoRA supports nnx.Linear and nnx.Conv (1, 2 or 3 spatial dims) layers, "
                f"but instead got {type(target_module)}."
            )
        check_size("rank", rank)
        kernel = target_module.kernel
        spec = kernel_spec(kernel) or (None,) * kernel.ndim
        down_spec = (*spec[:-1], None)
        up_spec = (None,) * (kernel.ndim - 1) + (spec[-1],)
        layer = layer_kwargs(target_module)

        self.pretrained_module = target_module
        if isinstance(target_module, nnx.Conv):
            _check_conv(target_module)
            spatial = len(target_module.kernel_size)
            self.adapter_down_proj = nnx.Conv(
                target_module.in_features,
                rank,
                kernel_size=target_module.kernel_size,
                strides=target_module.strides,
                padding=target_module.padding,
                input_dilation=target_module.input_dilation,
                kernel_dilation=target_module.kernel_dilation,
                use_bias=False,
                kernel_init=TORCH_DEFAULT_KERNEL_INIT,
                **layer,
                **sharding_kwargs(kernel, down_spec),
                rngs=rngs,
            )
            self.adapter_up_proj = nnx.Conv(
                rank,
                target_module.out_features,
                kernel_size=(1,) * spatial,
                padding="VALID",
                use_bias=False,
                kernel_init=nnx.initializers.zeros,
                **layer,
                **sharding_kwargs(kernel, up_spec),
                rngs=rngs,
            )
        else:
            input_size, output_size = kernel.shape
            self.adapter_down_proj = nnx.Linear(
                input_size,
                rank,
                use_bias=False,
                kernel_init=TORCH_DEFAULT_KERNEL_INIT,
                **layer,
                **sharding_kwargs(kernel, down_spec),
                rngs=rngs,
            )
            self.adapter_up_proj = nnx.Linear(
                rank,
                output_size,
                use_bias=False,
                kernel_init=nnx.initializers.zeros,
                **layer,
                **sharding_kwargs(kernel, up_spec),
                rngs=rngs,
            )
        place_like(kernel, self.adapter_down_proj, down_spec)
        place_like(kernel, self.adapter_up_proj, up_spec)
        self.scaling = alpha / rank
        self.merged = False

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the pretrained layer plus the scaled low-rank update."""
        layers = (self.pretrained_module, self.adapter_down_proj, self.adapter_up_proj)
        if not self.merged and fused.can_fuse_linear(*layers):
            return fused.lora_linear(*layers, self.scaling, x)  # same values, a leaner backward
        x_pretrained = self.pretrained_module(x)
        if self.merged:
            return x_pretrained
        x_lora = self.adapter_up_proj(self.adapter_down_proj(x)) * self.scaling
        return x_pretrained + x_lora

    def delta_weight(self) -> jax.Array:
        """``scaling * down @ up`` in the wrapped kernel's layout (``(in, out)`` or
        ``(*k, in, out)``), in float32 (or wider)."""
        down = self.adapter_down_proj.kernel[...]  # (in, rank) or (*k, in, rank)
        up = self.adapter_up_proj.kernel[...]  # (rank, out) or (1, ..., 1, rank, out)
        dtype = jnp.promote_types(down.dtype, jnp.float32)
        up = up.reshape(up.shape[-2:]).astype(dtype)
        delta = jnp.matmul(down.astype(dtype), up, precision=jax.lax.Precision.HIGHEST)
        return delta * self.scaling

    def merge(self) -> None:
        """Fold the update into the wrapped kernel, so inference costs the base layer's time."""
        if self.merged:
            raise AdapterInsertionError("this LoRA layer is already merged")
        self._add_to_kernel(self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of the wrapped kernel (inverse of :meth:`merge`)."""
        if not self.merged:
            raise AdapterInsertionError("this LoRA layer is not merged")
        self._add_to_kernel(-self.delta_weight())
        self.merged = False

    def _add_to_kernel(self, delta: jax.Array) -> None:
        kernel = self.pretrained_module.kernel
        value = kernel[...]
        new = (value.astype(delta.dtype) + delta).astype(value.dtype)
        sharding = getattr(value, "sharding", None)
        kernel.set_value(jax.device_put(new, sharding) if sharding is not None else new)


def _check_conv(conv: nnx.Conv) -> None:
    """Refuse the convs whose low-rank update LoRA cannot express or the PyTorch twin lacks."""
    if conv.feature_group_count != 1:
        raise ValueError(
            "LoRA does not support convolutions with feature_group_count != 1, "
            f"got feature_group_count={conv.feature_group_count} for {_describe_conv(conv)}."
        )
    if len(conv.kernel_size) not in (1, 2, 3):
        raise ValueError(
            "LoRA supports nnx.Conv with 1, 2 or 3 spatial dims, "
            f"got kernel_size={conv.kernel_size} for {_describe_conv(conv)}."
        )
    if conv.mask is not None:
        raise ValueError(
            "LoRA does not support masked convolutions (its update would ignore the mask), "
            f"got a mask for {_describe_conv(conv)}."
        )


def _describe_conv(conv: nnx.Conv) -> str:
    return (
        f"nnx.Conv(in_features={conv.in_features}, out_features={conv.out_features}, "
        f"kernel_size={conv.kernel_size}, feature_group_count={conv.feature_group_count})"
    )
