"""The equivalence pairs: twin models with a batch, a way to run each half, and adapter cases.

A :class:`Pair` knows how to build each half, a batch (numpy, in PyTorch's layout), and how to
run each half on it, returning outputs in one common layout. An :class:`AdapterCase` is one
``AdaptedModel`` configuration, given the same way to ``torch_impl`` and ``flax_impl``.

The pairs, each with the adapter cases ``lora``, ``houlsby``, ``mixed`` and ``unfrozen``:
:data:`MLP`, :data:`CNN`, :data:`SPEECH` (the namesake twins of ``torch_models.py`` and
``flax_models.py``) and :data:`BERT` (``bert.py``); :data:`PAIRS` lists them.
:func:`run_torch_bert` and :func:`run_flax_bert` run either half of BERT, also the real MiniLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flax_impl.models import BertConfig, BertModel

from . import bert, flax_models, torch_models

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class AdapterCase:
    """One adapter configuration: the arguments of ``AdaptedModel`` on both sides."""

    name: str
    adapter_class: str  # "LoRA" or "HoulsbyAdapterLinear", looked up in each framework's package
    adapter_kwargs: dict[str, Any] = field(default_factory=dict)
    target_layers: tuple[str, ...] = ()
    unfrozen_layers: tuple[str, ...] = ()
    all_linear: bool = False
    all_conv: bool = False


@dataclass(frozen=True)
class Pair:
    """A PyTorch model and its Flax twin, with a batch and a way to run each.

    ``run_torch``/``run_flax`` return a tuple of outputs in the same layout on both sides (the
    Flax one is traced under ``nnx.jit``, so it must use jnp only).
    """

    name: str
    make_torch: Callable[[], torch.nn.Module]
    make_flax: Callable[[nnx.Rngs], nnx.Module]
    make_batch: Callable[[np.random.Generator], Batch]
    run_torch: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, ...]]
    run_flax: Callable[[nnx.Module, Batch], tuple[Any, ...]]
    cases: tuple[AdapterCase, ...]

    def case(self, name: str) -> AdapterCase:
        for case in self.cases:
            if case.name == name:
                return case
        raise KeyError(
            f"pair {self.name!r} has no adapter case {name!r}; it has {[c.name for c in self.cases]}"
        )


def _lora(name: str, rank: int = 3, alpha: float = 6.0, **kwargs: Any) -> AdapterCase:
    return AdapterCase(name, "LoRA", {"rank": rank, "alpha": alpha}, **kwargs)


def _houlsby(name: str, projection_size: int = 4, **kwargs: Any) -> AdapterCase:
    return AdapterCase(name, "HoulsbyAdapterLinear", {"projection_size": projection_size}, **kwargs)


def _tensor(batch: Batch, key: str) -> torch.Tensor:
    return torch.from_numpy(batch[key])


MLP = Pair(
    name="mlp",
    make_torch=torch_models.MLP,
    make_flax=lambda rngs: flax_models.MLP(rngs=rngs),
    make_batch=lambda rng: {"x": rng.standard_normal((5, 6), dtype=np.float32)},
    run_torch=lambda model, batch: (model(_tensor(batch, "x")),),
    run_flax=lambda model, batch: (model(batch["x"]),),
    cases=(
        _lora("lora", target_layers=("layer1", "layer2")),
        _houlsby("houlsby", target_layers=("layer*",)),
        _lora("mixed", rank=2, alpha=1.0, target_layers=("layer?", "head")),
        _lora("unfrozen", target_layers=("layer2",), unfrozen_layers=("norm", "head")),
    ),
)

CNN = Pair(
    name="cnn",
    make_torch=torch_models.CNN,
    make_flax=lambda rngs: flax_models.CNN(rngs=rngs),
    make_batch=lambda rng: {"x": rng.standard_normal((2, 3, 12, 16), dtype=np.float32)},
    run_torch=lambda model, batch: (model(_tensor(batch, "x")),),
    run_flax=lambda model, batch: (model(jnp.transpose(batch["x"], (0, 2, 3, 1))),),
    cases=(
        _lora("lora", rank=2, all_conv=True),
        _houlsby("houlsby", projection_size=3, target_layers=("head",)),
        _lora("mixed", target_layers=("conv[13]", "head")),
        _lora("unfrozen", target_layers=("conv2", "conv4"), unfrozen_layers=("conv1", "head")),
    ),
)

SPEECH = Pair(
    name="speech",
    make_torch=torch_models.SpeechEncoder,
    make_flax=lambda rngs: flax_models.SpeechEncoder(rngs=rngs),
    make_batch=lambda rng: {"x": rng.standard_normal((2, 24, 20), dtype=np.float32)},
    run_torch=lambda model, batch: (model(_tensor(batch, "x")),),
    run_flax=lambda model, batch: (model(batch["x"]),),
    cases=(
        _lora("lora", target_layers=("layers.*.self_att.q_proj", "layers.*.self_att.v_proj")),
        _houlsby("houlsby", target_layers=("layers.*.pos_ffn.ffn.2", "layers.*.self_att.out_proj")),
        _lora("mixed", target_layers=("frontend.conv*", "layers.1.pos_ffn.ffn.0", "output")),
        _lora(
            "unfrozen",
            target_layers=("layers.*.self_att.[qkv]_proj",),
            unfrozen_layers=("layers.*.norm?", "norm", "frontend.conv1"),
        ),
    ),
)


def _bert_batch(rng: np.random.Generator) -> Batch:
    batch, seq = 3, 10
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, 6:] = 0  # padded rows: the additive mask must agree too
    mask[2, 3:] = 0
    ids = rng.integers(1, bert.SMALL_CONFIG["vocab_size"], size=(batch, seq)).astype(np.int64) * mask
    types = (np.arange(seq)[None, :] >= 4).astype(np.int64).repeat(batch, 0) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def run_torch_bert(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(last_hidden_state, pooler_output)`` of a (possibly adapted) ``transformers.BertModel``."""
    out = model(**{key: _tensor(batch, key) for key in ("input_ids", "attention_mask", "token_type_ids")})
    return out.last_hidden_state, out.pooler_output


def run_flax_bert(model: nnx.Module, batch: Batch) -> tuple[Any, Any]:
    """``(last_hidden_state, pooled output)`` of a (possibly adapted) ``flax_impl.models.BertModel``."""
    hidden = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return hidden, model.pooler(hidden)  # an AdaptedModel forwards .pooler to the wrapped model


BERT = Pair(
    name="bert",
    make_torch=bert.small_torch_bert,
    make_flax=lambda rngs: BertModel(BertConfig(**bert.SMALL_CONFIG), rngs=rngs),
    make_batch=_bert_batch,
    run_torch=run_torch_bert,
    run_flax=run_flax_bert,
    cases=(
        _lora(
            "lora",
            target_layers=("encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value"),
        ),
        _houlsby("houlsby", target_layers=("encoder.layer.*.output.dense",)),
        _lora(
            "mixed",
            rank=2,
            target_layers=(
                "encoder.layer.0.attention.self.[qkv]*",
                "encoder.layer.1.intermediate.dense",
                "pooler.dense",
            ),
        ),
        _lora(
            "unfrozen",
            target_layers=("encoder.layer.*.intermediate.dense",),
            unfrozen_layers=(
                "embeddings.LayerNorm",
                "embeddings.position_embeddings",
                "encoder.layer.1.attention.output.LayerNorm",
            ),
        ),
    ),
)


PAIRS: tuple[Pair, ...] = (MLP, CNN, SPEECH, BERT)
