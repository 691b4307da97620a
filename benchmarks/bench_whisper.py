"""Whisper benchmark: LoRA (r=16, all linear layers) training and greedy decoding of the whole
Flax twin against its frozen floor and against PyTorch, in interleaved rounds.

Model: whisper-small's config (d_model 768, 12 + 12 layers, 12 heads, FFN 3072, vocab 51865,
80 mel bins, 1500 encoder positions), random init from a config dict (no download). Batch 8 x 30 s
(80 x 3000 log-mel frames; Whisper pads every input to 30 s) and 64 decoder tokens for training;
bf16 compute on both sides (Flax: ``dtype=bfloat16`` with float32 parameters; torch:
``torch.autocast(bfloat16)``), eval mode (no dropout), teacher-forced cross-entropy.

Rows:

- ``flax floor``: the frozen Flax model, forward + backward with the gradient taken w.r.t. the
  encoder's embedded frames only (no weight gradient), jitted: the cheapest a LoRA step could be;
- ``flax LoRA``: ``flax_impl.AdaptedModel(all_linear=True)`` + ``flax_impl.LoRA``, optax AdamW on
  ``model.trainable``, one ``jax.jit`` step with donated state;
- ``flax LoRA <variant>`` (``--flax-variants``, opt-ins of issue 24): ``grouped``
  (``flax_impl.fused.group_shared_input`` on every attention's ``q_proj``, ``k_proj``,
  ``v_proj``: one down-projection GEMM for the layers reading the same input),
  ``factor-copies`` (the step carries bf16 copies of the float32 factors,
  ``fused.value_and_grad_with_factors``: no factor casts in the forward and backward), or both;
- ``torch LoRA eager`` / ``torch LoRA CUDA graph``: transformers' ``WhisperModel`` under
  SpeechBrain's names (logits through ``embed_tokens``: the same 192 linear layers as the Flax
  twin, no ``proj_out``), ``torch_impl.AdaptedModel(all_linear=True)``, fused capturable AdamW,
  eager and captured whole in a CUDA graph;
- ``flax generate`` / ``transformers generate``: greedy decoding of batch 8 from the start token,
  128 new tokens (end of sequence disabled so every row runs the full length), tokens per second
  including the encoder; transformers' is ``GenerationMixin.generate`` (greedy, its KV cache),
  under autocast.

Each case runs once per round, in the same order, ``--rounds`` rounds (at least 3); the table
shows the median over rounds of each round's median and the spread ``(max - min) / median``.
``--quick`` runs a tiny config on CPU in seconds (to check the script, not to measure).

Each timed Flax call waits for its loss, so the host's time a call (flattening the ``nnx.State``
of 1,759 leaves, dispatching its buffers) adds to the GPU's: on one H100 host (2026-12-08) the
default LoRA step took 49-50 ms a waited call and 40.4 ms a step with ten steps dispatched before
one wait (floor 30.6 / 26.5). ``--state-as leaves`` passes the state as a flat list of arrays
(the JAX guide's step) and ``--pipelined N`` dispatches N steps before each wait, as a training
loop that does not read every loss does; the table is then per step.

Usage::

    python benchmarks/bench_whisper.py --out benchmarks/results/whisper.md
    python benchmarks/bench_whisper.py --quick
    python benchmarks/bench_whisper.py --no-torch --state-as leaves --pipelined 10 --flax-variants fused
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks._common import (  # noqa: E402
    RANK,
    flax_adamw,
    fmt,
    interleaved,
    state_as_leaves,
    utc_timestamp,
    write_report,
)
from flax_impl import AdaptedModel, LoRA, fused  # noqa: E402
from flax_impl.models import WhisperForConditionalGeneration  # noqa: E402

WHISPER_SMALL = dict(
    d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072,
    decoder_layers=12, decoder_attention_heads=12, decoder_ffn_dim=3072, vocab_size=51865,
    num_mel_bins=80, max_source_positions=1500, max_target_positions=448, pad_token_id=50257,
    bos_token_id=50257, eos_token_id=None, decoder_start_token_id=50258, suppress_tokens=None,
    begin_suppress_tokens=None,
)  # fmt: skip
TINY = dict(
    WHISPER_SMALL, d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
    decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=64, num_mel_bins=8,
    max_source_positions=12, max_target_positions=32, pad_token_id=1, bos_token_id=2,
    decoder_start_token_id=2,
)  # fmt: skip


class Setup:
    """Sizes of one run."""

    def __init__(self, quick: bool) -> None:
        self.config = TINY if quick else WHISPER_SMALL
        self.batch = 2 if quick else 8
        self.target_length = 8 if quick else 64
        self.new_tokens = 8 if quick else 128
        self.attention = None if quick else "cudnn"
        self.leaves = False  # --state-as leaves
        self.pipelined = 1  # --pipelined: training steps a timed call dispatches before it waits

    def inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features ``(batch, mel, frames)``, decoder inputs and labels ``(batch, target_length)``."""
        rng = np.random.default_rng(0)
        c = self.config
        features = rng.standard_normal((self.batch, c["num_mel_bins"], 2 * c["max_source_positions"]))
        tokens = rng.integers(3, c["vocab_size"], (self.batch, self.target_length + 1))
        tokens[:, 0] = c["decoder_start_token_id"]
        return features.astype(np.float32), tokens[:, :-1], tokens[:, 1:]


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def flax_model(setup: Setup) -> WhisperForConditionalGeneration:
    model = WhisperForConditionalGeneration(
        setup.config, dtype=jnp.bfloat16, attention_implementation=setup.attention, rngs=nnx.Rngs(0)
    )
    model.eval()
    return model


