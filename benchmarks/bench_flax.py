"""Flax benchmark: a jitted LoRA training step on the Flax BERT twin against the jitted floor.

Model: ``flax_impl.models.bert.BertModel`` (the NNX twin of ``transformers.BertModel``, BERT-base
shape, random init, dropout on), batch 32 x 128 tokens, rank 16, ``optax.adamw``, loss
``mean(h.astype(float32)**2)`` over the last hidden state. Rows, each one ``jax.jit`` of a pure
function over ``nnx.split`` state (so NNX's Python bookkeeping stays out of the timing):

- ``floor``: forward + backward of the frozen encoder with the gradient taken with respect to
  the embedding output only (XLA computes no weight gradient);
- ``full``: full fine-tuning (``wrt=nnx.Param``);
- ``ours``: ``flax_impl.AdaptedModel`` + ``flax_impl.LoRA``, optimised with ``wrt=model.trainable``;
- ``nnx.LoRA``: Flax's own ``nnx.LoRA`` wrapped around the same layers, ``wrt=nnx.LoRAParam``.

bf16 rows build the model with ``dtype=bfloat16`` (float32 parameters, bf16 compute: the analogue
of torch autocast); float32 rows use full float32 matmuls (``jax_default_matmul_precision =
'highest'``, as torch's default, TF32 off). The median of ``--steps`` steps after ``--warmup``
(compilation happens before) is reported, each ended by ``block_until_ready``; ``temp MiB`` is
XLA's compiled temporary buffer size. ``--device cpu`` runs a smaller shape.

Usage::

    python benchmarks/bench_flax.py --out benchmarks/results/flax_gpu.md
    JAX_PLATFORMS=cpu python benchmarks/bench_flax.py --device cpu --out benchmarks/results/flax_cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import _common  # noqa: E402
from benchmarks._common import BERT_TARGETS as TARGETS  # noqa: E402
from benchmarks._common import RANK, Shape, bert_summary, fmt, time_calls, with_counts, write_report  # noqa: E402
from flax_impl import AdaptedModel, LoRA  # noqa: E402
from flax_impl.graph import get_submodule, set_submodule  # noqa: E402
from flax_impl.models.bert import BertConfig, BertModel  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "fp32": None}

SHAPES = {
    "gpu": Shape(config={}, batch=32, seq=128, steps=30, warmup=5),
    "cpu": _common.BERT_CPU_SHAPE,
}


@dataclasses.dataclass
class Row:
    """One measured line of the table."""

    setup: str
    targets: str
    dtype: str
    trainable: int
    ms: float
    temp_mib: float | None
    ratio: float | None = None


def _target_names(model: nnx.Module, patterns: list[str]) -> list[str]:
    from converters.naming import matches_any
    from flax_impl.graph import named_modules

    return [name for name, module in named_modules(model) if matches_any(name, patterns)]


def _randomize(model: nnx.Module, leaf_names: tuple[str, ...], key: jax.Array) -> None:
    """A fresh LoRA has a zero up factor; time on non-zero weights, as after some training."""
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        if any(str(part) in leaf_names for part in path[-2:]):
            key, sub = jax.random.split(key)
            value = variable.get_value()
            variable.set_value(0.02 * jax.random.normal(sub, value.shape, value.dtype))


def build(setup: str, targets: str, dtype: str, shape: Shape):
    """Return ``(model, trainable filter or None)`` for one row."""
    config = BertConfig(**shape.config)
    model = BertModel(config, dtype=DTYPES[dtype], rngs=nnx.Rngs(0))
    if setup in ("floor", "full"):
        return model, (nnx.Param if setup == "full" else None)
    if setup == "ours":
        adapted = AdaptedModel(
            model, LoRA, target_layers=TARGETS[targets], adapter_kwargs={"rank": RANK}, rngs=nnx.Rngs(1)
        )
        _randomize(adapted, ("adapter_up_proj",), jax.random.key(2))
        return adapted, adapted.trainable
    if setup == "nnx.LoRA":
        rngs = nnx.Rngs(1)
        for name in _target_names(model, TARGETS[targets]):
            linear = get_submodule(model, name)
            lora = nnx.LoRA(
                linear.in_features,
                RANK,
                linear.out_features,
                base_module=linear,
                dtype=DTYPES[dtype],
                rngs=rngs,
            )
            set_submodule(model, name, lora)
        _randomize(model, ("lora_b",), jax.random.key(2))
        return model, nnx.LoRAParam
    raise ValueError(f"unknown setup {setup!r}")


def _loss(hidden: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(hidden.astype(jnp.float32)))


def make_floor_step(model: nnx.Module):
    """Jitted forward + backward of the frozen encoder, gradient w.r.t. the embedding output."""
    graphdef, state = nnx.split(model)

    @partial(jax.jit, donate_argnums=0)
    def step(state, ids):
        model = nnx.merge(graphdef, state)
        hidden0 = model.embeddings(ids)
        # argnums=0: the gradient is taken w.r.t. the hidden states only; the model rides along.
        loss, grad = nnx.value_and_grad(lambda h, m: _loss(m.encoder(h)), argnums=0)(hidden0, model)
        return (loss, grad), nnx.state(model)

    return step, state


def make_train_step(model: nnx.Module, wrt):
    """Jitted training step updating only ``wrt`` with AdamW."""
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=wrt)
    graphdef, state = nnx.split((model, optimizer))

    @partial(jax.jit, donate_argnums=0)
    def step(state, ids):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(ids)), argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    return step, state


def bench(setup: str, targets: str, dtype: str, shape: Shape, key: jax.Array) -> Row:
    model, wrt = build(setup, targets, dtype, shape)
    trainable = 0 if wrt is None else sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
    step, state = make_floor_step(model) if wrt is None else make_train_step(model, wrt)
    del model
    ids = jax.random.randint(key, (shape.batch, shape.seq), 0, BertConfig(**shape.config).vocab_size)
    start = time.perf_counter()
    compiled = step.lower(state, ids).compile()
    print(f"  compiled {setup} {targets} {dtype} in {time.perf_counter() - start:.1f} s", flush=True)
    analysis = compiled.memory_analysis()
    temp_mib = analysis.temp_size_in_bytes / 2**20 if analysis is not None else None
    holder = [state]

    def run() -> None:
        out, holder[0] = compiled(holder[0], ids)
        jax.block_until_ready(out)

    ms = statistics.median(time_calls(run, shape.steps, shape.warmup))
    return Row(setup, targets, dtype, trainable, ms, temp_mib)


SETUPS = [
    ("floor", "-"),
    ("full", "-"),
    ("ours", "q,v"),
    ("nnx.LoRA", "q,v"),
    ("ours", "q,k,v,o"),
    ("nnx.LoRA", "q,k,v,o"),
]


def table(rows: list[Row]) -> str:
    lines = [
        "| setup | targets | dtype | trainable params | ms/step | x floor | XLA temp MiB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.setup} | {r.targets} | {r.dtype} | {r.trainable:,} | {r.ms:.2f} | "
            f"{fmt(r.ratio, '.2f')} | {fmt(r.temp_mib, '.0f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=jax.default_backend(), help="gpu or cpu (JAX's backend)")
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--setups", help="comma list of setup names (default: all; floor always runs)")
    args = parser.parse_args(argv)

    jax.config.update("jax_default_matmul_precision", "highest")
    kind = "gpu" if args.device in ("gpu", "cuda") else "cpu"
    if jax.default_backend() != kind:
        raise SystemExit(f"JAX's backend is {jax.default_backend()!r}, not {kind!r}; set JAX_PLATFORMS")
    shape = with_counts(SHAPES[kind], args.steps, args.warmup)
    config = BertConfig(**shape.config)
    device = jax.devices()[0]
    environment = " · ".join(
        [
            f"{kind.upper()}: {getattr(device, 'device_kind', str(device))}"
            + (f" (load average {_common.load_average()} at start)" if kind == "cpu" else ""),
            f"jax {jax.__version__}",
            f"flax {flax.__version__}",
            f"optax {optax.__version__}",
            "float32 matmul precision 'highest'",
            _common.utc_timestamp(),
        ]
    )
    header = (
        f"## Flax NNX: BERT twin {bert_summary(config, shape)}, optax.adamw, jax.jit; median of "
        f"{shape.steps} steps after {shape.warmup} warm-up\n\n{environment}\n"
    )
    print(header, flush=True)
    rows = []
    key = jax.random.key(0)
    for dtype in [d for d in args.dtypes.split(",") if d]:
        for setup, targets in SETUPS:
            if args.setups and setup not in args.setups.split(",") and setup != "floor":
                continue
            row = bench(setup, targets, dtype, shape, key)
            rows.append(row)
            print(f"{setup:9s} {targets:8s} {dtype}: {row.ms:8.2f} ms", flush=True)
    for row in rows:
        floor = next(r for r in rows if r.dtype == row.dtype and r.setup == "floor")
        row.ratio = row.ms / floor.ms
    text = header + "\n" + table(rows) + "\n"
    print("\n" + text, flush=True)
    if args.out:
        write_report(args.out, text)


if __name__ == "__main__":
    main()
