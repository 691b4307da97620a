"""Exact weight conversion between PyTorch and Flax NNX: the only package that knows both.

Built on :mod:`twinformat` (the rules both twins share) and the twins' bridges
(``torch_impl.interchange``, ``flax_impl.interchange``). Importing ``converters`` imports neither
torch nor jax: each framework is imported only when a conversion touches one of its models or a
pickled file, so a Flax-only install converts safetensors files without PyTorch, and the reverse.

- Models: :func:`torch_to_flax`, :func:`flax_to_torch` (models, checkpoint files or state dicts
  in; a model filled in place; a :class:`KeyReport` out).
- Files: :func:`save_torch_layout` (the interchange format), :func:`save_flax_layout` /
  :func:`load_flax_layout` (Flax names and layouts), :func:`convert_file` (streaming, between
  layouts and from pickled ``.ckpt``/``.pt``/``.bin``), :func:`merge_adapter_file`.
- PEFT: :func:`import_peft_adapter`, :func:`export_peft_adapter`.
- Command line: ``python -m converters --help`` (also installed as ``peft-twins-convert``).

>>> import converters
>>> converters.torch_to_flax.__module__, converters.KeyReport.__module__
('converters.convert', 'twinformat.format')
"""

from twinformat.errors import (
    AdapterError,
    CheckpointError,
    ConversionError,
    LayoutError,
    MergeError,
    NoMatchError,
    PeftConversionError,
    RenameError,
    UnknownLayerError,
)
from twinformat.format import KeyReport

from .convert import flax_to_torch, torch_to_flax
from .file_convert import convert_file
from .merge import merge_adapter_file
from .peft import export_peft_adapter, import_peft_adapter
from .saving import load_flax_layout, save_flax_layout, save_torch_layout

from twinformat._version import __version__

__all__ = [
    "AdapterError",
    "CheckpointError",
    "ConversionError",
    "KeyReport",
    "LayoutError",
    "MergeError",
    "NoMatchError",
    "PeftConversionError",
    "RenameError",
    "UnknownLayerError",
    "__version__",
    "convert_file",
    "export_peft_adapter",
    "flax_to_torch",
    "import_peft_adapter",
    "load_flax_layout",
    "merge_adapter_file",
    "save_flax_layout",
    "save_torch_layout",
    "torch_to_flax",
]
