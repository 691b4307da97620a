"""Dotted names for the modules of an NNX graph: the same strings PyTorch's ``named_modules()``
gives for the twin model, so one list of glob patterns selects the same layers in both.

Example
-------
>>> from flax import nnx
>>> class Block(nnx.Module):
...     def __init__(self, rngs):
...         self.layers = nnx.List([nnx.Linear(2, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)])
>>> [name for name, _ in named_modules(Block(nnx.Rngs(0)))]
['', 'layers', 'layers.0', 'layers.1']
"""

from __future__ import annotations

from collections.abc import Iterator

from flax import nnx

from twinformat.names import dotted, parent_and_leaf

__all__ = ["get_submodule", "named_modules", "set_submodule"]


def named_modules(module: nnx.Module, prefix: str = "") -> Iterator[tuple[str, nnx.Module]]:
    """Yield ``(dotted_name, module)`` for ``module`` and every submodule, parents first.

    The root is named ``''``; list and tuple indices appear as digits (``blocks.0.linear1``).
    A module reachable by two paths is yielded once, under the first.
    """
    seen: set[int] = set()

    def walk(node: nnx.Module, name: str) -> Iterator[tuple[str, nnx.Module]]:
        if id(node) in seen:
            return
        seen.add(id(node))
        yield name, node
        for key, child in nnx.iter_module_children(node):
            if not isinstance(child, nnx.Module):  # e.g. the RngStream inside nnx.Dropout(rngs=...)
                continue
            yield from walk(child, dotted((name, key)) if name else str(key))

    yield from walk(module, prefix)


def get_submodule(module: nnx.Module, name: str) -> nnx.Module:
    """Return the submodule at dotted ``name`` (``''`` is ``module`` itself).

    Raises ``AttributeError`` naming the first missing part.
    """
    node = module
    if not name:
        return node
    walked = []
    for part in name.split("."):
        walked.append(part)
        node = _child(node, part, ".".join(walked))
    return node


def set_submodule(module: nnx.Module, name: str, new_module: nnx.Module) -> None:
    """Put ``new_module`` at dotted ``name``, assigning it on its parent (attribute or index)."""
    parent_name, leaf = parent_and_leaf(name)
    parent = get_submodule(module, parent_name)
    if isinstance(parent, (list, nnx.List)) or (leaf.isdigit() and not hasattr(parent, leaf)):
        parent[int(leaf)] = new_module  # type: ignore[index]  # nnx.List, or a list-like module
    elif isinstance(parent, dict):
        parent[leaf] = new_module
    else:
        setattr(parent, leaf, new_module)


def _child(node: object, part: str, where: str) -> nnx.Module:
    if part.isdigit() and isinstance(node, (list, tuple, nnx.List)):
        index = int(part)
        if index < len(node):
            return node[index]
    elif isinstance(node, dict) and part in node:
        return node[part]
    elif hasattr(node, part):
        return getattr(node, part)
    raise AttributeError(f"no submodule {where!r}: {type(node).__name__} has no {part!r}")
