"""Registration of SpeechBrain checkpoint hooks, without ever importing SpeechBrain ourselves.

SpeechBrain's ``Checkpointer`` finds a class's save/load hooks in registries filled by
``register_checkpoint_hooks``. We register ``AdaptedModel`` there only when the user's program
has already imported ``speechbrain.utils.checkpoints`` (importing SpeechBrain pulls in
torchaudio, which a plain PyTorch user may not have).
"""

from __future__ import annotations

import sys

_registered: set[type] = set()


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
    checkpoints = sys.modules.get("speechbrain.utils.checkpoints")
    if checkpoints is None:
        return False
    for klass in cls.__mro__:
        if klass not in _registered and any(_is_hook(m) for m in vars(klass).values()):
            checkpoints.register_checkpoint_hooks(klass)
            _registered.add(klass)
    _registered.add(cls)
    return True


def _is_hook(method: object) -> bool:
    return any(
        hasattr(method, marker)
        for marker in ("_speechbrain_saver", "_speechbrain_loader", "_speechbrain_transfer")
    )
