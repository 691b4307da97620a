"""Whole Whisper on both sides: transformers' ``WhisperForConditionalGeneration`` / ``WhisperModel``
against the Flax twins, from small configs with every weight perturbed, and the reference greedy loop.

Small configs keep the real structure: distinct encoder and decoder widths of heads, two layers
each, a vocabulary with suppressed tokens, a short frame count (``max_source_positions=12``: 24
feature frames) for most tests and the released 1500 positions (3000 frames, 30 s) for one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flax import nnx

import converters
from flax_impl import models as flax_models

from .bert import transformers_module

#: A small whisper: two encoder and two decoder layers, 4 decoder heads against 2 encoder heads,
#: suppressed tokens and a begin-suppressed end of sequence, as the released configs have.
TINY = dict(
    d_model=16,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_layers=2,
    decoder_attention_heads=4,
    decoder_ffn_dim=32,
    num_mel_bins=8,
    max_source_positions=12,
    max_target_positions=24,
    vocab_size=64,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=3,
    decoder_start_token_id=2,
    suppress_tokens=[5, 7, 60],
    begin_suppress_tokens=[3, 9],
)
#: The same with the released 1500 encoder positions and 80 mel bins: 30 s of features.
FULL_LENGTH = {**TINY, "num_mel_bins": 80, "max_source_positions": 1500}

#: A two-row decoder batch, the second row padded after three tokens (pad_token_id 1).
DECODER_IDS = np.array([[2, 10, 11, 12, 13, 14], [2, 20, 21, 1, 1, 1]], np.int64)
DECODER_MASK = (np.arange(6)[None, :] < np.array([[6], [3]])).astype(np.int64)


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter (norms, biases and position tables too): no default stands in
    for a weight. Tied parameters are perturbed once (``parameters()`` yields them once)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


#: The perturbation that makes a random model's greedy tokens depend on context (at 0.05 every
#: step repeats one token, which would test little of the cache).
DECODING_SCALE = 0.5


def torch_model(
    config: dict[str, Any] | None = None, *, head: bool = True, seed: int = 0, scale: float = 0.05
) -> torch.nn.Module:
    """transformers' ``WhisperForConditionalGeneration`` (``head``) or ``WhisperModel``, perturbed
    by noise of std ``scale``, eval mode."""
    transformers = transformers_module()
    torch.manual_seed(seed)
    cls = transformers.WhisperForConditionalGeneration if head else transformers.WhisperModel
    return perturb(cls(transformers.WhisperConfig(**(config or TINY))), seed, scale).eval()


def flax_twin(model: torch.nn.Module, **kwargs: Any) -> nnx.Module:
    """The Flax twin of ``model`` (head or not), filled by ``converters.torch_to_flax``, eval mode."""
    from tests.equivalence.harness import placeholder

    cls = (
        flax_models.WhisperForConditionalGeneration
        if hasattr(model, "proj_out")
        else flax_models.WhisperModel
    )
    twin = placeholder(lambda: cls(model.config, rngs=nnx.Rngs(0), **kwargs))
    twin.eval()
    converters.torch_to_flax(model, twin)
    return twin


def features(config: dict[str, Any] | None = None, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Log-mel-like features ``(batch, num_mel_bins, 2 * max_source_positions)``."""
    config = config or TINY
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, config["num_mel_bins"], 2 * config["max_source_positions"])).astype(
        np.float32
    )


def torch_greedy(
    model: torch.nn.Module,
    input_features: np.ndarray,
    prompt: np.ndarray,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> np.ndarray:
    """The reference: a plain greedy loop over the transformers model (the whole sequence each
    step, no cache), with transformers' own suppress-token logits processors of the config; rows
    that produced ``eos_token_id`` continue with it."""
    from transformers.generation.logits_process import (
        SuppressTokensAtBeginLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    config = model.config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    processors = []
    if config.suppress_tokens:
        processors.append(SuppressTokensLogitsProcessor(config.suppress_tokens))
    if config.begin_suppress_tokens:
        processors.append(SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, prompt.shape[1]))
    tokens = torch.from_numpy(np.asarray(prompt, np.int64))
    features_t = torch.from_numpy(input_features)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool)
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(features_t)
        for _ in range(max_new_tokens):
            logits = model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens).logits[:, -1]
            for processor in processors:
                logits = processor(tokens, logits)
            next_token = logits.argmax(-1)
            if eos is not None:
                next_token = torch.where(done, torch.tensor(eos), next_token)
                done |= next_token == eos
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return tokens.numpy()
