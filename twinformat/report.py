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

__all__ = ["KeyReport", "compare_keys", "misfit_message", "prefix_hint"]


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
    hint = prefix_hint(report.unexpected, report.missing)
    if hint is not None:
        report.notes.append(hint)
    return report


def prefix_hint(unexpected: list[str], missing: list[str], *, strip: str = "") -> str | None:
    """A note when most ``unexpected`` keys are ``missing`` ones under another prefix (a file
    written for a model whose modules sit elsewhere: a multimodal model's language model, a
    wrapper's ``model.``), naming the two prefixes; None when no prefix explains at least two keys
    and half of the unexpected ones.

    Each unexpected key is matched on its longest dotted tail that ends a missing key. ``strip``:
    a leading part of the keys that is not in the names a rename rule sees (an ``AdaptedModel``'s
    ``adapted_model.``, for rules on module names).

    >>> prefix_hint(["model.language_model.layers.0.q.weight", "model.language_model.layers.1.q.weight"],
    ...             ["model.layers.0.q.weight", "model.layers.1.q.weight"])  # doctest: +NORMALIZE_WHITESPACE
    "2 of the 2 unexpected keys are missing ones under another prefix: the file's
    'model.language_model.<rest>' is this model's 'model.<rest>' (rename them, e.g. with the
    converters' --rename 'model.language_model.*' 'model.*', or load into the model the file was
    written for)"
    >>> prefix_hint(["a.weight"], ["b.weight"]) is None  # one key is no pattern
    True
    """
    if len(unexpected) < 2 or not missing:
        return None
    unexpected, missing = (
        [k[len(strip) :] if k.startswith(strip) else k for k in keys] for keys in (unexpected, missing)
    )
    heads: dict[str, set[str]] = {}  # dotted tail of a missing key -> the heads before it
    for key in missing:
        parts = key.split(".")
        for i in range(len(parts)):
            heads.setdefault(".".join(parts[i:]), set()).add(".".join(parts[:i]))
    counts: dict[tuple[str, str], int] = {}
    for key in unexpected:
        parts = key.split(".")
        for i in range(len(parts)):  # the longest tail first
            tail = ".".join(parts[i:])
            if tail in heads:
                if len(heads[tail]) == 1:
                    pair = (".".join(parts[:i]), next(iter(heads[tail])))
                    counts[pair] = counts.get(pair, 0) + 1
                break
    if not counts:
        return None
    (theirs, ours), count = max(counts.items(), key=lambda item: item[1])
    if theirs == ours or count < 2 or 2 * count < len(unexpected):
        return None
    file_prefix, model_prefix = (f"{p}." if p else "" for p in (theirs, ours))
    return (
        f"{count} of the {len(unexpected)} unexpected keys are missing ones under another prefix: the "
        f"file's '{file_prefix}<rest>' is this model's '{model_prefix}<rest>' (rename them, e.g. with the "
        f"converters' --rename '{file_prefix}*' '{model_prefix}*', or load into the model the file was "
        "written for)"
    )


def misfit_message(where: str, report: KeyReport, missing: list[str]) -> str:
    """Why the adapter checkpoint ``where`` does not fit an ``AdaptedModel`` (both twins'
    ``loader``): its unexpected and mis-shaped keys in ``report``, the trainable keys it lacks
    (``missing``), and :func:`prefix_hint`'s rename when another prefix explains them.

    >>> report = compare_keys({"lm.q.w": (2,), "lm.k.w": (2,)}, {"adapted_model.q.w": (2,), "adapted_model.k.w": (2,)})
    >>> misfit_message("a.ckpt", report, report.missing).split("; ")[0]  # doctest: +NORMALIZE_WHITESPACE
    "checkpoint 'a.ckpt' does not fit this AdaptedModel: unexpected keys ['lm.q.w', 'lm.k.w'],
    mis-shaped keys [], missing trainable keys ['adapted_model.q.w', 'adapted_model.k.w']"
    """
    hint = prefix_hint(report.unexpected, missing, strip="adapted_model.")
    return (
        f"checkpoint {where!r} does not fit this AdaptedModel: "
        f"unexpected keys {report.unexpected}, mis-shaped keys {report.mismatched}, "
        f"missing trainable keys {missing}" + (f"; {hint}" if hint else "")
    )
