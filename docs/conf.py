"""Sphinx configuration of the peft-twins documentation (MyST Markdown, furo, autodoc + napoleon).

Build (what ``.ci/run`` does; warnings are errors, every cross-reference must resolve)::

    .venv/bin/python -m sphinx -W --keep-going -n -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# autodoc imports the packages: CPU only, offline, and no jax preallocation on a GPU machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from twinformat._version import __version__  # noqa: E402  (the one version source)

project = "peft-twins"
author = "the peft-twins authors"
copyright = "2026, the peft-twins authors"
release = __version__
version = __version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "results"]  # results/: generated tables, included by the pages
myst_heading_anchors = 3

# autodoc: members as each package's __all__ lists them, in source order, type hints in the text.
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# Nitpicky builds (-n) must resolve every reference. No intersphinx: CI has no network, so
# references into these third-party libraries cannot resolve and are the only ones ignored.
nitpicky = True
# The standard library is in the same position (no inventory offline).
_THIRD_PARTY = (
    r"(torch|nn|jax|jnp|flax|nnx|numpy|np|optax|safetensors|transformers|peft|speechbrain|ml_dtypes"
    r"|os|collections|typing|pathlib|re|PathLike)"
)
nitpick_ignore_regex = [(r"py:.*", _THIRD_PARTY + r"(\..*)?")]

html_theme = "furo"
html_title = f"peft-twins {release}"


# --- references to our own names that the API pages document under another path ----------------
# The API reference documents each package's public names (its ``__all__``) at package level, so
# a docstring's reference to where a name is defined (``twinformat.format.KeyReport``,
# ``flax_impl.models.pretrained.from_pretrained``) or to a bare name in scope where it was written
# (``CheckpointError``) links to that public entry. A reference to a name that exists in our code
# but is not public (``converters.sharded.write_sharded``) renders as code, without a link. A
# reference to nothing (a typo, a name since removed) still warns, and fails the build.
import importlib  # noqa: E402

from docutils import nodes  # noqa: E402
from sphinx import addnodes  # noqa: E402

_OURS = ("twinformat", "torch_impl", "flax_impl", "converters")


def _lookup(dotted: str):
    """The object at ``dotted`` (a module or a module attribute), or a sentinel if none."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return _MISSING
        return obj
    return _MISSING


_MISSING = object()


def _documented_name(domain, obj, kind: str) -> str | None:
    """The documented (non-alias) name of ``obj``, if the API pages document it."""
    for name, entry in domain.objects.items():
        if entry.aliased or name.split(".")[0] not in _OURS:
            continue
        if _lookup(name) is obj and (kind == "mod") == (entry.objtype == "module"):
            return name
    return None


def _candidates(target: str, node) -> list[str]:
    """Where ``target`` may live: as written, or in scope of the object whose docstring wrote it."""
    if target.split(".")[0] in _OURS:
        return [target]
    found = []
    module, klass = node.get("py:module"), node.get("py:class")
    # the object whose docstring holds the reference: "...:docstring of flax_impl.models.pretrained.f"
    written_in = (node.source or "").rpartition("docstring of ")[2] or None
    for scope in filter(None, [module and klass and f"{module}.{klass}", written_in, module]):
        owner = _lookup(scope)
        if owner is _MISSING:
            continue
        home = getattr(owner, "__module__", None) if not isinstance(owner, type(importlib)) else scope
        for where in filter(None, [scope, home]):
            found.append(f"{where}.{target}")
    return found


# Words our numpy-style docstrings use in a ``name : type`` line that name no Python type
# ("str or path, optional", "list of (pattern, replacement)"): they render as written. Literals
# such as ``{'flax', 'torch'}`` too.
_TYPE_WORDS = {"optional", "path", "mapping", "class", "state dict", "pattern", "replacement", "str to str"}


def _resolve_ours(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    if node.get("reftype") == "class" and (
        target in _TYPE_WORDS or target[:1] in "'\"{" or target[-1:] in "'\"}"
    ):
        return contnode
    domain = env.get_domain("py")
    kind = node.get("reftype")
    for candidate in _candidates(node["reftarget"], node):
        obj = _lookup(candidate)
        if obj is _MISSING:
            continue
        name = _documented_name(domain, obj, kind)
        if name is not None:
            return domain.resolve_xref(env, node["refdoc"], app.builder, kind, name, node, contnode)
        return nodes.literal(node["reftarget"], node["reftarget"])
    return None


def _napoleon_reads_properties_as_prose(app) -> None:
    """Napoleon reads a property docstring's first line ``Text: more`` as ``type: description``;
    ours are prose ("The effective weight, in the wrapped layer's layout: ..."). Give napoleon
    properties as methods: their sections are still parsed, their first line stays text."""
    from sphinx.ext.napoleon import _process_docstring

    listeners = app.events.listeners["autodoc-process-docstring"]
    for listener in list(listeners):
        if listener.handler is _process_docstring:
            app.disconnect(listener.id)

    def process(app, what, name, obj, options, lines):
        _process_docstring(app, "method" if what == "property" else what, name, obj, options, lines)

    app.connect("autodoc-process-docstring", process)


def _either_twin(app, doctree) -> None:
    """In ``converters`` (the package that knows both twins) a bare twin name such as
    ``AdaptedModel`` in a type means either twin's class: render it as text rather than let
    Sphinx pick one of the two (it warns that the reference is ambiguous)."""
    import flax_impl
    import torch_impl

    both = set(torch_impl.__all__) & set(flax_impl.__all__)
    for node in list(doctree.findall(addnodes.pending_xref)):
        if (
            node.get("refdomain") == "py"
            and (node.get("py:module") or "").split(".")[0] == "converters"
            and node["reftarget"] in both
            and not hasattr(importlib.import_module("converters"), node["reftarget"])
        ):
            node.replace_self(node.children[0] if node.children else nodes.Text(node["reftarget"]))


def setup(app):
    app.connect("missing-reference", _resolve_ours)
    app.connect("doctree-read", _either_twin)
    app.connect("builder-inited", _napoleon_reads_properties_as_prose)
