"""PyTorch adapters (LoRA, Houlsby): a drop-in for ``speechbrain.nnet.adapters``.

Needs only torch (and numpy, safetensors): the rules shared with the Flax twin live in
:mod:`twinformat`, and the errors a PyTorch user meets are re-exported here.

>>> import torch
>>> from torch_impl import AdaptedModel, LoRA
>>> model = AdaptedModel(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoRA,
...                      target_layers="0", adapter_kwargs={"rank": 2})
>>> sum(p.numel() for p in model.parameters() if p.requires_grad)
16
"""

try:
    import torch as _torch  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised in the jax-only CI environment
    raise ImportError(
        "torch_impl needs PyTorch: pip install 'peft-twins[torch]' (CPU: pip install torch first)"
    ) from _exc

from twinformat._version import __version__
from twinformat.errors import (
    AdapterError,
    AdapterInsertionError,
    CheckpointError,
    ConversionError,
    LayoutError,
    MergeError,
    NoMatchError,
    UnknownLayerError,
)

from . import adapters as adapters  # the SpeechBrain-style facade: torch_impl.adapters.LoRA, ...
from .activations import Swish
from .adapted_model import AdaptedModel, is_layer_adaptable, replace_module
from .houlsby import HoulsbyAdapterLinear
from .lora import LoRA
from .merge import merge_and_unload, merge_lora, unload, unmerge_lora
from .pretrained import hotswap_adapter

__all__ = [
    "AdaptedModel",
    "AdapterError",
    "AdapterInsertionError",
    "CheckpointError",
    "ConversionError",
    "HoulsbyAdapterLinear",
    "LayoutError",
    "LoRA",
    "MergeError",
    "NoMatchError",
    "Swish",
    "UnknownLayerError",
    "__version__",
    "hotswap_adapter",
    "is_layer_adaptable",
    "merge_and_unload",
    "merge_lora",
    "replace_module",
    "unload",
    "unmerge_lora",
]
