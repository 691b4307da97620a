"""Flax NNX adapters (LoRA, Houlsby): the twin of ``torch_impl``, with the same names.

Needs only jax and flax (and numpy, safetensors): the rules shared with the PyTorch twin live in
:mod:`twinformat`, and the errors a Flax user meets are re-exported here.

>>> import jax
>>> from flax import nnx
>>> from flax_impl import AdaptedModel, LoRA
>>> model = AdaptedModel(nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0))), LoRA,
...                      target_layers="layers.0", adapter_kwargs={"rank": 2}, rngs=nnx.Rngs(1))
>>> sum(x.size for x in jax.tree.leaves(nnx.state(model, model.trainable)))
16
"""

try:
    import flax.nnx as _nnx  # noqa: F401
    import jax as _jax  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised in the torch-only CI environment
    raise ImportError("flax_impl needs JAX and Flax: pip install 'peft-twins[jax]'") from _exc

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

from . import adapters as adapters  # the SpeechBrain-style facade: flax_impl.adapters.LoRA, ...
from .activations import Swish
from .adapted_model import AdaptedModel, TrainableFilter, is_layer_adaptable, replace_module
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
    "TrainableFilter",
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
