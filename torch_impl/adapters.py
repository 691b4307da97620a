"""LoRA and Houlsby adapters for PyTorch: a drop-in for ``speechbrain.nnet.adapters`` (1.1.x).

SpeechBrain keeps its adapters in one module; so does this one, as a facade over the files that
hold each concept (:mod:`~torch_impl.adapted_model`, :mod:`~torch_impl.lora`,
:mod:`~torch_impl.houlsby`), so ``from torch_impl.adapters import LoRA`` works as
``from speechbrain.nnet.adapters import LoRA`` does.

>>> from torch_impl.adapters import AdaptedModel, LoRA
>>> LoRA.__module__
'torch_impl.lora'
"""

from twinformat.errors import AdapterInsertionError

from .activations import Swish
from .adapted_model import MHA_WARNING, AdaptedModel, is_layer_adaptable, replace_module
from .houlsby import HoulsbyAdapterLinear
from .lora import LoRA

__all__ = [
    "MHA_WARNING",
    "AdaptedModel",
    "AdapterInsertionError",
    "HoulsbyAdapterLinear",
    "LoRA",
    "Swish",
    "is_layer_adaptable",
    "replace_module",
]
