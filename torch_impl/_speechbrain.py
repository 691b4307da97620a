"""Registration of SpeechBrain checkpoint hooks, without ever importing SpeechBrain ourselves.

SpeechBrain's ``Checkpointer`` finds a class's save/load hooks in registries filled by
``register_checkpoint_hooks``. We never import SpeechBrain (it pulls in torchaudio, which a plain
PyTorch user may not have), so the registration waits for the user's program to import
``speechbrain.utils.checkpoints``: at once when it is already imported, otherwise the moment it
is (a finder on ``sys.meta_path`` watches for that one module and registers every waiting class
after it runs). The hooks are thus in place whichever of the two is imported first (0.1 registered
only when SpeechBrain came first: an ``AdaptedModel`` built before ``import speechbrain`` was saved
whole by a ``Checkpointer``, frozen base included).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

_CHECKPOINTS = "speechbrain.utils.checkpoints"
_registered: set[type] = set()
_waiting: set[type] = set()


def mark_hooks(saver, loader, transfer) -> None:
    """Set the attributes SpeechBrain's ``mark_as_*`` decorators set, without importing it."""
    saver._speechbrain_saver = True
    loader._speechbrain_loader = True
    transfer._speechbrain_transfer = True


def register_if_loaded(cls: type) -> bool:
    """Register the hooks of ``cls`` and its bases when SpeechBrain's checkpoint module is
    imported; idempotent.

    SpeechBrain's ``register_checkpoint_hooks`` only looks at a class's own ``__dict__`` (and
    its ``Checkpointer`` then searches the MRO), so each class that defines hooks is registered
    itself: a subclass of ``AdaptedModel`` that overrides none still gets ``AdaptedModel``'s.
    """
    if cls in _registered:
        return True
    checkpoints = sys.modules.get(_CHECKPOINTS)
    if checkpoints is None:
        _wait_for_import(cls)
        return False
    _register(cls, checkpoints)
    return True


def _register(cls: type, checkpoints: ModuleType) -> None:
    for klass in cls.__mro__:
        if klass not in _registered and any(_is_hook(m) for m in vars(klass).values()):
            checkpoints.register_checkpoint_hooks(klass)
            _registered.add(klass)
    _registered.add(cls)


def _wait_for_import(cls: type) -> None:
    """Register ``cls`` as soon as SpeechBrain's checkpoint module is imported."""
    _waiting.add(cls)
    if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``speechbrain.utils.checkpoints`` is being imported, it lets the
    other finders find it and wraps the module's execution so that the waiting classes are
    registered right after the module has run; then it takes itself off ``sys.meta_path``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _CHECKPOINTS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            for cls in sorted(_waiting, key=lambda c: c.__qualname__):
                _register(cls, module)
            _waiting.clear()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _is_hook(method: object) -> bool:
    return any(
        hasattr(method, marker)
        for marker in ("_speechbrain_saver", "_speechbrain_loader", "_speechbrain_transfer")
    )
