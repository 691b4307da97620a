"""The Houlsby bottleneck adapter on an ``nnx.Linear``: the twin of ``torch_impl.houlsby``."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
from flax import nnx

from twinformat.adapters import HOULSBY, AdapterKind

from ._factors import (
    TORCH_DEFAULT_KERNEL_INIT,
    check_size,
    kernel_spec,
    layer_kwargs,
    place_like,
    sharding_kwargs,
)
from .activations import Swish
from .lora import SwitchColumns

__all__ = ["HoulsbyAdapterLinear"]


class HoulsbyAdapterLinear(nnx.Module):
    """Houlsby adapter on an ``nnx.Linear``: 'Parameter-Efficient Transfer Learning for NLP'
    (https://arxiv.org/abs/1902.00751).

    ``h = pretrained_linear(x)``; output ``up(activation(down(h))) + h``. Projection biases
    start at zero, kernels at PyTorch's default init. The projections follow the wrapped
    layer's kernel dtype, ``dtype``, ``precision`` and sharding. The wrapped linear is frozen
    under :attr:`AdaptedModel.trainable`.

    Arguments
    ---------
    target_linear: nnx.Linear
        The pretrained Linear that this adapter wraps.
    projection_size: int
        Size of the bottleneck projection (usually small), at least 1.
    activation: class
        The activation class, instantiated with no arguments. Default: Swish.
    bias: bool
        Whether the projections have biases.
    rngs: nnx.Rngs
        Random streams for the projections' initial kernels.

    Example
    -------
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((8, 60, 64))
    >>> base_linear = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
    >>> adapt = HoulsbyAdapterLinear(base_linear, 8, rngs=nnx.Rngs(1))
    >>> adapt(x).shape
    (8, 60, 64)
    """

    adapter_kind: ClassVar[AdapterKind] = HOULSBY

    def __init__(
        self,
        target_linear: nnx.Linear,
        projection_size: int,
        activation: type[nnx.Module] = Swish,
        bias: bool = True,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        if not isinstance(target_linear, nnx.Linear):
            raise ValueError(
                f"HoulsbyLinear currently only supports linear layers, but instead got {type(target_linear)}."
            )
        check_size("projection_size", projection_size)
        output_size = target_linear.kernel.shape[1]
        spec = kernel_spec(target_linear.kernel)
        out_axis = spec[1] if spec else None

        self.pretrained_linear = target_linear
        self.adapter_down_proj = nnx.Linear(
            output_size,
            projection_size,
            use_bias=bias,
            kernel_init=TORCH_DEFAULT_KERNEL_INIT,
            bias_init=nnx.initializers.zeros,
            **layer_kwargs(target_linear),
            **sharding_kwargs(target_linear.kernel, (out_axis, None), (None,)),
            rngs=rngs,
        )
        self.adapter_up_proj = nnx.Linear(
            projection_size,
            output_size,
            use_bias=bias,
            kernel_init=TORCH_DEFAULT_KERNEL_INIT,
            bias_init=nnx.initializers.zeros,
            **layer_kwargs(target_linear),
            **sharding_kwargs(target_linear.kernel, (None, out_axis), (out_axis,)),
            rngs=rngs,
        )
        self.activation = activation()
        place_like(target_linear.kernel, self.adapter_down_proj, (out_axis, None), (None,))
        place_like(target_linear.kernel, self.adapter_up_proj, (None, out_axis), (out_axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the adapter to ``x`` of shape ``[..., in_features]``."""
        x_pretrained = self.pretrained_linear(x)
        update = self.adapter_up_proj(self.activation(self.adapter_down_proj(x_pretrained)))
        switch = vars(self).get("adapter_switch")
        if switch is not None:  # the model holds named adapters: the default's weight, as data
            weight = switch[...][..., self.switch_columns["default"]]
            if weight.ndim:
                weight = weight.reshape(weight.shape + (1,) * (update.ndim - 1))
            update = weight.astype(update.dtype) * update
        return update + x_pretrained

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds: its own, always the model's default."""
        return ["default"]

    def attach_switch(self, switch: Any, columns: dict[str, int]) -> None:
        """Read the model's shared ``AdapterSwitch`` (None: back to a one-adapter layer)."""
        if switch is None:
            for attribute in ("adapter_switch", "switch_columns"):
                if attribute in vars(self):
                    delattr(self, attribute)
            return
        self.adapter_switch = switch
        self.switch_columns = SwitchColumns(columns)
