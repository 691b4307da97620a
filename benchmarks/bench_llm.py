"""LLM benchmark: a LoRA training step of the Flax Llama twin against its frozen floor and against
torch + PEFT (eager and ``torch.compile``), peak memory, and greedy decoding tokens/s against
transformers' ``generate``.

Model: a ~1B Llama-style config (hidden 2048, 16 layers, 32 query / 8 key-value heads, MLP 8192,
vocabulary 32000, untied head), random weights, bfloat16 weights and compute on both sides; batch
4 x 2048 tokens; LoRA rank 16 (alpha 32) on every linear layer of the blocks (q, k, v, o, gate,
up, down: PEFT's ``all-linear``); AdamW; loss the mean next-token cross-entropy over float32
logits. Setups of the training table:

- ``flax floor``: the frozen Flax twin, forward + backward for the activations only (gradient
  with respect to the embeddings' output; no weight gradient, no optimizer): no adapter step
  can cost less;
- ``flax lora``: ``flax_impl.AdaptedModel`` + ``LoRA``, one ``jax.jit`` step (state split,
  donated) computing the gradients of the ``trainable`` filter and optax's AdamW update;
- ``torch+peft eager``, ``torch+peft compile``: transformers' ``LlamaForCausalLM`` (SDPA
  attention) with PEFT's LoRA on the same layers (PEFT keeps its factors in float32 on a bf16
  model: its default ``autocast_adapter_dtype``), ``torch.optim.AdamW`` (fused on CUDA), eager and
  under ``torch.compile(model)``.

The Flax twin runs its attention through cuDNN's flash attention on a GPU
(``attention_implementation="cudnn"``; ``--flax-attention`` to choose), the written-out
attention on CPU. Every case is prepared
(compiled, warmed up) first, then all are timed once a round for ``--rounds`` rounds in the same
order (per round the median of ``--steps`` synchronised calls); the tables give the median of the
rounds and their spread ``(max - min) / median``. Peak memory: PyTorch's allocator peak over the
case's warm-up; for Flax, XLA's compiled footprint of the step (arguments + outputs + temporaries
- donated aliases), since JAX's process-wide peak cannot be reset between cases.

Decoding: greedy, batch 4, a 128-token prompt, 128 new tokens, no eos, through the adapted models
(LoRA unmerged on both sides): the Flax twin's ``generate`` (the loop under ``jax.jit``, a
key/value cache) against transformers' ``generate`` on the PEFT model (its dynamic cache).

Usage::

    python benchmarks/bench_llm.py --out benchmarks/results/llm.md            # GPU, ~1B
    python benchmarks/bench_llm.py --quick --out /tmp/llm_quick.md             # tiny, CPU, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Both frameworks share one GPU: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import Timing, flax_adamw, fmt, interleaved, load_average, utc_timestamp, write_report  # noqa: E402
from examples.pretrained import hide_broken_torchaudio  # noqa: E402

hide_broken_torchaudio()  # transformers and PEFT import torchaudio; nothing here touches audio

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLAX_TARGETS = ["model.layers.*.self_attn.[qkvo]_proj", "model.layers.*.mlp.*_proj"]


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model config, training batch, decoding batch and step counts of one run."""

    config: dict
    batch: int
    seq: int
    decode_batch: int
    prompt: int
    new_tokens: int
    rank: int = 16
    alpha: float = 32.0


FULL = Shape(
    config=dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    batch=4,
    seq=2048,
    decode_batch=4,
    prompt=128,
    new_tokens=128,
)
QUICK = Shape(
    config=dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    batch=2,
    seq=64,
    decode_batch=2,
    prompt=16,
    new_tokens=16,
    rank=4,
    alpha=8.0,
)


@dataclasses.dataclass
class Case:
    """One timed setup: its step, what it reports besides time."""

    name: str
    run: Callable[[], object]
    tokens: int  # tokens per call (training: batch x seq; decoding: new tokens x batch)
    peak_mib: float | None = None
    compile_s: float | None = None
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config (CPU, seconds) instead of ~1B")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (>= 3 for a spread)")
    parser.add_argument("--steps", type=int, default=None, help="timed calls per round (default 5, quick 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torch.compile too (default: on a GPU only)",
    )
    parser.add_argument(
        "--flax-attention",
        choices=("auto", "cudnn", "xla", "none"),
        default="auto",
        help="the Flax twin's attention_implementation for training (auto: cudnn on a GPU, none on CPU)",
    )
    parser.add_argument(
        "--flax-grouped",
        action="store_true",
        help="also time 'flax lora grouped' (flax_impl.fused.group_shared_input on (q, k, v) and (gate, up)) and 'flax lora grouped+flatopt' (the same under optax.flatten)",
    )
    parser.add_argument(
        "--flax-fused",
        action="store_true",
        help="also time 'flax lora plain' (flax_impl.fused.disabled(): XLA's autodiff of the plain formula, the default before the fused path), 'flax lora fused+stacked' (with fused.stacked(): the MLP's gate/up outputs and down input gradient as one GEMM each) and 'flax lora fused+stacked+mlp-remat' (the same with set_mlp_remat())",
    )
    parser.add_argument("--no-decode", action="store_true", help="skip the decoding table")
    parser.add_argument("--no-torch", action="store_true", help="time the Flax cases only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/llm.md"), help="report file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1):
        parser.error("--rounds and --steps must be at least 1, --warmup at least 0")
    return args


