"""What a load or conversion did with each key: :class:`KeyReport`, and :func:`compare_keys`, which
makes one from the shapes a checkpoint holds and the shapes a model expects.

The bottom of ``twinformat``: it imports nothing of the package, so the errors that carry a report
(:class:`~twinformat.errors.CheckpointError`) and the format that fills one both sit above it.

Example
-------
>>> report = compare_keys({"a": (2, 3), "b": (4,)}, {"a": (2, 3), "c": (1,)})
>>> report.missing, report.unexpected, report.mismatched, report.ok
(['c'], ['b'], [], False)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["KeyReport", "compare_keys"]


@dataclass
class KeyReport:
    """What a load or conversion did with each key: the three lists users ask for."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        """Human-readable summary, each list capped at ``limit`` names."""
        lines = [f"loaded: {len(self.loaded)}"]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped", self.mismatched),
            ("notes", self.notes),
        ):
            if keys:
                shown = ", ".join(keys[:limit]) + (
                    f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
                )
                lines.append(f"{label} ({len(keys)}): {shown}")
        return "\n".join(lines)


def compare_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> KeyReport:
    """Compare ``{key: shape}`` of a checkpoint with what the model expects.

    ``mismatched`` entries read ``"key: file (a, b) vs model (c, d)"``.
    """
    report = KeyReport()
    for key, shape in found.items():
        if key not in expected:
            report.unexpected.append(key)
        elif tuple(shape) != tuple(expected[key]):
            report.mismatched.append(f"{key}: file {tuple(shape)} vs model {tuple(expected[key])}")
        else:
            report.loaded.append(key)
    report.missing = [key for key in expected if key not in found]
    return report