def flax_floor(setup: Setup, features: jax.Array, ids: jax.Array, labels: jax.Array) -> Runner:
    graphdef, state = nnx.split(flax_model(setup))

    @partial(jax.jit, donate_argnums=0)
    def step(state: nnx.State, features: jax.Array) -> tuple[jax.Array, nnx.State]:
        model = nnx.merge(graphdef, state)
        encoder = model.model.encoder

        def loss_fn(frames: jax.Array) -> jax.Array:
            logits = model.logits(model.model.decoder(ids, encoder.encode(frames)))
            return _cross_entropy(logits, labels)

        loss, grad = jax.value_and_grad(loss_fn)(encoder.embed(features))
        return (loss, grad), nnx.state(model)

    return _runner(setup, step, state, features)


VARIANTS: dict[str, dict[str, bool]] = {
    "grouped": {"grouped": True},
    "factor-copies": {"factor_copies": True},
    "grouped+factor-copies": {"grouped": True, "factor_copies": True},
    # The combination that measured 0.915x the default step at BERT-base (one H100, 2026-12-07).
    "grouped+factor-copies+flatopt": {"grouped": True, "factor_copies": True, "flat_optimizer": True},
    # XLA's autodiff of the plain formula (fused.disabled()), the default before the fused path.
    "plain": {"plain": True},
    # flax_impl.fused's backward (the default), then with its stacked GEMMs (fc1's output, fc2's
    # dx; issue 24).
    "fused": {"fused_path": True},
    "fused+stacked": {"fused_path": True, "stacked": True},
    # The same with each factor gradient as one GEMM over the 12,000 encoder tokens, which XLA
    # pads for its split-K (the fused path slices them; bench_thin_gemms.py).
    "fused+stacked unsliced": {"fused_path": True, "stacked": True, "unsliced": True},
    # The fused path with one AdamW update over every factor (optax.flatten): 2 state leaves for
    # the moments instead of 768, and one update kernel instead of one a factor (384 a step).
    "fused+flatopt": {"fused_path": True, "flat_optimizer": True},
}


