"""Whisper, PyTorch -> Flax -> PyTorch: LoRA on all linear layers trained in both, the same greedy
transcripts at every stage.

    python -m examples.whisper_roundtrip [--torch-steps 3] [--flax-steps 6] [--rank 16] [--out DIR]

The stages:

1. a ``transformers.WhisperForConditionalGeneration`` is saved with ``save_pretrained`` (random
   init from a small config: no package on the registries ships pretrained Whisper weights for
   offline use; the config keeps Whisper's 80 x 3000 log-mel input and 1500 encoder positions at a
   width a 2-core CPU trains in seconds);
2. PyTorch: the model under the names SpeechBrain's Whisper lobe gives it (transformers'
   ``WhisperModel`` as ``model``, logits through ``model.decoder.embed_tokens``), LoRA (rank 16) on
   all linear layers as SpeechBrain's recipe, a few teacher-forced cross-entropy steps on synthetic
   audio (two tones, each with its own "transcript") through transformers' feature extractor;
   the adapters are saved with ``saver``;
3. Flax: ``flax_impl.models.WhisperForConditionalGeneration.from_pretrained`` (no torch), the same
   LoRA layers, the PyTorch adapters loaded, then training continues with jitted optax AdamW steps
   on features from ``flax_impl.models.whisper_log_mel``;
4. PyTorch again: the Flax adapters loaded back;
5. greedy transcripts (``generate`` in Flax, a greedy loop in PyTorch) are compared token for
   token after stage 2, after loading into Flax, and after stage 4. Exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

SAMPLE_RATE = 16000
#: Whisper's real input (80 mel bins, 3000 frames, 1500 positions) at a CPU-friendly width.
SMALL_CONFIG = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_layers=2,
    decoder_attention_heads=2,
    decoder_ffn_dim=64,
    num_mel_bins=80,
    max_source_positions=1500,
    max_target_positions=16,
    vocab_size=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
    suppress_tokens=[3],
    begin_suppress_tokens=[2],
)
#: The "transcript" of each tone: start token, three tokens, end of sequence.
TRANSCRIPTS = np.array([[1, 10, 11, 12, 2], [1, 20, 21, 22, 2]], np.int64)
NEW_TOKENS = 5


def synthetic_audio(rng: np.random.Generator, seconds: float = 2.0) -> np.ndarray:
    """Two rows: a 300 Hz tone and a 2 kHz tone, noise added, ``(2, samples)`` float32."""
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    freqs = np.array([[300.0], [2000.0]]) * rng.uniform(0.97, 1.03, (2, 1))
    return (0.5 * np.sin(2 * np.pi * freqs * t) + 0.05 * rng.standard_normal((2, t.size))).astype(np.float32)


def speechbrain_names(model: Any) -> Any:
    """transformers' Whisper under the module names SpeechBrain's Whisper lobe gives it."""
    import torch

    class SpeechBrainWhisper(torch.nn.Module):
        def __init__(self, whisper_model: Any) -> None:
            super().__init__()
            self.model = whisper_model  # transformers' WhisperModel, as SpeechBrain's lobe holds it

        def forward(self, input_features: Any, decoder_input_ids: Any, encoder_outputs: Any = None) -> Any:
            hidden = self.model(
                input_features, decoder_input_ids=decoder_input_ids, encoder_outputs=encoder_outputs
            ).last_hidden_state
            return hidden @ self.model.decoder.embed_tokens.weight.T  # SpeechBrain's forward_decoder

    return SpeechBrainWhisper(model.model)


def torch_greedy(model: Any, features: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Greedy tokens of a PyTorch model: argmax of the last logits, suppressing the config's tokens
    (``begin_suppress_tokens`` at the first step), rows kept at eos once they produced it."""
    import torch

    tokens = torch.full((features.shape[0], 1), config["decoder_start_token_id"])
    done = torch.zeros(features.shape[0], dtype=torch.bool)
    with torch.no_grad():
        encoded = (model.model.encoder(torch.from_numpy(np.array(features))).last_hidden_state,)  # once
        for step in range(NEW_TOKENS):
            logits = model(None, tokens, encoder_outputs=encoded)[:, -1]
            banned = list(config["suppress_tokens"]) + (
                list(config["begin_suppress_tokens"]) if step == 0 else []
            )
            logits[:, banned] = -float("inf")
            next_token = torch.where(done, config["eos_token_id"], logits.argmax(-1))
            done |= next_token == config["eos_token_id"]
            tokens = torch.cat([tokens, next_token[:, None]], 1)
    return tokens.numpy()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-steps", type=int, default=3)
    parser.add_argument("--flax-steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="keep the saved directory and adapters here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="whisper_roundtrip_"))
    out.mkdir(parents=True, exist_ok=True)
    lora = {"rank": args.rank, "alpha": float(args.rank)}

    # 1. A transformers Whisper, saved as users have them.
    import torch

    from examples.pretrained import hide_broken_torchaudio

    hide_broken_torchaudio()
    import transformers
    from transformers.utils import logging as hf_logging

    import torch_impl

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**SMALL_CONFIG)).save_pretrained(
        out / "whisper"
    )
    print(
        "whisper: random init (no package ships pretrained Whisper weights for offline use), "
        f"80 x 3000 log-mel input at d_model {SMALL_CONFIG['d_model']}, saved with save_pretrained to {out / 'whisper'}"
    )

    # 2. PyTorch: SpeechBrain's names, LoRA on all linear layers, teacher-forced cross-entropy.
    rng = np.random.default_rng(args.seed)
    audio = synthetic_audio(rng)
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    torch_features = extractor(list(audio), sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    base = speechbrain_names(transformers.WhisperForConditionalGeneration.from_pretrained(out / "whisper"))
    torch_model = torch_impl.AdaptedModel(base, torch_impl.LoRA, all_linear=True, adapter_kwargs=lora)
    inputs, labels = torch.from_numpy(TRANSCRIPTS[:, :-1]), torch.from_numpy(TRANSCRIPTS[:, 1:])
    optimizer = torch.optim.AdamW([p for p in torch_model.parameters() if p.requires_grad], lr=args.lr)
    torch_losses = []
    for _ in range(args.torch_steps):
        optimizer.zero_grad()
        logits = torch_model(torch.from_numpy(torch_features), inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        torch_losses.append(float(loss.detach()))
    torch_model.eval()
    torch_model.saver(str(out / "torch_adapters.safetensors"))
    after_torch = torch_greedy(torch_model, torch_features, SMALL_CONFIG)

    # 3. Flax: from_pretrained without torch, the same LoRA, the PyTorch adapters, more steps.
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import flax_impl
    from flax_impl.models import WhisperForConditionalGeneration, whisper_log_mel

    features = whisper_log_mel(audio)
    front_end_diff = float(np.max(np.abs(np.asarray(features) - torch_features)))
    model = flax_impl.AdaptedModel(
        WhisperForConditionalGeneration.from_pretrained(out / "whisper"),
        flax_impl.LoRA,
        all_linear=True,
        adapter_kwargs=lora,
        rngs=nnx.Rngs(args.seed),
    )
    model.loader(str(out / "torch_adapters.safetensors"))
    prompt = jnp.asarray(TRANSCRIPTS[:, :1])
    loaded_in_flax = np.asarray(model.generate(features, prompt, NEW_TOKENS))

    model.train()  # dropout is 0 in this config; train() is what a user calls before training
    optimizer_flax = nnx.Optimizer(model, optax.adamw(args.lr), wrt=model.trainable)
    graphdef, state = nnx.split((model, optimizer_flax))
    ids, targets = jnp.asarray(TRANSCRIPTS[:, :-1]), jnp.asarray(TRANSCRIPTS[:, 1:])

    @jax.jit
    def train_step(state: nnx.State, features: jax.Array) -> tuple[nnx.State, jax.Array]:
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model: nnx.Module) -> jax.Array:
            logits = model(features, ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    flax_losses = []
    for _ in range(args.flax_steps):
        state, loss = train_step(state, features)
        flax_losses.append(float(loss))
    nnx.update((model, optimizer_flax), state)
    model.eval()
    after_flax = np.asarray(model.generate(features, prompt, NEW_TOKENS))
    model.saver(str(out / "flax_adapters.safetensors"))

    # 4. PyTorch again: the adapters trained in Flax.
    back = torch_impl.AdaptedModel(
        speechbrain_names(transformers.WhisperForConditionalGeneration.from_pretrained(out / "whisper")),
        torch_impl.LoRA,
        all_linear=True,
        adapter_kwargs=lora,
    ).eval()
    back.loader(str(out / "flax_adapters.safetensors"))
    back_in_torch = torch_greedy(back, np.asarray(features), SMALL_CONFIG)
    with torch.no_grad():
        expected = back(torch.from_numpy(np.array(features)), torch.from_numpy(TRANSCRIPTS)).numpy()
    flax_logits = nnx.jit(lambda model, features, tokens: model(features, tokens))(
        model, features, TRANSCRIPTS
    )
    logits_diff = float(np.max(np.abs(expected - np.asarray(flax_logits))))

    same_after_load = bool((after_torch == loaded_in_flax).all())
    same_back = bool((after_flax == back_in_torch).all())
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(model, model.trainable)))
    rows = [
        (
            f"trainable parameters (LoRA r={args.rank}, {len(model.replace_layers)} linear layers)",
            f"{trainable:,}",
        ),
        ("log-mel front end, max |transformers - flax|", f"{front_end_diff:.2e}"),
        ("PyTorch loss, first -> last step", f"{torch_losses[0]:.4f} -> {torch_losses[-1]:.4f}"),
        ("Flax loss, first -> last step", f"{flax_losses[0]:.4f} -> {flax_losses[-1]:.4f}"),
        ("greedy tokens after PyTorch training", " | ".join(" ".join(map(str, r)) for r in after_torch)),
        ("  the same in Flax after loading", "yes" if same_after_load else "NO"),
        ("greedy tokens after Flax training", " | ".join(" ".join(map(str, r)) for r in after_flax)),
        ("  the same in PyTorch after loading back", "yes" if same_back else "NO"),
        ("logits, max |torch - flax| after loading back", f"{logits_diff:.2e}"),
        ("seconds", f"{time.perf_counter() - started:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'stage'.ljust(width)} | value")
    print(f"{'-' * width}-|-{'-' * 30}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    agree = same_after_load and same_back and logits_diff < 1e-4 and front_end_diff < 1e-4
    return 0 if agree and flax_losses[-1] < torch_losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
