"""One error hierarchy for the whole library.

Every error we raise is an :class:`AdapterError`, itself a ``ValueError``; subclasses keep the
builtin bases users already catch (``KeyError`` for a name that is not there, ``TypeError`` for a
layer type we have no rule for, ``RuntimeError`` for a second insertion). Each package
re-exports the errors its users meet, so a torch-only user catches ``torch_impl.NoMatchError``
without importing ``converters``.

Example
-------
>>> issubclass(NoMatchError, ValueError), issubclass(LayoutError, KeyError)
(True, True)
>>> try:
...     raise UnknownLayerError("no rule for layer 'rnn'")
... except TypeError as exc:
...     isinstance(exc, AdapterError)
True
"""

from __future__ import annotations

from .report import KeyReport

__all__ = [
    "AdapterError",
    "AdapterInsertionError",
    "CheckpointError",
    "ConversionError",
    "LayoutError",
    "MergeError",
    "NoMatchError",
    "PeftConversionError",
    "RenameError",
    "UnknownAdapterError",
    "UnknownLayerError",
]


class AdapterError(ValueError):
    """Base of every error this library raises."""


class NoMatchError(AdapterError):
    """A pattern (or ``all_linear``/``all_conv``) selected no layer of the model."""


class AdapterInsertionError(AdapterError, RuntimeError):
    """Adapters were inserted twice, merged twice, or into a layer that cannot take them.

    An :class:`AdapterError` (so a ``ValueError``) like every error here, and also a
    ``RuntimeError``, so code written against either earlier base keeps catching it.
    """


class CheckpointError(AdapterError):
    """A checkpoint file, or its keys or shapes, does not fit what was asked of it."""


class ConversionError(CheckpointError):
    """A conversion or load was refused; ``report`` lists the missing, unexpected and mis-shaped
    keys. The target was left unchanged."""

    def __init__(self, message: str, report: KeyReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class PeftConversionError(CheckpointError):
    """A PEFT adapter, or one of ours, uses something the other side cannot represent."""


class LayoutError(AdapterError, KeyError):
    """A layer kind that is not known, or a parameter name the kind does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; ours is a sentence.
        return str(self.args[0]) if self.args else ""


class UnknownAdapterError(AdapterError, KeyError):
    """An adapter class that no declaration describes (see :mod:`twinformat.adapters`)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownLayerError(AdapterError, TypeError):
    """A tensor belongs to a layer type whose PyTorch <-> Flax layout is not known."""


class MergeError(AdapterError):
    """The adapter cannot be merged (Houlsby has a nonlinearity; a file does not fit)."""


class RenameError(AdapterError):
    """A rename rule is malformed, or maps two names onto one."""
