"""LoRA and Houlsby adapters for Flax NNX, in one module as ``torch_impl.adapters`` (and
SpeechBrain's ``speechbrain.nnet.adapters``) has them: a facade over the files that hold each
concept (:mod:`~flax_impl.adapted_model`, :mod:`~flax_impl.lora`, :mod:`~flax_impl.houlsby`).

>>> from flax_impl.adapters import AdaptedModel, LoRA
>>> LoRA.__module__
'flax_impl.lora'
"""

from twinformat.errors import AdapterInsertionError

from .activations import Swish
from .adapted_model import AdaptedModel, TrainableFilter, is_layer_adaptable, replace_module
from .houlsby import HoulsbyAdapterLinear
from .lora import LoRA

__all__ = [
    "AdaptedModel",
    "AdapterInsertionError",
    "HoulsbyAdapterLinear",
    "LoRA",
    "Swish",
    "TrainableFilter",
    "is_layer_adaptable",
    "replace_module",
]