def flax_lora(
    setup: Setup,
    features: jax.Array,
    ids: jax.Array,
    labels: jax.Array,
    grouped: bool = False,
    factor_copies: bool = False,
    flat_optimizer: bool = False,
    fused_path: bool = False,
    stacked: bool = False,
    unsliced: bool = False,
    plain: bool = False,
) -> tuple[Runner, int]:
    """The LoRA step; ``grouped``: ``fused.group_shared_input`` on each attention's q, k, v (the
    cross-attention's k, v); ``factor_copies``: the step carries bf16 copies of the float32
    factors (``fused.value_and_grad_with_factors``), no casts in its forward and backward;
    ``flat_optimizer``: AdamW under ``optax.flatten``; ``fused_path`` (and ``stacked``): traced
    under ``fused.enabled()`` (and ``fused.stacked()``); ``unsliced``: the fused path's factor
    gradients as one GEMM each, not sliced along the tokens; ``plain``: traced under
    ``fused.disabled()``."""
    # The switches are read when the step is traced: by _runner's compilation, inside the block.
    with (
        fused.enabled() if fused_path else contextlib.nullcontext(),
        fused.disabled() if plain else contextlib.nullcontext(),
        fused.stacked() if stacked else contextlib.nullcontext(),
        mock.patch.object(fused, "_SLICED_FACTOR_GRADIENTS", not unsliced),
    ):
        return _flax_lora(setup, features, ids, labels, grouped, factor_copies, flat_optimizer)


def _flax_lora(
    setup: Setup,
    features: jax.Array,
    ids: jax.Array,
    labels: jax.Array,
    grouped: bool,
    factor_copies: bool,
    flat_optimizer: bool,
) -> tuple[Runner, int]:
    adapted = AdaptedModel(
        flax_model(setup), LoRA, all_linear=True, adapter_kwargs={"rank": RANK}, rngs=nnx.Rngs(1)
    )
    for path, variable in nnx.to_flat_state(nnx.state(adapted, adapted.trainable)):
        if "adapter_up_proj" in [str(p) for p in path]:  # non-zero, as after some training
            variable.set_value(jnp.full(variable.get_value().shape, 0.01, variable.get_value().dtype))
    if grouped:
        fused.group_shared_input(adapted, ("q_proj", "k_proj", "v_proj"))
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(adapted, adapted.trainable)))
    optimizer = nnx.Optimizer(adapted, flax_adamw(flat_optimizer), wrt=adapted.trainable)
    graphdef, state = nnx.split((adapted, optimizer))
    wrt = adapted.trainable

    def loss_fn(model: Any) -> jax.Array:
        return _cross_entropy(model(features, ids), labels)

    if factor_copies:

        @partial(jax.jit, donate_argnums=0)
        def step_with_copies(carry: tuple, features: jax.Array) -> tuple[jax.Array, tuple]:
            model, optimizer = nnx.merge(graphdef, carry[0])
            loss, grads = fused.value_and_grad_with_factors(loss_fn, model, carry[1], wrt=wrt)
            optimizer.update(model, grads)
            return loss, (nnx.state((model, optimizer)), fused.compute_dtype_factors(model))

        return _runner(
            setup, step_with_copies, (state, fused.compute_dtype_factors(adapted)), features
        ), trainable

    @partial(jax.jit, donate_argnums=0)
    def step(state: nnx.State, features: jax.Array) -> tuple[jax.Array, nnx.State]:
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    return _runner(setup, step, state, features), trainable


class Runner:
    """``pipelined`` calls of a jitted step over its donated state, then a wait for the last loss;
    compiled ahead of time (while the caller's switches are on: they are read when the step is
    traced). ``leaves``: the step takes and returns its state as a flat list of arrays (the JAX
    guide's step) instead of an ``nnx.State``, whose flattening costs the host ~4.4 ms a call for
    the LoRA step's 1,759 leaves (one H100 host, 2026-12-08). ``compiled`` is kept for
    ``profile_llm.py --model whisper``, which matches the trace's kernels to its HLO."""

    def __init__(
        self, step: Any, state: Any, features: jax.Array, leaves: bool = False, pipelined: int = 1
    ) -> None:
        if leaves:
            over_leaves, state = state_as_leaves(step, state)
            step = jax.jit(over_leaves, donate_argnums=0)
        self.compiled = step.lower(state, features).compile()
        self.state, self.features, self.pipelined = state, features, pipelined

    def __call__(self) -> None:
        for _ in range(self.pipelined):
            out, self.state = self.compiled(self.state, self.features)
        jax.block_until_ready(out)


