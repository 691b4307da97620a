"""Dotted layer names and the glob patterns that select them.

Framework-free: both ``torch_impl`` and ``flax_impl`` call these functions, so a list of
patterns selects the same layers in a PyTorch model and in its Flax twin. A layer's name is
PyTorch's ``named_modules()`` name, which for an NNX model is its graph path joined with dots
(list indices as digits).

Example
-------
>>> as_patterns("layer1")
('layer1',)
>>> matches_any("encoder.layers.3.ffn", ["encoder.layers.*.ffn"])
True
>>> dotted(("blocks", 0, "linear1"))
'blocks.0.linear1'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase

from .errors import NoMatchError

__all__ = [
    "NoMatchError",
    "as_patterns",
    "check_all_matched",
    "check_flags",
    "check_layer_kwargs_names",
    "dotted",
    "matches_any",
    "matches_unfrozen",
    "parent_and_leaf",
]


def as_patterns(patterns: str | Iterable[str] | None) -> tuple[str, ...]:
    """Return ``patterns`` as a tuple; a single string is one pattern, not its characters.

    SpeechBrain iterates a string's characters, so ``"layer1"`` there matches every
    one-letter name; here it is the pattern ``"layer1"``.
    """
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    out = tuple(patterns)
    for pattern in out:
        if not isinstance(pattern, str):
            raise TypeError(f"layer patterns must be strings, got {pattern!r} ({type(pattern).__name__})")
    return out


def check_flags(**flags: object) -> None:
    """Refuse a layer pattern given where ``AdaptedModel`` takes a flag (``all_linear``,
    ``all_conv``): SpeechBrain's signature puts ``all_linear`` third, so
    ``AdaptedModel(model, LoRA, ["*query"])`` reads as ``all_linear=True`` and adapts every linear
    layer, silently, in SpeechBrain. A ``bool`` (or 0/1) passes.

    >>> check_flags(all_linear=True, all_conv=0)
    >>> check_flags(all_linear=["*query"])
    Traceback (most recent call last):
    ...
    TypeError: all_linear must be True or False, got ['*query']: layer names go in target_layers=[...] (all_linear is the third positional argument, as in SpeechBrain's AdaptedModel)
    """
    for name, value in flags.items():
        if not isinstance(value, (str, bytes)) and not hasattr(value, "__len__") and value in (True, False):
            continue  # a bool, 0/1, numpy's bool
        raise TypeError(
            f"{name} must be True or False, got {value!r:.100}: layer names go in target_layers=[...] "
            f"({name} is the {'third' if name == 'all_linear' else 'fourth'} positional argument, as in "
            "SpeechBrain's AdaptedModel)"
        )


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """True when ``name`` is non-empty and matches one of the shell-style ``patterns``.

    Matching is case-sensitive on every platform (``fnmatch.fnmatchcase``), so a pattern
    list selects the same layers wherever it runs.
    """
    return bool(name) and any(fnmatchcase(name, pattern) for pattern in patterns)


def matches_unfrozen(name: str, patterns: Sequence[str]) -> bool:
    """Whether an ``unfrozen_layers`` pattern selects the module called ``name``.

    Unlike ``target_layers`` (whose matching skips the root), SpeechBrain fnmatches the root's
    empty name here too, so ``"*"`` unfreezes the parameters the root module holds itself.

    >>> matches_unfrozen("", ["*"]), matches_any("", ["*"])
    (True, False)
    """
    return matches_any(name, patterns) or (not name and any(fnmatchcase("", p) for p in patterns))


def check_all_matched(patterns: Sequence[str], names: Sequence[str], *, argument: str) -> None:
    """Raise :class:`NoMatchError` for the first pattern that matches none of ``names``.

    The message lists the pattern and some real layer names, so a typo is visible at once
    instead of training a model with no adapters.
    """
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names if name):
            raise NoMatchError(
                f"{argument} pattern {pattern!r} matches no layer of the model. "
                f"Some layer names are: {_sample(names)}"
            )


def check_layer_kwargs_names(layer_kwargs: Mapping[str, object], adapted: Sequence[str]) -> None:
    """Raise :class:`NoMatchError` for a ``layer_adapter_kwargs`` key that names no layer the
    model adapts (a typo would otherwise give that layer the model-wide options silently).

    >>> check_layer_kwargs_names({"fc1": {"rank": 4}}, ["fc1", "fc2"])
    >>> check_layer_kwargs_names({"fc3": {"rank": 4}}, ["fc1", "fc2"])
    Traceback (most recent call last):
    ...
    twinformat.errors.NoMatchError: layer_adapter_kwargs names 'fc3', which is not a layer this model adapts; it adapts: 'fc1', 'fc2'
    """
    for name in layer_kwargs:
        if name not in adapted:
            raise NoMatchError(
                f"layer_adapter_kwargs names {name!r}, which is not a layer this model adapts; "
                f"it adapts: {_sample(adapted)}"
            )


def dotted(path: Iterable[object]) -> str:
    """Join a graph path such as ``('blocks', 0, 'linear1')`` into ``'blocks.0.linear1'``."""
    return ".".join(str(part) for part in path)


def parent_and_leaf(name: str) -> tuple[str, str]:
    """Split ``'a.b.c'`` into ``('a.b', 'c')``; a top-level name has parent ``''``."""
    if not name:
        raise ValueError("an empty name has no parent: the root module cannot be replaced")
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


def _sample(names: Sequence[str], limit: int = 12) -> str:
    real = [name for name in names if name]
    shown = ", ".join(repr(name) for name in real[:limit])
    more = f" ... ({len(real) - limit} more)" if len(real) > limit else ""
    return (shown + more) if real else "(the model has no named submodules)"
