"""A transformers Wav2Vec2Model -> Flax (LoRA training) -> back to PyTorch, with the same outputs.

    python -m examples.speech_roundtrip [--steps 20] [--rank 8] [--base] [--out DIR]

The stages:

1. a ``transformers.Wav2Vec2Model`` is saved with ``save_pretrained`` (random init: no package
   on the registries ships pretrained wav2vec2 weights for offline use; the default config keeps
   wav2vec2-base's geometry, seven convs over 16 kHz audio, 49 frames a second, at a width a
   2-core CPU trains in seconds; ``--base`` uses wav2vec2-base's own config);
2. ``flax_impl.models.Wav2Vec2Model.from_pretrained`` reads the directory (no torch), in eval mode;
3. ``flax_impl.AdaptedModel`` puts LoRA on the attention's q and v projections, and a few jitted
   optax AdamW steps train it on synthetic audio (tones of two pitches, noise added: pull each
   pitch's mean-pooled state towards its own target vector);
4. the adapters are saved (adapter-only safetensors) and loaded into the PyTorch model
   (``torch_impl.AdaptedModel`` around ``transformers.Wav2Vec2Model.from_pretrained``);
5. both frameworks encode held-out audio (padded, with an attention mask) and a short table
   compares them. Exit status 1 if they differ by more than SPEC's tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]

TARGETS = ["encoder.layers.*.attention.q_proj", "encoder.layers.*.attention.v_proj"]
#: wav2vec2-base's feature encoder and positional conv layout, at a CPU-friendly width.
SMALL_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    conv_dim=(32,) * 7,
    num_conv_pos_embeddings=32,
    num_conv_pos_embedding_groups=4,
)
SAMPLE_RATE = 16000


def synthetic_audio(rng: np.random.Generator, batch: int, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """``(audio (batch, samples), pitch class (batch,))``: tones of 220 or 880 Hz plus noise."""
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    labels = np.arange(batch) % 2
    freqs = np.where(labels == 0, 220.0, 880.0)[:, None] * rng.uniform(0.95, 1.05, (batch, 1))
    audio = np.sin(2 * np.pi * freqs * t) + 0.1 * rng.standard_normal((batch, t.size))
    return audio.astype(np.float32), labels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="Flax training steps")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", action="store_true", help="wav2vec2-base's own config (slow on CPU)")
    parser.add_argument("--out", type=Path, help="keep the saved directory and adapters here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="speech_roundtrip_"))
    out.mkdir(parents=True, exist_ok=True)

    # 1. PyTorch: a transformers model, saved as users have them.
    import torch

    from examples.pretrained import hide_broken_torchaudio

    hide_broken_torchaudio()
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    config = transformers.Wav2Vec2Config(**({} if args.base else SMALL_CONFIG))
    transformers.Wav2Vec2Model(config).save_pretrained(out / "wav2vec2")
    print(
        f"wav2vec2: random init (no offline pretrained package), "
        f"{'wav2vec2-base config' if args.base else 'wav2vec2-base geometry at hidden ' + str(config.hidden_size)}"
        f", saved with save_pretrained to {out / 'wav2vec2'}"
    )

    # 2-3. Flax: from_pretrained, LoRA, a few jitted AdamW steps.
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import flax_impl
    from flax_impl.models import Wav2Vec2Model

    flax_base = Wav2Vec2Model.from_pretrained(out / "wav2vec2")
    model = flax_impl.AdaptedModel(
        flax_base,
        flax_impl.LoRA,
        target_layers=TARGETS,
        adapter_kwargs={"rank": args.rank, "alpha": 2.0 * args.rank},
        rngs=nnx.Rngs(args.seed),
    )
    rng = np.random.default_rng(args.seed)
    audio, labels = synthetic_audio(rng, batch=4, seconds=1.0)
    targets = jnp.asarray(rng.standard_normal((2, config.hidden_size)).astype(np.float32))[labels]
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(model, model.trainable)))
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr), wrt=model.trainable)

    @nnx.jit
    def train_step(model: nnx.Module, optimizer: nnx.Optimizer, audio: jax.Array) -> jax.Array:
        def loss_fn(model: nnx.Module) -> jax.Array:
            pooled = model(audio).mean(axis=1)
            return jnp.mean(jnp.square(pooled - targets))

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, jnp.asarray(audio))) for _ in range(args.steps)]
    model.saver(str(out / "adapters.safetensors"))

    # 4. PyTorch again: the same transformers directory, the adapters trained in Flax.
    import torch_impl

    torch_model = torch_impl.AdaptedModel(
        transformers.Wav2Vec2Model.from_pretrained(out / "wav2vec2"),
        torch_impl.LoRA,
        target_layers=TARGETS,
        adapter_kwargs={"rank": args.rank, "alpha": 2.0 * args.rank},
    ).eval()
    torch_model.loader(str(out / "adapters.safetensors"))

    # 5. Held-out audio, padded: both frameworks, same numbers.
    test_audio, _ = synthetic_audio(np.random.default_rng(args.seed + 1), batch=2, seconds=1.5)
    mask = np.ones(test_audio.shape, np.int64)
    mask[1, SAMPLE_RATE:] = 0
    test_audio[1, SAMPLE_RATE:] = 0.0
    with torch.no_grad():
        expected = torch_model(
            torch.from_numpy(test_audio), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state
    expected = expected.numpy()
    actual = np.asarray(model(test_audio, mask))
    diff = float(np.max(np.abs(expected - actual)))
    scale = max(1.0, float(np.max(np.abs(expected))))
    agree = bool(np.allclose(actual, expected, atol=1e-5 * scale, rtol=1e-5))

    rows = [
        (f"trainable parameters (LoRA r={args.rank} on q, v)", f"{trainable:,}"),
        ("Flax loss, first -> last step", f"{losses[0]:.4f} -> {losses[-1]:.4f} ({args.steps} steps)"),
        ("adapter file", f"{(out / 'adapters.safetensors').stat().st_size:,} bytes"),
        ("held-out output, max |torch - flax|", f"{diff:.2e} (magnitude {scale:.2f})"),
        ("outputs agree (atol 1e-5 x magnitude, rtol 1e-5)", "yes" if agree else "NO"),
        ("seconds", f"{time.perf_counter() - started:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'stage'.ljust(width)} | value")
    print(f"{'-' * width}-|-{'-' * 30}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    return 0 if agree and losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
