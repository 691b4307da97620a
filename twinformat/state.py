"""A model seen in the interchange format: PyTorch names, dtypes and shapes, layer kinds, and
its tensors read on demand in PyTorch's layout.

Framework-free. Each twin's bridge (``torch_impl.interchange.model_state``,
``flax_impl.interchange.model_state``) describes a model as a :class:`FlatState`; planning reads
``specs`` and ``kinds`` only, and a tensor is read (and re-laid out) once, when it is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .dtypes import TensorSpec

__all__ = ["FlatState"]


def _unreadable(key: str) -> np.ndarray:
    raise KeyError(f"this state describes tensors by spec only; {key!r} cannot be read")


@dataclass
class FlatState:
    """A model's tensors under their PyTorch names.

    Attributes
    ----------
    specs : dict[str, TensorSpec]
        ``key -> (dtype string, shape)`` in PyTorch's layout, in ``state_dict()`` order.
    kinds : dict[str, str]
        ``layer -> kind`` for every layer of a known kind (from module types).
    unknown : dict[str, str]
        ``layer -> type name`` for layers that own tensors but have no known kind.
    aliases : dict[str, str]
        ``tied key -> the first key sharing its storage``.
    buffers : set[str]
        Keys known to be buffers, not weights (a torch model's ``named_buffers()``).
    framework : str
        ``'torch'`` or ``'flax'`` for a model, ``'file'`` or ``'dict'`` otherwise.
    layout : str
        The layout the tensors are stored in (``'torch'``, or ``'flax'`` for a Flax-layout file).
    adapter_only : bool
        An adapter checkpoint, which lacks the frozen base weights by design.
    unfrozen : tuple[str, ...]
        The ``unfrozen_layers`` patterns an adapter checkpoint records.
    read : callable
        ``read(key)`` returns the tensor in PyTorch's layout (possibly a non-contiguous view).
    """

    specs: dict[str, TensorSpec]
    kinds: dict[str, str] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    buffers: set[str] = field(default_factory=set)
    framework: str = "dict"
    layout: str = "torch"
    adapter_only: bool = False
    unfrozen: tuple[str, ...] = ()
    read: Callable[[str], np.ndarray] = field(default=_unreadable, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.specs)
