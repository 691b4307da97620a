"""Exact weight conversion between PyTorch and Flax NNX, and the shared framework-free rules.

``converters.naming``, ``converters.layout`` and ``converters.checkpoint`` import neither torch
nor jax; the conversion functions import each framework only when called (a Flax-only install
converts safetensors files without PyTorch, and the reverse).

- Models: :func:`torch_to_flax`, :func:`flax_to_torch` (models, checkpoint files or state dicts
  in; a model filled in place; a :class:`~converters.checkpoint.KeyReport` out).
- Files: :func:`save_torch_layout` (the interchange format), :func:`save_flax_layout` /
  :func:`load_flax_layout` (Flax names and layouts), :func:`convert_file` (streaming, between
  layouts and from pickled ``.ckpt``/``.pt``/``.bin``), :func:`merge_adapter_file`.
- PEFT: :func:`import_peft_adapter`, :func:`export_peft_adapter`.
- Command line: ``python -m converters --help`` (also installed as ``peft-twins-convert``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {
    "torch_to_flax": "convert",
    "flax_to_torch": "convert",
    "save_torch_layout": "saving",
    "save_flax_layout": "saving",
    "load_flax_layout": "saving",
    "convert_file": "file_convert",
    "merge_adapter_file": "merge",
    "import_peft_adapter": "peft",
    "export_peft_adapter": "peft",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    # Lazy: ``import converters.naming`` must not pull in torch or jax.
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'converters' has no attribute {name!r}")