# ----------------------------------------------------------------------------- Flax


def flax_model(shape: Shape, attention: str | None) -> Any:
    """The Flax Llama twin of ``shape`` in bf16, the same random weights each time (seed 0)."""
    import jax.numpy as jnp
    from flax import nnx

    from flax_impl.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(
        shape.config,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        attention_implementation=attention,
        rngs=nnx.Rngs(0),
    )
    model.eval()  # no dropout in the config anyway; eval keeps both sides alike
    return model


def _loss(logits: Any, ids: Any) -> Any:
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def flax_floor_step(model: Any) -> tuple[Callable, Any]:
    """The frozen floor: ``(step(state, ids), state)``, the gradient with respect to the
    embeddings' output only (a copy of the weights: the LoRA step donates its own)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.copy(), state)

    def floor(state: Any, ids: jax.Array) -> Any:
        model = nnx.merge(graphdef, state)
        hidden = model.model.embed_tokens(ids)
        return jax.value_and_grad(lambda h: _loss(model(None, inputs_embeds=h), ids))(hidden)

    return floor, state


def flax_lora_step(
    model: Any, shape: Shape, grouped: bool, flat_optimizer: bool = False
) -> tuple[Callable, Any, str]:
    """The README's step over ``model`` with LoRA on every linear layer: ``(step(state, ids),
    state, note)``; ``grouped``: q/k/v and gate/up share one down-projection GEMM."""
    import jax
    from flax import nnx

    import flax_impl

    adapted = flax_impl.AdaptedModel(
        model,
        flax_impl.LoRA,
        target_layers=FLAX_TARGETS,
        adapter_kwargs={"rank": shape.rank, "alpha": shape.alpha},
        rngs=nnx.Rngs(1),
    )
    groups = 0
    if grouped:  # one down-projection GEMM for the layers reading the same input
        groups = sum(
            flax_impl.fused.group_shared_input(adapted, names)
            for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
        )
    optimizer = nnx.Optimizer(adapted, flax_adamw(flat_optimizer), wrt=adapted.trainable)
    graphdef, state = nnx.split((adapted, optimizer))

    def lora_step(state: Any, ids: jax.Array) -> Any:
        adapted, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(
            lambda m: _loss(m(ids), ids), argnums=nnx.DiffState(0, adapted.trainable)
        )(adapted)
        optimizer.update(adapted, grads)
        return loss, nnx.state((adapted, optimizer))

    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(adapted, adapted.trainable)))
    note = f"{trainable:,} trainable" + (f"; {groups} shared-input groups" if grouped else "")
    return lora_step, state, note


def flax_cases(
    shape: Shape, args: argparse.Namespace, ids_np: Any, prompt_np: Any
) -> tuple[list[Case], list[Case]]:
    """The Flax floor and LoRA steps, and the Flax decoding case."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import flax_impl
    from flax_impl.models.llama import LlamaForCausalLM

    on_gpu = jax.default_backend() == "gpu"
    attention = {"auto": "cudnn" if on_gpu else None, "none": None}.get(
        args.flax_attention, args.flax_attention
    )
    ids = jnp.asarray(ids_np)
    model = flax_model(shape, attention)
    floor, state = flax_floor_step(model)
    floor_case = _compiled_case(
        "flax floor", jax.jit(floor), (state, ids), donate=False, shape=shape, args=args
    )

    def lora_case(name: str, model: Any, grouped: bool, flat_optimizer: bool = False) -> Case:
        step, state, note = flax_lora_step(model, shape, grouped, flat_optimizer)
        case = _compiled_case(
            name, jax.jit(step, donate_argnums=0), (state, ids), donate=True, shape=shape, args=args
        )
        case.note = f"{note}; attention {attention or 'written out'}"
        return case

    cases = [floor_case, lora_case("flax lora", model, grouped=False)]
    if args.flax_grouped:
        cases.append(lora_case("flax lora grouped", flax_model(shape, attention), grouped=True))
        cases.append(
            lora_case(
                "flax lora grouped+flatopt", flax_model(shape, attention), grouped=True, flat_optimizer=True
            )
        )
    if args.flax_fused:  # the plain formula; flax_impl.fused's backward with its stacked GEMMs
        with flax_impl.fused.disabled():
            cases.append(lora_case("flax lora plain", flax_model(shape, attention), grouped=False))
        with flax_impl.fused.enabled():
            with flax_impl.fused.stacked():
                cases.append(
                    lora_case("flax lora fused+stacked", flax_model(shape, attention), grouped=False)
                )
                remat = flax_model(shape, attention)
                remat.set_mlp_remat(True)  # the MLP's elementwise results recomputed, not kept
                cases.append(lora_case("flax lora fused+stacked+mlp-remat", remat, grouped=False))
    decode = []
    if not args.no_decode:
        prompt = jnp.asarray(prompt_np)
        # generate's state: the adapted model after the (donated) training steps left it alone.
        fresh = flax_impl.AdaptedModel(
            LlamaForCausalLM(shape.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
            flax_impl.LoRA,
            target_layers=FLAX_TARGETS,
            adapter_kwargs={"rank": shape.rank, "alpha": shape.alpha},
            rngs=nnx.Rngs(1),
        )
        fresh.eval()

        def generate() -> None:
            jax.block_until_ready(fresh.generate(prompt, shape.new_tokens, eos_token_id=[]))

        began = time.perf_counter()
        generate()
        case = Case("flax generate", generate, shape.decode_batch * shape.new_tokens)
        case.compile_s = time.perf_counter() - began
        for _ in range(args.warmup):
            generate()
        decode.append(case)
    return cases, decode


def _compiled_case(
    name: str, fn: Any, arguments: tuple, donate: bool, shape: Shape, args: argparse.Namespace
) -> Case:
    import jax

    began = time.perf_counter()
    compiled = fn.lower(*arguments).compile()
    compile_s = time.perf_counter() - began
    analysis = compiled.memory_analysis()
    peak = None
    if analysis is not None:
        peak = (
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes
        ) / 2**20
    holder = [arguments[0]]
    rest = arguments[1:]

    def run() -> None:
        out = compiled(holder[0], *rest)
        if donate:
            loss, holder[0] = out
        else:
            loss = out[0]
        jax.block_until_ready(loss)

    for _ in range(args.warmup):
        run()
    return Case(name, run, shape.batch * shape.seq, peak_mib=peak, compile_s=compile_s)


# ----------------------------------------------------------------------------- PyTorch


def torch_cases(
    shape: Shape, args: argparse.Namespace, ids_np: Any, prompt_np: Any
) -> tuple[list[Case], list[Case]]:
    """torch + PEFT eager (and compiled) steps, and transformers' generate on the PEFT model."""
    import peft
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    compile_too = cuda if args.compile is None else args.compile
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def build() -> Any:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**shape.config)
        base = transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
        lora = peft.LoraConfig(r=shape.rank, lora_alpha=shape.alpha, target_modules=TARGETS, lora_dropout=0.0)
        return peft.get_peft_model(base, lora)

    ids = torch.from_numpy(ids_np).to(device)

    def make_step(model: Any) -> Callable[[], None]:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
            loss.backward()
            optimizer.step()
            sync()

        return step

    cases = []
    eager_model = build()
    cases.append(_torch_case("torch+peft eager", make_step(eager_model), shape, args, cuda))
    trainable = sum(p.numel() for p in eager_model.parameters() if p.requires_grad)
    cases[-1].note = f"{trainable:,} trainable (float32 factors); SDPA attention"
    if compile_too:
        compiled_model = build()
        compiled_model.forward = torch.compile(compiled_model.forward)
        try:
            cases.append(_torch_case("torch+peft compile", make_step(compiled_model), shape, args, cuda))
        except Exception as exc:  # inductor needs a compiler toolchain; say why the row is missing
            print(f"torch.compile failed, row left out: {type(exc).__name__}: {exc}", file=sys.stderr)
    decode = []
    if not args.no_decode:
        eager_model.eval()
        prompt = torch.from_numpy(prompt_np).to(device)

        def generate() -> None:
            with torch.no_grad():
                eager_model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=shape.new_tokens,
                    min_new_tokens=shape.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            sync()

        decode.append(
            _torch_case(
                "transformers generate",
                generate,
                shape,
                args,
                cuda,
                tokens=shape.decode_batch * shape.new_tokens,
            )
        )
    return cases, decode


