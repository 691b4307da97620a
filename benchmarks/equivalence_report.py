"""Measure how far PyTorch and Flax twins are apart and print it as Markdown tables for the README.

For every model pair of the equivalence zoo (``tests/zoo/pairs.py``) and every adapter kind
(the toy pairs, and transformers' Wav2Vec2Model, HubertModel, WavLMModel and WhisperEncoder against
the Flax twins in ``flax_impl.models``, ``tests/zoo/speech.py``),
the two frameworks run on their own from the same converted weights: the forward output, the
gradients of every trainable parameter, and every weight after ten AdamW steps (``torch.optim.AdamW``
vs ``optax.adamw``, same hyper-parameters) are compared, and the weights converted back to
PyTorch after the Flax training are checked bit for bit. Then the real all-MiniLM-L6-v2 is
compared on tokenized sentences, without and with LoRA adapters. Every number is measured when
the script runs (float32, CPU, full precision); nothing is typed in.

Usage::

    .venv/bin/python benchmarks/equivalence_report.py [--pairs mlp cnn speech bert wav2vec2 hubert wavlm whisper] [--no-minilm]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _full_precision() -> None:
    """What ``tests/conftest.py`` does for the suite: float32 everywhere, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    jax.config.update("jax_default_matmul_precision", "highest")


def _fmt(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def pair_table(pair_name: str) -> list[str]:
    """Markdown rows for one pair: one line per adapter case."""
    from tests.equivalence import harness
    from tests.zoo.speech import SPEECH_PAIRS_BY_NAME

    pair = {**harness.PAIRS_BY_NAME, **SPEECH_PAIRS_BY_NAME}[pair_name]
    lines = [
        f"**{pair_name}** ({type(pair.make_torch()).__name__})",
        "",
        "| adapters | trainable tensors | forward | gradients | after 10 AdamW steps | converted back |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for case in pair.cases:
        result = harness.run_pair(pair, case)
        exact = sorted(result.converted_back) == sorted(result.flax_after) and all(
            (result.converted_back[k] == result.flax_after[k]).all() for k in result.flax_after
        )
        lines.append(
            f"| {_describe(case)} | {len(result.torch_grads)} "
            f"| {_fmt(harness.max_abs_diff(result.torch_outputs, result.flax_outputs))} "
            f"| {_fmt(harness.max_abs_diff(result.torch_grads, result.flax_grads))} "
            f"| {_fmt(harness.max_abs_diff(result.torch_after, result.flax_after))} "
            f"| {'bit-exact' if exact else 'DIFFERS'} |"
        )
    return lines


def _describe(case) -> str:
    kwargs = ", ".join(f"{k}={v}" for k, v in case.adapter_kwargs.items())
    targets = ", ".join(f"`{t}`" for t in case.target_layers) or (
        "all conv" if case.all_conv else "all linear"
    )
    text = f"{case.name}: {case.adapter_class}({kwargs}) on {targets}"
    if case.unfrozen_layers:
        text += "; unfrozen " + ", ".join(f"`{u}`" for u in case.unfrozen_layers)
    return text


def minilm_table() -> list[str]:
    """Markdown rows for all-MiniLM-L6-v2: base model and LoRA on query/value."""
    import numpy as np

    from tests.equivalence import harness
    from tests.zoo.bert import SENTENCES, load_minilm, tokenize
    from tests.zoo.pairs import AdapterCase, run_flax_bert, run_torch_bert

    base, tokenizer = load_minilm()
    batch = tokenize(tokenizer)
    lora = AdapterCase(
        "lora",
        "LoRA",
        {"rank": 4, "alpha": 8.0},
        target_layers=("encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value"),
    )
    lines = [
        f"**all-MiniLM-L6-v2** (real weights; {len(SENTENCES)} sentences padded to "
        f"{batch['input_ids'].shape[1]} tokens)",
        "",
        "| model | last hidden state, max abs | pooler output, max abs | 1 - min cosine over tokens |",
        "|---|---:|---:|---:|",
    ]
    for label, case in (("pretrained", None), ("LoRA r=4 on query, value (non-zero)", lora)):
        torch_model, flax_model = harness.minilm_twins(base, case)
        torch_hidden, torch_pooled = (out.detach().numpy() for out in run_torch_bert(torch_model, batch))
        flax_hidden, flax_pooled = (np.asarray(out) for out in run_flax_bert(flax_model, batch))
        cosine = harness.min_token_cosine(torch_hidden, flax_hidden, batch["attention_mask"])
        lines.append(
            f"| {label} | {_fmt(float(np.abs(torch_hidden - flax_hidden).max()))} "
            f"| {_fmt(float(np.abs(torch_pooled - flax_pooled).max()))} | {_fmt(1.0 - cosine)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pairs",
        nargs="*",
        default=["mlp", "cnn", "speech", "bert", "wav2vec2", "hubert", "wavlm", "whisper"],
        help="zoo pairs to run",
    )
    parser.add_argument(
        "--no-minilm", action="store_true", help="skip the pretrained all-MiniLM-L6-v2 comparison"
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    _full_precision()
    import flax
    import jax
    import torch

    from tests.equivalence import harness
    from tests.zoo.speech import SPEECH_PAIRS_BY_NAME

    known = {**harness.PAIRS_BY_NAME, **SPEECH_PAIRS_BY_NAME}
    unknown = [name for name in args.pairs if name not in known]
    if unknown:
        parser.error(f"unknown pair(s) {unknown}; choose from {sorted(known)}")

    start = time.perf_counter()
    out = [
        "Max absolute difference between PyTorch and Flax NNX, float32 on CPU "
        f"(torch {torch.__version__}, jax {jax.__version__}, flax {flax.__version__}, {platform.machine()}). "
        f"AdamW: lr={harness.LEARNING_RATE}, betas={harness.BETAS}, eps={harness.EPS}, "
        f"weight_decay={harness.WEIGHT_DECAY}, {harness.STEPS} steps; adapters start non-zero.",
        "",
    ]
    for name in args.pairs:
        out += pair_table(name) + [""]
    if not args.no_minilm:
        out += minilm_table() + [""]
    out.append(f"_Produced by `benchmarks/equivalence_report.py` in {time.perf_counter() - start:.0f} s._")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
