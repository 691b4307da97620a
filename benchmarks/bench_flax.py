"""Flax benchmark: a LoRA training step on the Flax BERT twin against the frozen floor.

Model: ``flax_impl.models.bert.BertModel`` (the NNX twin of ``transformers.BertModel``, BERT-base
shape, random init, dropout on), batch 32 x 128 tokens, rank 16, ``optax.adamw``, loss
``mean(h.astype(float32)**2)`` over the last hidden state. Setups:

- ``floor``: forward + backward of the frozen encoder with the gradient taken with respect to
  the embedding output only (XLA computes no weight gradient);
- ``full``: full fine-tuning (``wrt=nnx.Param``);
- ``ours``: ``flax_impl.AdaptedModel`` + ``flax_impl.LoRA`` as they come (the fused path,
  ``flax_impl.fused``, by default; results before it became the default had the plain formula
  here), optimised with ``wrt=model.trainable``;
- ``ours-plain``: the same with ``flax_impl.fused.disabled()`` (autodiff of the plain formula);
- ``ours-fused``: the same with ``flax_impl.fused.enabled()`` (its ``custom_vjp``, whatever the
  environment says);
- ``ours-grouped``: ``ours`` after ``flax_impl.fused.group_shared_input`` (the down projections
  of each block's LoRA query, key and value in one GEMM; issue 24, opt-in);
- ``ours-bf16factors``: ``ours`` whose step carries bf16 copies of the factors
  (``flax_impl.fused.compute_dtype_factors`` / ``value_and_grad_with_factors``: no factor casts
  in the forward and backward; issue 24, opt-in; ``jit`` mode only);
- ``ours-grouped-bf16factors``: both;
- ``ours-pallas``: ``ours`` with ``flax_impl.kernels.enabled()`` (the Pallas/Triton kernels of a
  LoRA layer's forward and backward on CUDA; issue 24, opt-in);
- ``nnx.LoRA``: Flax's own ``nnx.LoRA`` wrapped around the same layers, ``wrt=nnx.LoRAParam``;
- ``<setup>+flatopt`` (any of the above but the floor, ``jit`` mode): the optimizer wrapped in
  ``optax.flatten`` (every trainable leaf in one vector for AdamW: a few optimizer kernels a step
  instead of a few per factor; on XLA:CPU, BERT small q,k,v,o, 780 -> 721 instructions a step).

Modes, each with its own floor: ``jit`` (a pure function over ``nnx.split`` state under
``jax.jit``, state donated: NNX's Python bookkeeping stays out; the README's idiom), ``nnx.jit``
(``@nnx.jit def train_step(model, optimizer, ids)``, the README's idiom until it measured slower)
and ``cached_partial``
(``nnx.cached_partial(train_step, model, optimizer)``: the same function, its graph traversal
cached).

bf16 rows build the model with ``dtype=bfloat16`` (float32 parameters, bf16 compute: the analogue
of torch autocast); float32 rows use full float32 matmuls (``jax_default_matmul_precision =
'highest'``, as torch's default, TF32 off). Every setup of a group is timed once a round for
``--rounds`` rounds (per round the median of ``--steps`` steps, each ended by
``block_until_ready``); the table gives the median of the rounds and their spread. ``XLA temp
MiB`` is the compiled step's temporary buffer size (``jit`` mode). ``--hlo-out`` writes what the
compiled ``jit`` steps launch (entry instructions of the optimised HLO, by kind): kernels per
step on the GPU without a profile, and a proxy on the CPU. ``--device cpu`` runs a smaller shape
(``--shape gpu`` there: the BERT-base shape, e.g. to count a step's instructions).

Usage::

    python benchmarks/bench_flax.py --out benchmarks/results/flax_gpu.md
    JAX_PLATFORMS=cpu python benchmarks/bench_flax.py --device cpu --out benchmarks/results/flax_cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import _common  # noqa: E402
from benchmarks._common import BERT_TARGETS as TARGETS  # noqa: E402
from benchmarks._common import RANK, Shape, bert_summary, fmt, with_counts, write_report  # noqa: E402
from flax_impl import AdaptedModel, LoRA, fused, kernels  # noqa: E402
from flax_impl.graph import get_submodule, set_submodule  # noqa: E402
from flax_impl.models.bert import BertConfig, BertModel  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "fp32": None}

SHAPES = {
    "gpu": Shape(config={}, batch=32, seq=128, steps=20, warmup=3),
    "cpu": _common.BERT_CPU_SHAPE,
}


# The opt-in variants of ``ours`` (issue 24): which of flax_impl.fused's switches each turns on.
GROUPED = {"ours-grouped", "ours-grouped-bf16factors"}
FACTOR_COPIES = {"ours-bf16factors", "ours-grouped-bf16factors"}
OURS = {"ours", "ours-plain", "ours-fused", "ours-pallas", *GROUPED, *FACTOR_COPIES}


def trace_context(setup: str) -> contextlib.AbstractContextManager:
    """The switch a setup turns on while its step is traced (``ours-pallas``: the Pallas kernels
    of ``flax_impl.kernels``; ``ours-fused``: ``flax_impl.fused``'s custom_vjp)."""
    switches = {"ours-plain": fused.disabled, "ours-fused": fused.enabled, "ours-pallas": kernels.enabled}
    return switches.get(setup, contextlib.nullcontext)()


@dataclasses.dataclass(frozen=True)
class Case:
    setup: str  # floor, full, nnx.LoRA or one of OURS
    targets: str = "-"
    dtype: str = "bf16"
    mode: str = "jit"  # jit, nnx.jit, cached_partial
    rank: int = RANK
    batch: int = 0  # 0: the run's shape
    seq: int = 0

    @property
    def key(self) -> str:
        size = (
            ""
            if (self.rank, self.batch, self.seq) == (RANK, 0, 0)
            else f" r{self.rank} {self.batch}x{self.seq}"
        )
        return f"{self.setup} {self.targets} {self.dtype} {self.mode}{size}"

    @property
    def floor(self) -> Case:
        return dataclasses.replace(self, setup="floor", targets="-", rank=RANK)


@dataclasses.dataclass
class Result:
    case: Case
    trainable: int = 0
    adapter_mib: float = 0.0  # adapter params + grads + AdamW states
    temp_mib: float | None = None
    compile_s: float = 0.0
    tokens: str = "-"
    hlo: dict[str, int] | None = None  # hlo_counts of the compiled jit step
    timing: _common.Timing | None = None
    note: str = ""


def _target_names(model: nnx.Module, patterns: list[str]) -> list[str]:
    from flax_impl.graph import named_modules
    from twinformat.names import matches_any

    return [name for name, module in named_modules(model) if matches_any(name, patterns)]


def _randomize(model: nnx.Module, leaf_names: tuple[str, ...], key: jax.Array) -> None:
    """A fresh LoRA has a zero up factor; time on non-zero weights, as after some training."""
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        if any(str(part) in leaf_names for part in path[-2:]):
            key, sub = jax.random.split(key)
            value = variable.get_value()
            variable.set_value(0.02 * jax.random.normal(sub, value.shape, value.dtype))


def build(setup: str, targets: str, dtype: str, shape: Shape, rank: int = RANK):
    """Return ``(model, trainable filter or None)`` for one row."""
    config = BertConfig(**shape.config)
    model = BertModel(config, dtype=DTYPES[dtype], rngs=nnx.Rngs(0))
    if setup in ("floor", "full"):
        return model, (nnx.Param if setup == "full" else None)
    if setup in OURS:
        adapted = AdaptedModel(
            model, LoRA, target_layers=TARGETS[targets], adapter_kwargs={"rank": rank}, rngs=nnx.Rngs(1)
        )
        _randomize(adapted, ("adapter_up_proj",), jax.random.key(2))
        if setup in GROUPED and not fused.group_shared_input(adapted):
            raise ValueError(f"{setup}: no LoRA query/key/value to group for targets {targets!r}")
        return adapted, adapted.trainable
    if setup == "nnx.LoRA":
        rngs = nnx.Rngs(1)
        for name in _target_names(model, TARGETS[targets]):
            linear = get_submodule(model, name)
            lora = nnx.LoRA(
                linear.in_features,
                rank,
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


def _floor_loss_and_grad(model: nnx.Module, ids: jax.Array):
    hidden0 = model.embeddings(ids)
    # argnums=0: the gradient is taken w.r.t. the hidden states only; the model rides along.
    return nnx.value_and_grad(lambda h, m: _loss(m.encoder(h)), argnums=0)(hidden0, model)


def _train_update(model: nnx.Module, optimizer: nnx.Optimizer, ids: jax.Array, wrt) -> jax.Array:
    loss, grads = nnx.value_and_grad(lambda m: _loss(m(ids)), argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return loss


def _train_update_with_factors(
    model: nnx.Module, optimizer: nnx.Optimizer, factors: nnx.State, ids: jax.Array, wrt
) -> tuple[jax.Array, nnx.State]:
    """``_train_update`` on the factors' compute-dtype copies; returns the next step's copies too."""
    loss, grads = fused.value_and_grad_with_factors(lambda m: _loss(m(ids)), model, factors, wrt=wrt)
    optimizer.update(model, grads)
    return loss, fused.compute_dtype_factors(model)


FLAT = "+flatopt"  # a setup suffix: the optimizer wrapped in optax.flatten


def jit_step_function(model: nnx.Module, wrt, factor_copies: bool = False, flat_optimizer: bool = False):
    """``jit`` mode's step as ``(pure, state)``: ``pure(state, ids) -> (loss, next state)``, a
    function of the split state. ``factor_copies``: the step also carries
    ``fused.compute_dtype_factors(model)``; ``flat_optimizer``: AdamW under ``optax.flatten``."""
    if wrt is None:
        graphdef, state = nnx.split(model)

        def pure(state, ids):
            model = nnx.merge(graphdef, state)
            out = _floor_loss_and_grad(model, ids)
            return out, nnx.state(model)

    elif factor_copies:
        optimizer = nnx.Optimizer(model, _common.flax_adamw(flat_optimizer), wrt=wrt)
        graphdef, state = nnx.split((model, optimizer))
        state = (state, fused.compute_dtype_factors(model))

        def pure(state, ids):
            model, optimizer = nnx.merge(graphdef, state[0])
            loss, factors = _train_update_with_factors(model, optimizer, state[1], ids, wrt)
            return loss, (nnx.state((model, optimizer)), factors)

    else:
        optimizer = nnx.Optimizer(model, _common.flax_adamw(flat_optimizer), wrt=wrt)
        graphdef, state = nnx.split((model, optimizer))

        def pure(state, ids):
            model, optimizer = nnx.merge(graphdef, state)
            loss = _train_update(model, optimizer, ids, wrt)
            return loss, nnx.state((model, optimizer))

    return pure, state


#: ``--state-as leaves``: every jit row (the floor too) passes its state as a flat list of arrays.
STATE_AS_LEAVES = False


def make_jit_step(
    model: nnx.Module, wrt, ids: jax.Array, factor_copies: bool = False, flat_optimizer: bool = False
):
    """``jit`` mode: ``jit_step_function`` compiled with its state donated; returns (step, temp
    MiB, HLO counts)."""
    pure, state = jit_step_function(model, wrt, factor_copies, flat_optimizer)
    if STATE_AS_LEAVES:
        # The state as a flat list of arrays: a jitted call flattens its arguments and builds its
        # outputs on the host before and after the device runs, and an nnx.State (Variables in
        # nested State objects) takes Python for both: on the 2-core CPU machine, a BERT-base
        # LoRA q,v state (419 leaves) took 1.7 ms to flatten and 4.1 ms to rebuild, the floor's
        # (273 leaves) 0.7 and 2.8 ms; a list of the same arrays ~0.2 ms. The structure is
        # static, so unflattening inside the jitted function costs only at trace time.
        pure, state = _common.state_as_leaves(pure, state)
    compiled = jax.jit(pure, donate_argnums=0).lower(state, ids).compile()
    analysis = compiled.memory_analysis()
    temp = analysis.temp_size_in_bytes / 2**20 if analysis is not None else None
    holder = [state]

    def run() -> None:
        out, holder[0] = compiled(holder[0], ids)
        jax.block_until_ready(out)

    return run, temp, hlo_counts(compiled.as_text())


# Entry instructions that launch nothing.
_NOT_LAUNCHED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
_HLO_INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")


class HloInstruction(NamedTuple):
    name: str  # as XLA numbered it: ``gemm_fusion_dot.12``
    opcode: str
    callee: str | None  # the computation (``calls=``) of a fusion, the target of a custom call
    shape: str = ""  # the output shape's text: ``bf16[4096,768]{1,0}``, a tuple for multi-output


def _instruction(line: str) -> HloInstruction | None:
    """An HLO instruction line's name, opcode, callee and output shape; None for other lines."""
    match = _HLO_INSTRUCTION.match(line)
    if not match:
        return None
    rest = line[match.end() :]
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
        depth = list(itertools.accumulate((char == "(") - (char == ")") for char in rest))
        shape, rest = rest[: depth.index(0) + 1], rest[depth.index(0) + 1 :]
    else:
        shape, _, rest = rest.partition(" ")
    opcode = re.match(r"\s*([\w\-]+)\(", rest)
    if not opcode:
        return None
    callee = re.search(r"calls=%?([\w.\-]+)|custom_call_target=\"([^\"]*)\"", rest)
    return HloInstruction(
        match.group(1), opcode.group(1), callee and (callee.group(1) or callee.group(2)), shape
    )


def hlo_computations(text: str) -> dict[str, list[HloInstruction]]:
    """The instructions of each computation of an optimised HLO text (``compiled.as_text()``),
    the entry computation under ``'ENTRY'``."""
    computations: dict[str, list[HloInstruction]] = {}
    current: list | None = None
    for line in text.splitlines():
        if line and not line.startswith((" ", "}")) and line.rstrip().endswith("{"):
            name = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
            current = computations.setdefault(name, [])
        elif line.startswith("}"):
            current = None
        elif current is not None and (instruction := _instruction(line)):
            current.append(instruction)
    return computations


def hlo_counts(text: str) -> dict[str, int]:
    """What a compiled step launches, from its optimised HLO text (``compiled.as_text()``): the
    entry computation's instructions (on the GPU each is a kernel, or a few for a ``while``), by
    kind: ``gemm`` (a dot or convolution, fused or not, or a cuBLAS call), ``convert`` (a fusion of
    converts only), ``transpose`` (transposes or copies only), ``other``; and ``converts``, the
    convert instructions everywhere, fused or not."""
    computations = hlo_computations(text)
    counts = dict.fromkeys(("kernels", "gemm", "convert", "transpose", "other"), 0)
    for _, opcode, callee, _ in computations.get("ENTRY", []):
        if opcode in _NOT_LAUNCHED:
            continue
        inner = {opcode}
        if opcode == "fusion":
            inner = {i.opcode for i in computations.get(callee or "", [])} - _NOT_LAUNCHED
        counts["kernels"] += 1
        cublas = opcode == "custom-call" and "gemm" in (callee or "").lower()  # XLA:GPU's cuBLAS GEMMs
        if inner & {"dot", "convolution"} or cublas:
            counts["gemm"] += 1
        elif "convert" in inner and inner <= {"convert", "copy"}:
            counts["convert"] += 1
        elif inner <= {"transpose", "copy"}:
            counts["transpose"] += 1
        else:
            counts["other"] += 1
    counts["converts"] = sum(i.opcode == "convert" for ops in computations.values() for i in ops)
    return counts


_NNX_STEPS: dict[tuple, tuple] = {}  # (setup, targets, dtype, size) -> (jitted step, its graph args)


def make_nnx_step(model: nnx.Module, wrt, ids: jax.Array, cached: bool, share: tuple):
    """``nnx.jit`` mode or its ``nnx.cached_partial`` form; the two modes
    of one setup share the jitted function and the model (one compilation)."""
    if share in _NNX_STEPS:
        step, args = _NNX_STEPS[share]
    elif wrt is None:

        @nnx.jit
        def floor_step(model, ids):
            return _floor_loss_and_grad(model, ids)

        step, args = floor_step, (model,)
    else:
        optimizer = nnx.Optimizer(model, _common.flax_adamw(), wrt=wrt)

        @nnx.jit
        def train_step(model, optimizer, ids):
            return _train_update(model, optimizer, ids, wrt)

        step, args = train_step, (model, optimizer)
    _NNX_STEPS[share] = (step, args)
    if cached:
        partial_step = nnx.cached_partial(step, *args)

        def run() -> None:
            jax.block_until_ready(partial_step(ids))

    else:

        def run() -> None:
            jax.block_until_ready(step(*args, ids))

    return run, None


def prepare(case: Case, shape: Shape, key: jax.Array):
    batch, seq = case.batch or shape.batch, case.seq or shape.seq
    run_shape = dataclasses.replace(shape, batch=batch, seq=seq)
    setup, flat = case.setup.removesuffix(FLAT), case.setup.endswith(FLAT)
    if flat and (case.mode != "jit" or setup == "floor"):
        raise ValueError(f"{case.setup}: {FLAT} is for the training setups of the jit mode")
    model, wrt = build(setup, case.targets, case.dtype, run_shape, rank=case.rank)
    trainable = 0 if wrt is None else sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
    result = Result(case, trainable=trainable, tokens=f"{batch}x{seq}", adapter_mib=4 * 4 * trainable / 2**20)
    ids = jax.random.randint(key, (batch, seq), 0, BertConfig(**shape.config).vocab_size)
    began = time.perf_counter()
    with trace_context(setup):  # the switch is read at trace time
        if case.mode == "jit":
            run, result.temp_mib, result.hlo = make_jit_step(model, wrt, ids, setup in FACTOR_COPIES, flat)
        elif setup in FACTOR_COPIES:
            raise ValueError(f"{case.setup} is a jax.jit step only (its carry holds the factor copies)")
        else:
            share = (case.setup, case.targets, case.dtype, case.rank, batch, seq)
            run, _ = make_nnx_step(model, wrt, ids, cached=case.mode == "cached_partial", share=share)
        run()  # nnx.jit compiles here
    result.compile_s = time.perf_counter() - began
    for _ in range(shape.warmup):
        run()
    return run, result


def kernel_profile(run, steps: int = 5) -> dict[str, tuple[float, float]]:
    """GPU kernels of ``steps`` calls of ``run`` from ``jax.profiler``'s perfetto trace: per kernel
    name (fusion numbers stripped, so that programs compare), (count, microseconds) per step.
    The method of ``../shared/tools/profile_flax_step.py``, for the cases this script built."""
    import collections
    import glob
    import gzip
    import json
    import os
    import re
    import tempfile

    folder = tempfile.mkdtemp()
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    for _ in range(steps):
        run()
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(folder, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu = {p for p, n in names.items() if "GPU" in n.upper() or "/device:" in n.lower()} or set(names)
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            name = re.sub(r"([._]\d+)+", "", e["name"])
            totals[name][0] += 1
            totals[name][1] += e["dur"]
    return {k: (c / steps, us / steps) for k, (c, us) in totals.items()}


PROFILES: dict[Case, dict[str, tuple[float, float]]] = {}


def kernels_beyond(
    launched: dict[str, tuple[float, float]], baseline: dict[str, tuple[float, float]]
) -> list[tuple[float, float, str]]:
    """``(extra us, extra launches, kernel name)`` of one :func:`kernel_profile` over another's,
    the kinds that differ by more than 1 us or one launch, largest extra time first."""
    diff = []
    for name in set(launched) | set(baseline):
        (c1, t1), (c0, t0) = launched.get(name, (0, 0.0)), baseline.get(name, (0, 0.0))
        if abs(t1 - t0) > 1.0 or abs(c1 - c0) >= 1:
            diff.append((t1 - t0, c1 - c0, name))
    return sorted(diff, reverse=True)


def profile_report(profiles: dict[Case, dict[str, tuple[float, float]]]) -> str:
    """Kernels and GPU time per step of each profiled case, and what each adds over its floor."""
    lines = ["| case | kernels / step | GPU kernel ms / step |", "|---|---:|---:|"]
    for case, launched in profiles.items():
        count = sum(c for c, _ in launched.values())
        lines.append(f"| {case.key} | {count:.0f} | {sum(us for _, us in launched.values()) / 1e3:.2f} |")
    for case, launched in profiles.items():
        floor = profiles.get(case.floor)
        if floor is None or case.setup == "floor":
            continue
        lines += ["", f"{case.key}: kernels it adds over the floor (us/step, count/step, name)", "```"]
        lines += [
            f"{dt:9.1f} {dc:7.1f}  {name[:100]}" for dt, dc, name in kernels_beyond(launched, floor)[:14]
        ]
        lines.append("```")
    return "\n".join(lines)


def run_group(
    title: str, cases: list[Case], shape: Shape, rounds: int, key: jax.Array, log, profile: bool = False
) -> list[Result]:
    log(f"{title}: preparing {len(cases)} cases")
    fns, results = {}, {}
    for case in cases:
        try:
            fns[case.key], results[case.key] = prepare(case, shape, key)
            log(f"  {case.key}: compiled in {results[case.key].compile_s:.1f} s")
        except Exception as error:  # reported in the table, not fatal
            results[case.key] = Result(
                case, note=f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            )
            log(f"  {case.key}: {results[case.key].note}")
    for name, timing in _common.interleaved(fns, rounds, shape.steps, log=log).items():
        results[name].timing = timing
    if profile:
        for name, fn in fns.items():
            PROFILES[results[name].case] = kernel_profile(fn)
        log("  profiled")
    del fns
    _NNX_STEPS.clear()
    gc.collect()
    return list(results.values())


def _ms(result: Result | None) -> float | None:
    return None if result is None or result.timing is None else result.timing.median


def ratio(results: dict, case: Case, reference: Case | None = None) -> float | None:
    value, ref = _ms(results.get(case)), _ms(results.get(reference or case.floor))
    return None if value is None or ref is None else value / ref


def table(results: dict[Case, Result]) -> str:
    lines = [
        "| setup | targets | dtype | mode | rank | tokens | trainable | ms (median of rounds) | spread | x floor | XLA temp MiB |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for case, r in results.items():
        lines.append(
            f"| {case.setup} | {case.targets} | {case.dtype} | {case.mode} | {case.rank} | {r.tokens} | "
            f"{r.trainable:,} | {fmt(_ms(r), '.2f')} | {fmt(r.timing.spread * 100 if r.timing else None, '.1f')}% | "
            f"{fmt(ratio(results, case), '.3f')} | {fmt(r.temp_mib, '.0f')} |"
            + (f" {r.note}" if r.note else "")
        )
    return "\n".join(lines)


def hlo_table(results: dict[Case, Result]) -> str:
    """``hlo_counts`` of every compiled jit step, and what each adds over its floor."""
    keys = ("kernels", "gemm", "convert", "transpose", "other", "converts")
    lines = [
        "| case | " + " | ".join(keys) + " | kernels - floor |",
        "|---|" + "---:|" * (len(keys) + 1),
    ]
    for case, r in results.items():
        if r.hlo is None:
            continue
        floor = results.get(case.floor)
        extra = "-" if floor is None or floor.hlo is None else f"{r.hlo['kernels'] - floor.hlo['kernels']:+d}"
        lines.append(f"| {case.key} | " + " | ".join(str(r.hlo[k]) for k in keys) + f" | {extra} |")
    return "\n".join(lines)


def target_summary(results: dict[Case, Result]) -> str:
    lines = ["| target | row | measured | limit | verdict |", "|---|---|---:|---:|---|"]

    def add(target: str, row: str, value: float | None, limit: float | None) -> None:
        """One row; ``limit=None``: reported for the record, not a target."""
        verdict = "-" if limit is None else _common.verdict(value, limit)
        shown = "-" if limit is None else f"{limit:.2f}"
        lines.append(f"| {target} | {row} | {fmt(value, '.3f')} | {shown} | {verdict} |")

    for case, r in results.items():
        if case.setup in OURS - {"ours", "ours-plain", "ours-fused"} and case.mode == "jit":
            # Issue 24's opt-in variants, for the record: against the floor and against ours.
            add("Flax jax.jit x floor", case.key, ratio(results, case), None)
            ours = dataclasses.replace(case, setup="ours")
            if ours in results:
                add(f"{case.setup} x ours", case.key, ratio(results, case, ours), None)
        if case.setup.endswith(FLAT) and case.mode == "jit":
            # optax.flatten around AdamW, for the record: against the floor and the same setup
            # with the plain optimizer.
            add("Flax jax.jit x floor", case.key, ratio(results, case), None)
            plain = dataclasses.replace(case, setup=case.setup.removesuffix(FLAT))
            if plain in results:
                add(f"{case.setup} x {plain.setup}", case.key, ratio(results, case, plain), None)
            for reference in ("ours", "nnx.LoRA"):  # the default step and Flax's own LoRA
                other = dataclasses.replace(case, setup=reference)
                if plain.setup != reference and other in results:
                    add(f"{case.setup} x {reference}", case.key, ratio(results, case, other), None)
        if case.setup != "ours":
            continue
        if case.mode == "jit":
            add(
                "Flax jax.jit x floor",
                case.key,
                ratio(results, case),
                _common.TARGET_LIMITS[("graph", case.targets)],
            )
            floor = results.get(case.floor)
            if floor is not None and floor.temp_mib is not None and r.temp_mib is not None:
                allowed = (floor.temp_mib + r.adapter_mib) * _common.MEMORY_SLACK
                add("XLA temp memory / allowed", case.key, r.temp_mib / allowed, 1.0)
        nnx_lora = dataclasses.replace(case, setup="nnx.LoRA")
        if nnx_lora in results:
            add("ours x nnx.LoRA", case.key, ratio(results, case, nnx_lora), 1.0)
        if case.mode == "jit":
            # Target 4: the README's step (this one: split state under jax.jit, donated) against
            # the best step we know how to write for the same case.
            others = [dataclasses.replace(case, mode=m) for m in ("cached_partial", "nnx.jit")]
            times = [_ms(results.get(c)) for c in (case, *others)]
            known = [t for t in times if t is not None]
            if len(known) > 1 and times[0] is not None:
                add(
                    "README step (jax.jit) x best step",
                    case.key,
                    times[0] / min(known),
                    _common.README_IDIOM_LIMIT,
                )
        if case.mode in ("nnx.jit", "cached_partial"):
            # Why the README does not teach these: their cost over the README's step.
            add(
                f"{case.mode} x README step (jax.jit)",
                case.key,
                ratio(results, case, dataclasses.replace(case, mode="jit")),
                None,
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=jax.default_backend(), help="gpu or cpu (JAX's backend)")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), help="model and batch size (default: the device's; gpu: BERT-base)"
    )
    parser.add_argument("--out", type=Path, help="write the markdown tables here too")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--setups", default="ours,ours-plain,nnx.LoRA", help="setups beside the floor")
    parser.add_argument("--idiom-dtypes", default="bf16", help="dtypes of the nnx.jit / cached_partial rows")
    parser.add_argument("--scaling-dtypes", default="bf16", help="dtypes of the rank / token scaling rows")
    parser.add_argument("--targets", default="q,v;q,k,v,o", help="';'-separated target sets of the jit rows")
    parser.add_argument(
        "--jit-cases",
        default="",
        help="';'-separated setup:targets of the jit rows (instead of setups x targets)",
    )
    parser.add_argument(
        "--idiom-setups", default="ours,nnx.LoRA", help="setups of the nnx.jit / cached_partial rows"
    )
    parser.add_argument(
        "--deadline", type=float, default=0.0, help="seconds; skip later groups past it (0: none)"
    )
    parser.add_argument(
        "--profile-out", type=Path, help="also profile the jit groups' kernels (jax.profiler) into this file"
    )
    parser.add_argument(
        "--hlo-out", type=Path, help="write what each compiled jit step launches (hlo_counts) into this file"
    )
    parser.add_argument(
        "--state-as",
        choices=("state", "leaves"),
        default="state",
        help="how every jit row passes its split state: the nnx.State (the README's step) or a flat "
        "list of its arrays (less host time per call)",
    )
    args = parser.parse_args(argv)
    global STATE_AS_LEAVES
    STATE_AS_LEAVES = args.state_as == "leaves"

    began = time.perf_counter()
    jax.config.update("jax_default_matmul_precision", "highest")
    kind = "gpu" if args.device in ("gpu", "cuda") else "cpu"
    if jax.default_backend() != kind:
        raise SystemExit(f"JAX's backend is {jax.default_backend()!r}, not {kind!r}; set JAX_PLATFORMS")
    shape = with_counts(SHAPES[args.shape or kind], args.steps, args.warmup)
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
            f"jit state passed as {'a flat list of arrays' if STATE_AS_LEAVES else 'nnx.State'}",
            _common.utc_timestamp(),
        ]
    )
    header = (
        f"## Flax NNX: BERT twin {bert_summary(config, shape)}, optax.adamw; {args.rounds} interleaved rounds "
        f"of {shape.steps} steps after {shape.warmup} warm-up (median of rounds, spread = (max - min) / median)"
        f"\n\n{environment}\n"
    )
    print(header, flush=True)

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {text}", flush=True)

    setups = [s for s in args.setups.split(",") if s]
    groups: list[tuple[str, list[Case]]] = []
    for dtype in [d for d in args.dtypes.split(",") if d]:
        cases = [Case("floor", dtype=dtype)]
        for setup in setups:
            if setup == "full":
                cases.append(Case("full", dtype=dtype))
                continue
            cases += [
                Case(setup, t, dtype)
                for t in args.targets.split(";")
                if t in TARGETS and not (setup == "ours-plain" and t == "q,v") and not args.jit_cases
            ]
        for item in [c for c in args.jit_cases.split(";") if c]:
            setup, _, targets = item.partition(":")
            cases.append(Case(setup, targets, dtype))
        groups.append((f"{dtype} jit", cases))
        if dtype in args.idiom_dtypes.split(","):
            # NNX's own idioms, q,k,v,o: their own group (their own floor), right after the jit
            # one, so that the README's step (jit) is compared with them in the same run.
            cases = []
            for mode in ("nnx.jit", "cached_partial"):
                cases += [Case(s, "q,k,v,o", dtype, mode) for s in args.idiom_setups.split(",") if s]
            groups.append((f"{dtype} nnx.jit / cached_partial", cases))
    for dtype in [d for d in args.scaling_dtypes.split(",") if d and kind == "gpu"]:
        groups.append(
            (
                f"scaling {dtype}",
                [
                    Case("floor", dtype=dtype, batch=8, seq=512),
                    Case("ours", "q,k,v,o", dtype, rank=8),
                    Case("ours", "q,k,v,o", dtype, rank=64),
                    Case("ours", "q,k,v,o", dtype, batch=8, seq=512),
                    Case("nnx.LoRA", "q,k,v,o", dtype, rank=64),
                ],
            )
        )
    results: dict[Case, Result] = {}
    key = jax.random.key(0)
    for title, cases in groups:
        if args.deadline and time.perf_counter() - began > args.deadline:
            log(f"{title}: skipped (past the {args.deadline:.0f} s deadline)")
            continue
        profile = bool(args.profile_out) and title.endswith(" jit")
        results.update({r.case: r for r in run_group(title, cases, shape, args.rounds, key, log, profile)})
        if profile:
            write_report(args.profile_out, header + "\n" + profile_report(PROFILES) + "\n")
        if args.hlo_out:
            write_report(args.hlo_out, header + "\n" + hlo_table(results) + "\n")
        text = "\n".join(
            [header, table(results), "", "### Targets (issue 17)\n", target_summary(results), ""]
        )
        if args.out:
            write_report(args.out, text)
    print("\n" + text, flush=True)
    log("done")


if __name__ == "__main__":
    main()
