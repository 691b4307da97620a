"""Speech benchmark: a LoRA (r=16 on q,v) training step on the Flax speech twins against the frozen
Flax floor and against the same step in PyTorch (eager and CUDA graph), in one run.

Models (random init, base-sized): ``Wav2Vec2Model`` with transformers' default (wav2vec2-base)
config, batch 8 x 4 s of 16 kHz audio; ``WhisperEncoder`` of whisper-base (d_model 512, 6 layers,
8 heads, FFN 2048), batch 8 x 80 x 3000 log-mel frames (Whisper pads every input to 30 s, so 4 s
of audio costs what 30 s does). bf16: Flax builds the model with ``dtype=bfloat16`` (float32
parameters, bf16 compute), torch runs under ``torch.autocast(bfloat16)``. Dropout, LayerDrop and
SpecAugment are off on both sides (eval mode), so both compute the same step. Loss
``mean(h.float()**2)`` over the last hidden state; AdamW (torch: fused, capturable).

Rows:

The Flax twins run with ``--attention`` as their ``attention_implementation`` (default ``cudnn``:
cuDNN flash attention, as torch's SDPA uses a fused kernel; ``none``: the attention written out).

- ``flax floor``: the frozen Flax model, forward + backward with the gradient taken w.r.t. the
  encoder's input only (no weight gradient), jitted: the cheapest a LoRA step could be;
- ``flax LoRA``: ``flax_impl.AdaptedModel`` + ``flax_impl.LoRA``, ``optax.adamw`` on
  ``model.trainable``, one ``jax.jit`` step with donated state;
- ``torch LoRA eager`` / ``torch LoRA CUDA graph``: transformers' model adapted with
  ``torch_impl.AdaptedModel`` + ``torch_impl.LoRA``, the same step, eager and captured whole.

The median of ``--steps`` timed steps after ``--warmup`` is reported.

Usage::

    python benchmarks/bench_speech.py --out benchmarks/results/speech_gpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks._common import RANK, fmt, time_calls, utc_timestamp, write_report  # noqa: E402
from flax_impl import AdaptedModel, LoRA  # noqa: E402
from flax_impl.models import Wav2Vec2Model, WhisperEncoder  # noqa: E402

TARGETS = {
    "wav2vec2": ["encoder.layers.*.attention.q_proj", "encoder.layers.*.attention.v_proj"],
    "whisper": ["layers.*.self_attn.q_proj", "layers.*.self_attn.v_proj"],
}
WHISPER_BASE = dict(
    d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048, num_mel_bins=80,
    max_source_positions=1500, decoder_layers=1, decoder_attention_heads=8, decoder_ffn_dim=2048,
)  # fmt: skip
BATCH, SECONDS = 8, 4
ATTENTION: str | None = "cudnn"  # the twins' attention_implementation (--attention)
W2V_OVERRIDES: dict = {"layerdrop": 0.0, "mask_time_prob": 0.0}  # wav2vec2-base otherwise


def transformers_like(overrides: dict) -> dict:
    return dict(overrides)


def inputs(name: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if name == "wav2vec2":
        return rng.standard_normal((BATCH, 16000 * SECONDS)).astype(np.float32)
    return rng.standard_normal((BATCH, 80, 3000)).astype(np.float32)


def _loss(hidden: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(hidden.astype(jnp.float32)))


def flax_model(name: str) -> nnx.Module:
    if name == "wav2vec2":
        model = Wav2Vec2Model(
            transformers_like(W2V_OVERRIDES),
            dtype=jnp.bfloat16,
            attention_implementation=ATTENTION,
            rngs=nnx.Rngs(0),
        )
    else:
        model = WhisperEncoder(
            WHISPER_BASE, dtype=jnp.bfloat16, attention_implementation=ATTENTION, rngs=nnx.Rngs(0)
        )
    model.eval()
    return model


def flax_floor_step(name: str, model: nnx.Module):
    graphdef, state = nnx.split(model)

    def split(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, object]:
        if name == "wav2vec2":
            return model.embed(x)[0], lambda h, m: m.encoder(h)
        return model.embed(x), lambda h, m: m.encode(h)

    @partial(jax.jit, donate_argnums=0)
    def step(state, x):
        model = nnx.merge(graphdef, state)
        hidden0, body = split(model, x)
        loss, grad = nnx.value_and_grad(lambda h, m: _loss(body(h, m)), argnums=0)(hidden0, model)
        return (loss, grad), nnx.state(model)

    return step, state


def flax_lora_step(name: str, model: nnx.Module):
    adapted = AdaptedModel(
        model, LoRA, target_layers=TARGETS[name], adapter_kwargs={"rank": RANK}, rngs=nnx.Rngs(1)
    )
    for path, variable in nnx.to_flat_state(nnx.state(adapted, adapted.trainable)):
        if "adapter_up_proj" in [str(p) for p in path]:  # non-zero, as after some training
            variable.set_value(jnp.full(variable.get_value().shape, 0.01, variable.get_value().dtype))
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(adapted, adapted.trainable)))
    optimizer = nnx.Optimizer(adapted, optax.adamw(1e-4), wrt=adapted.trainable)
    graphdef, state = nnx.split((adapted, optimizer))
    wrt = adapted.trainable

    @partial(jax.jit, donate_argnums=0)
    def step(state, x):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(x)), argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    return step, state, trainable


def time_flax(step, state, x, steps: int, warmup: int) -> tuple[float, float]:
    start = time.perf_counter()
    compiled = step.lower(state, x).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def run() -> None:
        out, holder[0] = compiled(holder[0], x)
        jax.block_until_ready(out)

    return statistics.median(time_calls(run, steps, warmup)), compile_s


def torch_rows(
    name: str, x: np.ndarray, steps: int, warmup: int
) -> tuple[float | None, float | None, int, str]:
    import torch
    import transformers

    import torch_impl
    from benchmarks.bench_train import capture_graph, make_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if name == "wav2vec2":
        base = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**W2V_OVERRIDES))
    else:
        base = transformers.models.whisper.modeling_whisper.WhisperEncoder(
            transformers.WhisperConfig(**WHISPER_BASE)
        )
    model = torch_impl.AdaptedModel(
        base, torch_impl.LoRA, target_layers=TARGETS[name], adapter_kwargs={"rank": RANK}
    ).to(device)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "adapter_up_proj" in pname:
                p.fill_(0.01)
    model.eval()  # no dropout, as the Flax side
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, device)
    inp = torch.from_numpy(x).to(device)

    def step(zero_grad: bool = True) -> torch.Tensor:
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hidden = model(inp).last_hidden_state
        loss = hidden.float().square().mean()
        loss.backward()
        optimizer.step()
        return loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    eager = statistics.median(time_calls(step, steps, warmup, sync=sync))
    graph, note = None, "no CUDA"
    if device.type == "cuda":
        note = ""
    try:
        if device.type != "cuda":
            raise RuntimeError("no CUDA device")
        captured = capture_graph(lambda: step(zero_grad=False), lambda: None)
        graph = statistics.median(time_calls(captured.replay, steps, warmup, sync=sync))
    except Exception as error:  # report, do not hide: the table says the capture failed
        note = f"graph capture failed: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
    return eager, graph, trainable, note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--models", default="wav2vec2,whisper")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--attention",
        default="cudnn",
        choices=["none", "xla", "cudnn"],
        help="the twins' attention_implementation",
    )
    args = parser.parse_args(argv)
    global ATTENTION
    ATTENTION = None if args.attention == "none" else args.attention
    label = f" [{args.attention} attention]"

    lines = [
        f"## Speech twins: LoRA r={RANK} on q,v, bf16, batch {BATCH} x {SECONDS} s; median of {args.steps} "
        f"steps after {args.warmup} warm-up",
        "",
        f"{jax.devices()[0].device_kind} · jax {jax.__version__} · {utc_timestamp()} · eval mode on both "
        "sides (no dropout, LayerDrop or SpecAugment); Whisper's input is always 80 x 3000 frames (30 s)",
        "",
        "| model | setup | trainable params | ms/step | x flax floor | vs torch CUDA graph | compile s | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in args.models.split(","):
        x = jnp.asarray(inputs(name))
        floor_ms = floor_compile = lora_ms = lora_compile = None
        flax_note = ""
        trainable = 0
        try:
            floor_ms, floor_compile = time_flax(
                *flax_floor_step(name, flax_model(name)), x, args.steps, args.warmup
            )
            print(f"{name}: flax floor {floor_ms:.2f} ms (compile {floor_compile:.0f} s)", flush=True)
            step, state, trainable = flax_lora_step(name, flax_model(name))
            lora_ms, lora_compile = time_flax(step, state, x, args.steps, args.warmup)
            del step, state
            print(f"{name}: flax LoRA {lora_ms:.2f} ms (compile {lora_compile:.0f} s)", flush=True)
        except Exception as error:  # e.g. cuDNN refusing a shape: reported in the table
            flax_note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
            print(f"{name}: flax {flax_note}", flush=True)
        eager = graph = None
        note = "torch not run"
        torch_trainable = trainable
        if not args.no_torch:
            eager, graph, torch_trainable, note = torch_rows(name, inputs(name), args.steps, args.warmup)
            print(f"{name}: torch eager {eager:.2f} ms, graph {fmt(graph, '.2f')} ms {note}", flush=True)
        rows = [
            ("flax floor" + label, 0, floor_ms, floor_compile, flax_note),
            ("flax LoRA" + label, trainable, lora_ms, lora_compile, flax_note),
            ("torch LoRA eager", torch_trainable, eager, None, ""),
            ("torch LoRA CUDA graph", torch_trainable, graph, None, note),
        ]
        for setup, params, ms, compile_s, row_note in rows:
            ratio = None if ms is None or floor_ms is None else ms / floor_ms
            vs_graph = None if ms is None or graph is None else ms / graph
            lines.append(
                f"| {name} | {setup} | {params:,} | {fmt(ms, '.2f')} | {fmt(ratio, '.2f')} | "
                f"{fmt(vs_graph, '.2f')} | {fmt(compile_s, '.0f')} | {row_note} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_report(args.out, text)


if __name__ == "__main__":
    main()