def _runner(setup: Setup, step: Any, state: Any, features: jax.Array) -> Runner:
    run = Runner(step, state, features, setup.leaves, setup.pipelined)
    run()  # the first call, outside the timings
    return run


def flax_generate(setup: Setup, features: jax.Array) -> Callable[[], Any]:
    model = flax_model(setup)
    prompt = jnp.full((setup.batch, 1), setup.config["decoder_start_token_id"], jnp.int32)

    def run() -> None:
        jax.block_until_ready(model.generate(features, prompt, setup.new_tokens))

    run()
    return run


def torch_cases(
    setup: Setup, features: np.ndarray, ids: np.ndarray, labels: np.ndarray
) -> tuple[dict, int, str]:
    """The torch training step (eager, and a CUDA graph where there is CUDA) and transformers' generate."""
    import torch
    import transformers

    import torch_impl
    from benchmarks.bench_train import capture_graph

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = transformers.WhisperConfig(**setup.config)
    whole = transformers.WhisperForConditionalGeneration(config).to(device).eval()

    class SpeechBrainNames(torch.nn.Module):  # transformers' WhisperModel as SpeechBrain's lobe holds it
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.WhisperModel(config)

        def forward(self, features: Any, ids: Any) -> Any:
            hidden = self.model(features, decoder_input_ids=ids).last_hidden_state
            return hidden @ self.model.decoder.embed_tokens.weight.T

    model = torch_impl.AdaptedModel(
        SpeechBrainNames(), torch_impl.LoRA, all_linear=True, adapter_kwargs={"rank": RANK}
    ).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_up_proj" in name:
                p.fill_(0.01)
    model.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda, capturable=cuda
    )
    x, i, y = (torch.from_numpy(a).to(device) for a in (features, ids, labels))

    def step(zero_grad: bool = True) -> Any:
        if zero_grad:
            # In place: the CUDA graph captured these gradient buffers; eager steps keep them.
            optimizer.zero_grad(set_to_none=False)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x, i)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        optimizer.step()
        return loss

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            fn()
            sync()

        return run

    step()  # creates the gradients and the optimizer state the graph captures
    cases = {"torch LoRA eager": synced(step)}
    note = "no CUDA: no graph"
    if cuda:
        try:
            graph = capture_graph(lambda: step(zero_grad=False), lambda: None)
            cases["torch LoRA CUDA graph"] = synced(graph.replay)
            note = ""
        except Exception as error:  # reported in the table, not hidden
            note = f"graph capture failed: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
    start = torch.full((setup.batch, 1), setup.config["decoder_start_token_id"], device=device)

    def generate() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            transformers.GenerationMixin.generate(
                whole, input_features=x, decoder_input_ids=start, max_new_tokens=setup.new_tokens,
                min_new_tokens=setup.new_tokens, do_sample=False, num_beams=1,
            )  # fmt: skip
        sync()

    generate()
    cases["transformers generate"] = generate
    return cases, trainable, note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed calls per case per round")
    parser.add_argument("--quick", action="store_true", help="a tiny config on CPU, in seconds")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-generate", action="store_true", help="skip the Flax decoding case")
    parser.add_argument(
        "--no-default-lora",
        action="store_true",
        help="skip the default Flax LoRA step (time the floor and the --flax-variants only)",
    )
    parser.add_argument(
        "--state-as",
        choices=("state", "leaves"),
        default="state",
        help="the Flax steps take their state as an nnx.State (as the README's step) or as a flat list of arrays",
    )
    parser.add_argument(
        "--pipelined",
        type=int,
        default=1,
        help="training steps a timed Flax call dispatches before it waits (ms are per step): >1 hides the host's "
        "time a call behind the GPU's, as a training loop that does not wait for each loss does",
    )
    parser.add_argument(
        "--flax-variants",
        default="",
        help="','-separated opt-in Flax LoRA steps to time too: " + ", ".join(VARIANTS),
    )
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (a median and a spread need them)")
    if args.pipelined < 1:
        parser.error("--pipelined must be at least 1 (steps dispatched before each wait)")
    setup = Setup(args.quick)
    setup.leaves, setup.pipelined = args.state_as == "leaves", args.pipelined
    features, ids, labels = setup.inputs()
    fx, fi, fl = jnp.asarray(features), jnp.asarray(ids), jnp.asarray(labels)

    started = time.perf_counter()
    cases: dict[str, Callable[[], Any]] = {"flax floor": flax_floor(setup, fx, fi, fl)}
    params: dict[str, int | None] = {}
    if not args.no_default_lora:
        cases["flax LoRA"], params["flax LoRA"] = flax_lora(setup, fx, fi, fl)
    for variant in filter(None, args.flax_variants.split(",")):
        if variant not in VARIANTS:
            parser.error(f"--flax-variants: {variant!r} is none of {sorted(VARIANTS)}")
        name = f"flax LoRA {variant}"
        cases[name], params[name] = flax_lora(setup, fx, fi, fl, **VARIANTS[variant])
    if not args.no_generate:
        cases["flax generate"] = flax_generate(setup, fx)
    note, torch_trainable = "torch not run", None
    if not args.no_torch:
        torch_c, torch_trainable, note = torch_cases(setup, features, ids, labels)
        cases.update(torch_c)
    print(
        f"built and compiled in {time.perf_counter() - started:.0f} s; timing {args.rounds} rounds",
        flush=True,
    )
    timings = interleaved(cases, args.rounds, args.steps, log=lambda line: print(line, flush=True))
    for name, timing in timings.items():  # per training step
        if name.startswith("flax") and "generate" not in name:
            timing.rounds = [ms / setup.pipelined for ms in timing.rounds]

    tokens = setup.batch * setup.new_tokens
    floor = timings["flax floor"].median
    graph = timings.get("torch LoRA CUDA graph") or timings.get("torch LoRA eager")
    c = setup.config
    lines = [
        f"## Whisper{' (quick: tiny config)' if args.quick else '-small'}: LoRA r={RANK} on all linear layers, bf16, "
        f"batch {setup.batch} x 30 s, {setup.target_length} target tokens; greedy decoding of {setup.new_tokens} tokens",
        "",
        f"{jax.devices()[0].device_kind} · jax {jax.__version__} · {utc_timestamp()} · d_model {c['d_model']}, "
        f"{c['encoder_layers']} + {c['decoder_layers']} layers, vocab {c['vocab_size']}; {args.rounds} interleaved "
        f"rounds of {args.steps} calls, median of the round medians and spread (max - min) / median; Flax state "
        f"as {'a flat list of arrays' if setup.leaves else 'an nnx.State'}, {setup.pipelined} step(s) dispatched "
        "before each wait",
        "",
        "| case | trainable params | ms a step (generate: a call) | spread | x flax floor | vs torch step | tokens/s | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    params.update({"torch LoRA eager": torch_trainable, "torch LoRA CUDA graph": torch_trainable})
    for name, timing in timings.items():
        decoding = "generate" in name
        ms = timing.median
        lines.append(
            f"| {name} | {fmt(params.get(name), ',')} | {ms:.2f} | {timing.spread:.1%} | "
            f"{'-' if decoding else fmt(ms / floor, '.2f')} | "
            f"{'-' if decoding or graph is None else fmt(ms / graph.median, '.2f')} | "
            f"{fmt(tokens / ms * 1e3, ',.0f') if decoding else '-'} | "
            f"{note if name.startswith('torch') else ''} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_report(args.out, text)


if __name__ == "__main__":
    main()
