"""PyTorch adapters (LoRA, Houlsby): a drop-in for ``speechbrain.nnet.adapters``.

>>> import torch
>>> from torch_impl import AdaptedModel, LoRA
>>> model = AdaptedModel(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoRA,
...                      target_layers="0", adapter_kwargs={"rank": 2})
>>> sum(p.numel() for p in model.parameters() if p.requires_grad)
16
"""

from .activations import Swish
from .adapters import (
    AdaptedModel,
    AdapterInsertionError,
    HoulsbyAdapterLinear,
    LoRA,
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
    "is_layer_adaptable",
    "merge_lora",
    "replace_module",
    "unmerge_lora",
]
