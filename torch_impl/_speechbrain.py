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
    """Register ``cls``'s hooks when SpeechBrain's checkpoint module is imported; idempotent."""
    if cls in _registered:
        return True
    checkpoints = sys.modules.get("speechbrain.utils.checkpoints")
    if checkpoints is None:
        return False
    checkpoints.register_checkpoint_hooks(cls)
    _registered.add(cls)
    return True
