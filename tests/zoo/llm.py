"""The LLM families on both sides: transformers' ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma3ForCausalLM`` and the Flax twins of
``flax_impl.models`` (``llama.py`` ... ``gemma3.py``).

Small configs (hidden 32, two or three layers, vocabulary 64) with the options the released
checkpoints use switched on where the family has them: GQA, a ``head_dim`` off ``hidden / heads``,
biases, tied embeddings, each RoPE type, sliding windows shorter than the batch (so the window
cuts), Gemma's local/global layers, softcapping. Every parameter is drawn at random (norm weights
around their neutral value), so no default can stand in for a weight.

transformers' RMSNorm classes are their own classes (not ``nn.RMSNorm``); the PyTorch bridge
recognises them as the ``rms_norm`` kind by themselves (``torch_impl.interchange._is_rms_norm``).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from flax import nnx

import converters
from flax_impl.models.gemma3 import Gemma3ForCausalLM
from flax_impl.models.llama import LlamaForCausalLM
from flax_impl.models.mistral import MistralForCausalLM
from flax_impl.models.qwen2 import Qwen2ForCausalLM
from flax_impl.models.qwen3 import Qwen3ForCausalLM

from .bert import transformers_module

transformers = transformers_module()

#: family -> (transformers config class, transformers causal-LM class, Flax twin).
FAMILIES: dict[str, tuple[Any, Any, type]] = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, Qwen3ForCausalLM),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, Gemma3ForCausalLM),
}

_RMS_NORMS = tuple(
    getattr(module, name)
    for module, name in (
        (transformers.models.llama.modeling_llama, "LlamaRMSNorm"),
        (transformers.models.mistral.modeling_mistral, "MistralRMSNorm"),
        (transformers.models.qwen2.modeling_qwen2, "Qwen2RMSNorm"),
        (transformers.models.qwen3.modeling_qwen3, "Qwen3RMSNorm"),
        (transformers.models.gemma3.modeling_gemma3, "Gemma3RMSNorm"),
    )
)
_GEMMA_NORM = transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm  # (1 + w): w around 0

VOCAB = 64
EOS = 3
#: Options every small config shares.
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=EOS,
)

#: name -> (family, config options beyond :data:`BASE`).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-tied-biases-head-dim": (
        "llama",
        dict(
            tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=12, num_key_value_heads=1
        ),
    ),
    "llama3-rope": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
                rope_theta=500000.0,
            )
        ),
    ),
    "llama-linear-rope": (
        "llama",
        dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)),
    ),
    # max_position_embeddings below the batch's length: the NTK base is recomputed.
    "llama-dynamic-rope": (
        "llama",
        dict(
            max_position_embeddings=8, rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)
        ),
    ),
    "qwen2-yarn-rope": (
        "qwen2",
        dict(
            rope_parameters=dict(
                rope_type="yarn", factor=4.0, original_max_position_embeddings=16, rope_theta=1e4
            )
        ),
    ),
    "mistral-window": ("mistral", dict(sliding_window=4)),
    "qwen2-window": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, num_hidden_layers=3),
    ),
    "qwen3": ("qwen3", dict(head_dim=8, tie_word_embeddings=True)),
    "qwen3-window-bias": (
        "qwen3",
        dict(head_dim=8, attention_bias=True, use_sliding_window=True, sliding_window=3, max_window_layers=1),
    ),
    "gemma3": (
        "gemma3",
        dict(
            head_dim=8,
            num_hidden_layers=3,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=12,
            final_logit_softcapping=5.0,
            tie_word_embeddings=True,
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                "sliding_attention": dict(rope_type="default", rope_theta=1e4),
            },
        ),
    ),
}

#: One variant per family, for the PEFT checks.
FAMILY_VARIANTS = ("llama", "mistral-window", "qwen2-window", "qwen3", "gemma3")
#: The training checks: every family whose backward differs (Mistral's is Llama's with a window,
#: which the forward and decoding checks cover): biases, q/k norms with tied embeddings, Gemma's.
TRAINING_VARIANTS = ("llama", "qwen2-window", "qwen3", "gemma3")

#: LoRA's targets on every family: attention q, k, v, o and the MLP's three projections.
LORA_TARGETS = (
    "model.layers.*.self_attn.[qkvo]_proj",
    "model.layers.*.mlp.gate_proj",
    "model.layers.*.mlp.up_proj",
    "model.layers.*.mlp.down_proj",
)
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def torch_config(variant: str) -> Any:
    """The transformers config of ``variant``."""
    family, options = VARIANTS[variant]
    return FAMILIES[family][0](**{**BASE, **options})


def torch_model(variant: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' causal LM of ``variant``, every parameter random (seeded), eval mode."""
    family, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    model = FAMILIES[family][1](torch_config(variant)).eval()
    randomize(model, seed)
    return model.to(dtype)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw every parameter: N(0, 0.2) (Gemma's (1 + w) norms too), Llama-style norm weights
    around 1, so that each weight shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                values = torch.randn(param.shape, generator=generator) * 0.2
                llama_norm = isinstance(module, _RMS_NORMS) and not isinstance(module, _GEMMA_NORM)
                param.copy_(values + 1.0 if llama_norm else values)
    return model


def flax_model(variant: str, **kwargs: Any) -> nnx.Module:
    """The Flax twin of ``variant`` with zero weights, built without running its initializers."""
    from tests.equivalence.harness import placeholder

    family, _ = VARIANTS[variant]
    return placeholder(lambda: FAMILIES[family][2](torch_config(variant), rngs=nnx.Rngs(0), **kwargs))


def twins(variant: str, seed: int = 0, **flax_kwargs: Any) -> tuple[torch.nn.Module, nnx.Module]:
    """``(transformers model, Flax twin)`` of ``variant`` with the same random weights, eval mode."""
    source = torch_model(variant, seed)
    target = flax_model(variant, **flax_kwargs)
    target.eval()
    converters.torch_to_flax(source, target)
    return source, target


def fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy (transformers' dynamic RoPE keeps state between calls: start each check afresh)."""
    return copy.deepcopy(model)


def token_batch(seed: int = 0, length: int = 10, pad: int = 3) -> dict[str, np.ndarray]:
    """Two rows of ``length`` random token ids (no eos); the second is left-padded by ``pad``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(EOS + 1, VOCAB, (2, length)).astype(np.int64)
    mask = np.ones((2, length), np.int64)
    mask[1, :pad] = 0
    ids[1, :pad] = BASE["pad_token_id"]
    return {"input_ids": ids, "attention_mask": mask}
