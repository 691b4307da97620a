"""Flax NNX adapters (LoRA, Houlsby): the twin of ``torch_impl``, with the same names.

>>> import jax
>>> from flax import nnx
>>> from flax_impl import AdaptedModel, LoRA
>>> model = AdaptedModel(nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0))), LoRA,
...                      target_layers="layers.0", adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(1))
>>> sum(x.size for x in jax.tree.leaves(nnx.state(model, model.trainable)))
16
"""

from .activations import Swish
from .adapters import (
    AdaptedModel,
    AdapterInsertionError,
    HoulsbyAdapterLinear,
    LoRA,
    TrainableFilter,
    is_layer_adaptable,
    replace_module,
)
from .merge import MergeError, merge_lora, unmerge_lora

__all__ = [
    "AdaptedModel",
    "AdapterInsertionError",
    "HoulsbyAdapterLinear",
    "LoRA",
    "MergeError",
    "Swish",
    "TrainableFilter",
    "is_layer_adaptable",
    "merge_lora",
    "replace_module",
    "unmerge_lora",
]
