"""Map tensor names where a user's twin names differ: ``rename=[(pattern, replacement), ...]``.

Framework-free. A pattern is a shell-style glob matched against the whole name, or, prefixed
with ``re:``, a regular expression matched against the whole name (``re.fullmatch``).

- Glob: every wildcard of the pattern (``*``, ``?``, ``[...]``) captures what it matched, and
  each ``*`` of the replacement is filled with the next capture, in order. The replacement
  must hold as many ``*`` as the pattern has wildcards (or none).
- Regex: the replacement is expanded with ``\\1``/``\\g<name>`` groups (``Match.expand``).

The first rule that matches a name wins; names no rule matches keep their name. A rule that
matches no name raises :class:`~twinformat.errors.NoMatchError` (a silent no-match is PEFT's
most reported pain), and two names renamed onto one raise :class:`RenameError`.

An adapter's names are renamed by module (:func:`module_renamer`): the rules match the dotted
names of the modules it adapts or holds whole (``model.language_model.layers.0.self_attn.q_proj``,
as the base model names them), and every tensor and record of a module follows it.

Example
-------
>>> names = ["blocks.0.fc1.weight", "blocks.1.fc1.weight", "head.weight"]
>>> renamed, applied = rename_keys(names, [("blocks.*.fc1.*", "layers.*.ffn.linear1.*")])
>>> renamed
['layers.0.ffn.linear1.weight', 'layers.1.ffn.linear1.weight', 'head.weight']
>>> rename_keys(["enc.l3.w"], [(r"re:enc\\.l(\\d+)\\.w", r"encoder.layers.\\1.weight")])[0]
['encoder.layers.3.weight']
>>> rename, notes = module_renamer(["lm.layers.0.fc1", "lm.layers.1.fc1"], [("lm.*", "model.*")])
>>> rename("lm.layers.0.fc1.adapter_down_proj.weight"), notes
('model.layers.0.fc1.adapter_down_proj.weight', ['renamed 2 of 2 modules, e.g. lm.layers.0.fc1 -> model.layers.0.fc1'])
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from twinformat.errors import NoMatchError, RenameError

__all__ = ["RenameError", "RenameRule", "module_renamer", "rename_keys"]

RenameRule = tuple[str, str]


def rename_keys(
    names: Iterable[str], rules: Sequence[RenameRule] | None, *, what: str = "tensor name"
) -> tuple[list[str], list[str]]:
    """Rename ``names`` by ``rules``; returns ``(new names in order, notes 'old -> new')``.
    ``what`` the names are, as a rule that matches none of them says."""
    names = list(names)
    if not rules:
        return names, []
    compiled = [_compile(rule) for rule in _checked_rules(rules)]
    used = [False] * len(compiled)
    out: list[str] = []
    notes: list[str] = []
    for name in names:
        new = name
        for index, (regex, expand) in enumerate(compiled):
            match = regex.fullmatch(name)
            if match:
                new = expand(match)
                used[index] = True
                break
        out.append(new)
        if new != name:
            notes.append(f"renamed {name} -> {new}")
    for (pattern, _), was_used in zip(rules, used, strict=True):
        if not was_used:
            sample = ", ".join(repr(n) for n in names[:8]) + (" ..." if len(names) > 8 else "")
            raise NoMatchError(f"rename pattern {pattern!r} matches no {what}. Some names are: {sample}")
    seen: dict[str, str] = {}
    for old, new in zip(names, out, strict=True):
        if new in seen:
            raise RenameError(f"rename maps both {seen[new]!r} and {old!r} onto {new!r}")
        seen[new] = old
    return out, notes


def module_renamer(
    modules: Iterable[str], rules: Sequence[RenameRule] | None
) -> tuple[Callable[[str], str], list[str]]:
    """Rename ``modules`` by ``rules`` (:func:`rename_keys`: a rule that matches no module raises
    :class:`~twinformat.errors.NoMatchError`, two modules renamed onto one :class:`RenameError`).

    Returns ``(rename, notes)``: ``rename`` maps a dotted name, a module's or one under it
    (``<module>.<tensor>``, ``<module>.<child>``), which follows the innermost of ``modules`` that
    holds it (a name under none of them keeps its name); ``notes`` says how many were renamed.
    """
    modules = list(dict.fromkeys(modules))
    renamed, _ = rename_keys(modules, rules, what="module name")
    new_of = dict(zip(modules, renamed, strict=True))
    changed = [(old, new) for old, new in new_of.items() if old != new]
    notes = [
        f"renamed {len(changed)} of {len(modules)} modules, e.g. {old} -> {new}" for old, new in changed[:1]
    ]
    innermost_first = sorted((m for m in modules if m), key=len, reverse=True)

    def rename(name: str) -> str:
        if name in new_of:
            return new_of[name]
        for module in innermost_first:
            if name.startswith(f"{module}."):
                return new_of[module] + name[len(module) :]
        return name

    return rename, notes


def _checked_rules(rules: Sequence[RenameRule]) -> list[RenameRule]:
    if isinstance(rules, (str, bytes)):
        raise RenameError(f"rename must be a list of (pattern, replacement) pairs, got the string {rules!r}")
    checked = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and all(isinstance(p, str) for p in rule)):
            raise RenameError(
                f"each rename rule must be a (pattern, replacement) pair of strings, got {rule!r}"
            )
        checked.append((rule[0], rule[1]))
    return checked


def _compile(rule: RenameRule):
    pattern, replacement = rule
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise RenameError(
                f"rename pattern {pattern!r} is not a valid regular expression: {exc}"
            ) from None

        def expand_regex(match: re.Match[str]) -> str:
            try:
                return match.expand(replacement)
            except (re.error, IndexError) as exc:
                raise RenameError(f"rename replacement {replacement!r} for {pattern!r}: {exc}") from None

        return regex, expand_regex
    regex, groups = _glob_to_regex(pattern)
    stars = replacement.count("*")
    if stars not in (0, groups):
        raise RenameError(
            f"rename replacement {replacement!r} has {stars} '*' but pattern {pattern!r} has {groups} wildcards; "
            "each '*' of the replacement takes the next wildcard's match"
        )
    pieces = replacement.split("*")

    def expand_glob(match: re.Match[str]) -> str:
        if stars == 0:
            return replacement
        captured = match.groups()
        return "".join(piece + (captured[i] if i < len(captured) else "") for i, piece in enumerate(pieces))

    return regex, expand_glob


def _glob_to_regex(pattern: str) -> tuple[re.Pattern[str], int]:
    """Translate a glob into a regex with one capture group per wildcard."""
    out, groups, i = [], 0, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            out.append("(.*)")
            groups += 1
        elif char == "?":
            out.append("(.)")
            groups += 1
        elif char == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("([" + body.replace("\\", "\\\\") + "])")
                groups += 1
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out)), groups
