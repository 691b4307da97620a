"""Keep SpeechBrain's import side effects from leaking into other tests of the same process."""

from __future__ import annotations

import sys

import pytest

from tests.torch_impl.twins import purge_speechbrain_lazy_modules


@pytest.fixture(autouse=True)
def _no_speechbrain_lazy_modules_after_the_test():
    """Any SpeechBrain import a test makes (e.g. ``speechbrain.utils.checkpoints``) may register
    more lazy placeholders; remove them so Hypothesis tests elsewhere keep working."""
    yield
    if "speechbrain" in sys.modules:
        purge_speechbrain_lazy_modules()