def _torch_case(
    name: str,
    run: Callable[[], None],
    shape: Shape,
    args: argparse.Namespace,
    cuda: bool,
    tokens: int | None = None,
) -> Case:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    run()  # torch.compile compiles here
    compile_s = time.perf_counter() - began
    for _ in range(args.warmup):
        run()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return Case(name, run, tokens or shape.batch * shape.seq, peak_mib=peak, compile_s=compile_s)


# ----------------------------------------------------------------------------- report


def report(
    shape: Shape,
    args: argparse.Namespace,
    training: list[Case],
    train_times: dict[str, Timing],
    decoding: list[Case],
    decode_times: dict[str, Timing],
    devices: str,
) -> str:
    c = shape.config
    lines = [
        "# LLM benchmark: LoRA training step and greedy decoding, Flax twin vs torch + PEFT",
        "",
        f"{utc_timestamp()}; {devices}; load average {load_average()}.",
        "",
        f"Llama-style model ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
        f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads, MLP {c['intermediate_size']}, "
        f"vocabulary {c['vocab_size']}), bfloat16, batch {shape.batch} x {shape.seq} tokens, LoRA rank "
        f"{shape.rank} on q, k, v, o, gate, up, down. {args.rounds} interleaved rounds, per round the "
        f"median of {args.steps} calls; spread = (max - min) / median over the rounds."
        + (" **Quick run (tiny config): not a measurement of the ~1B model.**" if args.quick else ""),
        "",
        "| setup | ms / step | spread | tokens / s | x flax floor | peak MiB | compile s | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    floor = train_times["flax floor"].median
    for case in training:
        t = train_times[case.name]
        lines.append(
            f"| {case.name} | {t.median:.1f} | {t.spread:.1%} | {case.tokens / t.median * 1e3:,.0f} | "
            f"{t.median / floor:.2f} | {fmt(case.peak_mib, ',.0f')} | {fmt(case.compile_s, '.1f')} | {case.note} |"
        )
    if decoding:
        reference = decode_times.get("transformers generate")
        lines += [
            "",
            f"Greedy decoding: batch {shape.decode_batch}, prompt {shape.prompt} tokens, {shape.new_tokens} new "
            "tokens, no eos, LoRA unmerged.",
            "",
            "| decoder | ms / call | spread | new tokens / s | x transformers | compile s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for case in decoding:
            t = decode_times[case.name]
            versus = reference.median / t.median if reference else None
            lines.append(
                f"| {case.name} | {t.median:.1f} | {t.spread:.1%} | {case.tokens / t.median * 1e3:,.1f} | "
                f"{fmt(versus, '.2f')} | {fmt(case.compile_s, '.1f')} |"
            )
    lines += [
        "",
        "Peak MiB: PyTorch's allocator peak over the case's warm-up (weights included); Flax: XLA's "
        "compiled footprint of the step (arguments + outputs + temporaries - donated aliases). "
        "`x transformers` > 1 means the Flax decoder is faster.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shape = QUICK if args.quick else FULL
    args.steps = args.steps or (3 if args.quick else 5)
    import jax
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    ids = rng.integers(3, shape.config["vocab_size"], (shape.batch, shape.seq)).astype(np.int64)
    prompt = rng.integers(3, shape.config["vocab_size"], (shape.decode_batch, shape.prompt)).astype(np.int64)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    log("preparing Flax cases")
    flax_train, flax_decode = flax_cases(shape, args, ids, prompt)
    log("preparing PyTorch cases")
    torch_train, torch_decode = ([], []) if args.no_torch else torch_cases(shape, args, ids, prompt)
    training = flax_train + torch_train
    decoding = flax_decode + torch_decode
    log(f"timing {len(training)} training cases, {args.rounds} rounds")
    train_times = interleaved({c.name: c.run for c in training}, args.rounds, args.steps, log=log)
    devices = (
        f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or 'CPU'}"
    )
    # The training table first, so that a time limit hit while decoding still leaves it on disk.
    write_report(args.out, report(shape, args, training, train_times, [], {}, devices))
    decode_times = {}
    if decoding:
        log(f"timing {len(decoding)} decoding cases")
        decode_times = interleaved(
            {c.name: c.run for c in decoding}, args.rounds, max(1, args.steps // 2), log=log
        )
    text = report(shape, args, training, train_times, decoding, decode_times, devices)
    write_report(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
