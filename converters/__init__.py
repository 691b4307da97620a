"""Exact weight conversion between PyTorch and Flax NNX: the only package that knows both.

Built on :mod:`twinformat` (the rules both twins share) and the twins' bridges
(``torch_impl.interchange``, ``flax_impl.interchange``). Importing ``converters`` imports neither
torch nor jax: each framework is imported only when a conversion touches one of its models or a
pickled file, so a Flax-only install converts safetensors files without PyTorch, and the reverse.

- Models: :func:`torch_to_flax`, :func:`flax_to_torch` (models, checkpoint files or state dicts
  in; a model filled in place; a :class:`KeyReport` out).
- Files: :func:`save_torch_layout` (the torch layout, PyTorch's names and layouts),
  :func:`save_flax_layout` / :func:`load_flax_layout` (Flax names and layouts),
  :func:`convert_file` (streaming, between layouts and from pickled ``.ckpt``/``.pt``/``.bin``),
  :func:`merge_adapter_file`.
- Sharded checkpoints: :func:`convert_sharded`, :func:`save_sharded`, :func:`load_flax_sharded`.
- PEFT: :func:`import_peft_adapter`, :func:`export_peft_adapter`.
- Command line: ``python -m converters --help`` (also installed as ``peft-twins-convert``).

The package is a stack of floors; a module imports only modules of its own floor or below, and
no two modules import each other in a circle (``tests/converters/test_stack.py`` walks the
imports, function-level ones included):

1. storage: :mod:`~converters.files` (reading any checkpoint, single or sharded; writing
   safetensors), :mod:`~converters.sharded` (writing sharded folders);
2. views: :mod:`~converters.rename` (rename rules), :mod:`~converters.views` (lazy tensor views,
   layout changes, the layer kinds of a file);
3. conversion: :mod:`~converters.sides` (the two sides of a conversion: models, files, state
   dicts), :mod:`~converters.convert` (models), :mod:`~converters.file_convert` (files),
   :mod:`~converters.sharded_flax` (a sharded checkpoint onto devices);
4. features: :mod:`~converters.saving`, :mod:`~converters.sharded_save`,
   :mod:`~converters.merge`, :mod:`~converters.peft`;
5. the command line: :mod:`~converters.cli` (``python -m converters``).

>>> import converters
>>> converters.torch_to_flax.__module__, converters.KeyReport.__module__
('converters.convert', 'twinformat.report')
"""

from twinformat._version import __version__
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
from twinformat.report import KeyReport

from .convert import flax_to_torch, torch_to_flax
from .file_convert import convert_file, convert_sharded
from .merge import merge_adapter_file
from .peft import export_peft_adapter, import_peft_adapter
from .saving import load_flax_layout, save_flax_layout, save_torch_layout
from .sharded_flax import load_flax_sharded
from .sharded_save import save_sharded

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
    "convert_sharded",
    "export_peft_adapter",
    "flax_to_torch",
    "import_peft_adapter",
    "load_flax_layout",
    "load_flax_sharded",
    "merge_adapter_file",
    "save_flax_layout",
    "save_sharded",
    "save_torch_layout",
    "torch_to_flax",
]
