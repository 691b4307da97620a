"""A PEFT LoRA on a Llama-style model: trained in PyTorch, continued in Flax, back to PEFT.

    python -m examples.llm_roundtrip [--torch-steps 30] [--flax-steps 30] [--rank 8] ...

The stages, each a function below:

1. build a small Llama-style ``transformers.LlamaForCausalLM`` (random weights: nothing is
   downloaded) and ``save_pretrained`` it, as a released checkpoint would be on disk;
2. put a real ``peft`` LoRA on every attention and MLP projection and train it in PyTorch on a
   toy language: rows of arithmetic sequences (``5 8 11 14 ...`` modulo the vocabulary), so
   that greedy continuation has a right answer;
3. save the PEFT adapter, read the base directory into the Flax twin without torch
   (``LlamaForCausalLM.from_pretrained``), load the adapter into it
   (``flax_impl.AdaptedModel.from_pretrained``), check the logits against PEFT's and continue
   training with optax under ``jax.jit`` on the ``trainable`` filter (a fresh AdamW: PEFT's
   optimizer state is not carried over);
4. save the Flax adapter as a PEFT directory, load it with ``peft.PeftModel.from_pretrained``
   on a freshly loaded base, and compare the logits and the greedy tokens of
   ``transformers``' ``generate`` with the Flax twin's ``generate`` on a left-padded batch;
5. print a report and write it (``report.json``) into the output folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "parse_args", "sequences"]

#: The base model: Llama's layout (GQA, SiLU MLP, RMSNorm, RoPE), at toy size.
CONFIG = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LENGTH = 16  # tokens per training row
PROMPT = 6  # tokens a generation prompt shows (the longest; the others are left-padded)
NEW_TOKENS = 8
FIRST_TOKEN = 2  # 0 and 1 are bos and eos/pad


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.llm_roundtrip",
        description=(
            "Train a PEFT LoRA on a small Llama-style model in PyTorch, continue in Flax, save it "
            "as PEFT and check that PeftModel computes the same logits and greedy tokens."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--torch-steps", type=int, default=30, help="AdamW steps in PyTorch")
    parser.add_argument("--flax-steps", type=int, default=30, help="AdamW steps in Flax")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (both frameworks)")
    parser.add_argument("--rows", type=int, default=32, help="training rows (one full batch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base weights and the data")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs") / datetime.datetime.now().strftime("llm-%Y%m%d-%H%M%S"),
        help="output folder, created if needed",
    )
    args = parser.parse_args(argv)
    for name in ("rank", "rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("torch_steps", "flax_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def sequences(rows: int, length: int, seed: int) -> np.ndarray:
    """``(rows, length)`` int64 arithmetic sequences over the tokens ``2 .. vocab - 1``: a random
    start and a step of 1, 2 or 3, wrapping around.

    >>> sequences(1, 5, 0).shape
    (1, 5)
    """
    rng = np.random.default_rng(seed)
    span = CONFIG["vocab_size"] - FIRST_TOKEN
    start = rng.integers(0, span, (rows, 1))
    step = rng.integers(1, 4, (rows, 1))
    return (FIRST_TOKEN + (start + step * np.arange(length)) % span).astype(np.int64)


def prompts(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A left-padded batch of four prompts (6, 5, 4 and 3 tokens) and its mask."""
    rows = sequences(4, PROMPT + NEW_TOKENS, seed + 1)
    ids = np.full((4, PROMPT), CONFIG["pad_token_id"], np.int64)
    mask = np.zeros((4, PROMPT), np.int64)
    for i, shown in enumerate((6, 5, 4, 3)):
        ids[i, PROMPT - shown :] = rows[i, :shown]
        mask[i, PROMPT - shown :] = 1
    return ids, mask


def expected_continuations(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The right next ``NEW_TOKENS`` of each prompt's sequence (what a trained model should say)."""
    span = CONFIG["vocab_size"] - FIRST_TOKEN
    last, previous = ids[:, -1] - FIRST_TOKEN, ids[:, -2] - FIRST_TOKEN
    step = (last - previous) % span
    return FIRST_TOKEN + (last[:, None] + step[:, None] * np.arange(1, NEW_TOKENS + 1)) % span


def _torch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from examples.pretrained import hide_broken_torchaudio

    hide_broken_torchaudio()
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch, transformers


def save_base(out: Path, seed: int) -> Any:
    """Stage 1: the base model, saved by transformers; returns it (eval mode)."""
    torch, transformers = _torch()
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(out / "base")
    return model


def causal_lm_loss_torch(model: Any, ids: Any) -> Any:
    """Mean next-token cross-entropy."""
    torch, _ = _torch()
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def train_torch(base: Any, data: np.ndarray, args: argparse.Namespace, out: Path) -> tuple[Any, list[float]]:
    """Stage 2: a PEFT LoRA on ``base``, ``--torch-steps`` of AdamW; saved to ``peft_torch``."""
    torch, _ = _torch()
    import peft

    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
    )
    ids = torch.from_numpy(data)
    losses = []
    model.train()
    for _ in range(args.torch_steps):
        optimizer.zero_grad(set_to_none=True)
        loss = causal_lm_loss_torch(model, ids)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    model.save_pretrained(out / "peft_torch")
    return model, losses


