"""The rules both twins share, framework-free: dotted names and glob matching, the layer-kind
table, the checkpoint format, the adapter vocabulary and the error hierarchy.

Imports numpy, ml_dtypes and safetensors at most; never torch, jax, flax, ``torch_impl``,
``flax_impl`` or ``converters``. ``torch_impl`` and ``flax_impl`` build on it, and
``converters`` on all three.

>>> from twinformat import get_kind, LORA
>>> get_kind("linear").params[0]
Param(torch='weight', flax='kernel', layout='o i -> i o')
>>> LORA.defaults
{'rank': 16, 'alpha': 1.0, 'dropout': 0.0, 'use_rslora': False, 'use_dora': False}
"""

from __future__ import annotations

from ._version import __version__
from .adapters import ADAPTERS, HOULSBY, LORA, AdapterKind, get_adapter, register_adapter
from .errors import (
    AdapterError,
    AdapterInsertionError,
    CheckpointError,
    ConversionError,
    LayoutError,
    MergeError,
    NoMatchError,
    PeftConversionError,
    RenameError,
    UnknownAdapterError,
    UnknownLayerError,
)
from .kinds import KINDS, LayerKind, Param, get_kind, register_kind
from .report import KeyReport

__all__ = [
    "ADAPTERS",
    "HOULSBY",
    "KINDS",
    "LORA",
    "AdapterError",
    "AdapterInsertionError",
    "AdapterKind",
    "CheckpointError",
    "ConversionError",
    "KeyReport",
    "LayerKind",
    "LayoutError",
    "MergeError",
    "NoMatchError",
    "Param",
    "PeftConversionError",
    "RenameError",
    "UnknownAdapterError",
    "UnknownLayerError",
    "__version__",
    "get_adapter",
    "get_kind",
    "register_adapter",
    "register_kind",
]