def train_flax(adapted: Any, data: np.ndarray, args: argparse.Namespace) -> list[float]:
    """Stage 3: ``--flax-steps`` of optax AdamW on the adapters only, the step under ``jax.jit``."""
    import jax
    import optax
    from flax import nnx

    def loss_fn(model: Any, ids: jax.Array) -> jax.Array:
        logits = model(ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    tx = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    optimizer = nnx.Optimizer(adapted, tx, wrt=adapted.trainable)
    graphdef, state = nnx.split((adapted, optimizer))

    @jax.jit
    def step(state: Any, ids: jax.Array) -> tuple[Any, jax.Array]:
        model, opt = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(model, ids)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    losses = []
    ids = jax.numpy.asarray(data)
    for _ in range(args.flax_steps):
        state, loss = step(state, ids)
        losses.append(float(loss))
    nnx.update((adapted, optimizer), state)
    adapted.eval()
    return losses


def main(argv: Sequence[str] | None = None) -> int:
    """Run every stage; print the report and write ``report.json``. Returns the exit code."""
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    torch, _ = _torch()
    import jax
    from flax import nnx

    import flax_impl
    from flax_impl.models.llama import LlamaForCausalLM

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPUs: compare exactly
    data = sequences(args.rows, LENGTH, args.seed)
    ids, mask = prompts(args.seed)
    right = expected_continuations(ids, mask)

    base = save_base(out, args.seed)
    with torch.no_grad():
        base_tokens = base.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        ).numpy()[:, PROMPT:]
    peft_model, torch_losses = train_torch(base, data, args, out)
    seconds["torch"] = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    twin = LlamaForCausalLM.from_pretrained(out / "base")  # safetensors and config.json, no torch
    adapted = flax_impl.AdaptedModel.from_pretrained(twin, out / "peft_torch", rngs=nnx.Rngs(args.seed))
    with torch.no_grad():
        torch_logits = peft_model(input_ids=torch.from_numpy(data)).logits.numpy()
    to_flax = float(np.abs(np.asarray(adapted(data)) - torch_logits).max())
    flax_losses = train_flax(adapted, data, args)
    flax_logits = np.asarray(adapted(data))
    flax_tokens = np.asarray(adapted.generate(ids, NEW_TOKENS, attention_mask=mask, eos_token_id=[]))[
        :, PROMPT:
    ]
    written = adapted.save_pretrained(out / "peft_flax")
    seconds["flax"] = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    import peft
    import transformers

    fresh = transformers.LlamaForCausalLM.from_pretrained(out / "base").eval()
    again = peft.PeftModel.from_pretrained(fresh, out / "peft_flax").eval()
    with torch.no_grad():
        back_logits = again(input_ids=torch.from_numpy(data)).logits.numpy()
        torch_tokens = again.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
        ).numpy()[:, PROMPT:]
    seconds["back"] = round(time.perf_counter() - clock, 2)

    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "losses": {"torch": torch_losses, "flax": flax_losses},
        "diffs": {
            "torch_to_flax_logits": to_flax,
            "flax_to_peft_logits": float(np.abs(back_logits - flax_logits).max()),
        },
        "saved_format": written,
        "tokens": {
            "prompts": ids.tolist(),
            "mask": mask.tolist(),
            "expected": right.tolist(),
            "base": base_tokens.tolist(),
            "flax": flax_tokens.tolist(),
            "peft": torch_tokens.tolist(),
        },
        "correct_tokens": {
            "base": int((base_tokens == right).sum()),
            "trained": int((flax_tokens == right).sum()),
            "of": int(right.size),
        },
        "same_greedy_tokens": bool((flax_tokens == torch_tokens).all()),
        "seconds": seconds,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


def print_report(report: dict[str, Any]) -> None:
    """The report, as a few lines of text."""
    losses = report["losses"]
    first = losses["torch"][0] if losses["torch"] else float("nan")
    last = (losses["flax"] or losses["torch"] or [float("nan")])[-1]
    print(f"loss: {first:.4f} (first PyTorch step) -> {last:.4f} (last Flax step)")
    print(f"max abs diff of logits, PEFT (torch) -> Flax twin: {report['diffs']['torch_to_flax_logits']:.2e}")
    print(f"max abs diff of logits, Flax -> PeftModel:         {report['diffs']['flax_to_peft_logits']:.2e}")
    correct = report["correct_tokens"]
    print(
        f"right continuation tokens: base {correct['base']}/{correct['of']}, trained {correct['trained']}/{correct['of']}"
    )
    print(f"greedy tokens of transformers' generate == Flax generate: {report['same_greedy_tokens']}")
    for prompt, flax in zip(report["tokens"]["prompts"], report["tokens"]["flax"], strict=True):
        print(f"  {' '.join(str(t) for t in prompt)} -> {' '.join(str(t) for t in flax)}")


if __name__ == "__main__":
    sys.exit(main())
