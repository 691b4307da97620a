"""What the benchmark scripts share: the BERT benchmark's shape and targets, timing, report text.

Standard library only, so that every script can import it before it imports its framework.
The scripts run as ``python benchmarks/bench_x.py`` from the repository root and import it as
``benchmarks._common`` once they have put the root on ``sys.path``.

``bench_train.py`` (PyTorch) and ``bench_flax.py`` (Flax) take the BERT shape, targets and rank
from here, so that their tables measure the same model.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RANK = 16
BERT_TARGETS = {
    "q,v": ["encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value"],
    "q,k,v,o": [
        "encoder.layer.*.attention.self.query",
        "encoder.layer.*.attention.self.key",
        "encoder.layer.*.attention.self.value",
        "encoder.layer.*.attention.output.dense",
    ],
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model size, batch and step counts of one benchmark run."""

    config: dict
    batch: int
    seq: int
    steps: int
    warmup: int


# Small enough for a couple of minutes on two cores; same structure and names as BERT-base.
BERT_CPU_SHAPE = Shape(
    config={
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
    batch=8,
    seq=64,
    steps=30,
    warmup=3,
)


def with_counts(shape: Shape, steps: int | None, warmup: int | None) -> Shape:
    """``shape`` with the step counts given on the command line (None: keep; ``--warmup 0`` counts)."""
    return dataclasses.replace(
        shape,
        steps=steps or shape.steps,
        warmup=warmup if warmup is not None else shape.warmup,
    )


def bert_summary(config: object, shape: Shape, rank: int = RANK) -> str:
    """``'(L layers, hidden H, A heads, FFN F), batch B x S tokens, rank R'`` for a report header;
    ``config`` is a ``transformers.BertConfig`` or its Flax twin (same attribute names)."""
    return (
        f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads, FFN {config.intermediate_size}), batch {shape.batch} x "
        f"{shape.seq} tokens, rank {rank}"
    )


# Issue 17's targets: ratio limits to the frozen floor of the same mode (same dtype, same run).
TARGET_LIMITS = {
    ("graph", "q,v"): 1.03,
    ("graph", "q,k,v,o"): 1.06,
    ("eager", "q,v"): 1.15,
    ("eager", "q,k,v,o"): 1.30,
    ("compile", "q,v"): 1.08,
    ("compile", "q,k,v,o"): 1.08,
}
EAGER_VS_PEFT = 0.80  # ours' eager step at most this fraction of PEFT's, every row
MEMORY_SLACK = 1.05  # peak <= (floor peak + adapter params, grads, optimizer states) * this
MERGED_LIMIT = 1.01  # merged inference <= this x the base model
README_IDIOM_LIMIT = 1.05  # the README's Flax step <= this x the best known step


@dataclasses.dataclass
class Timing:
    """Per-round medians (ms) of one setup timed in :func:`interleaved`."""

    rounds: list[float] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def spread(self) -> float:
        """(max - min) / median over the rounds, as a fraction."""
        return (max(self.rounds) - min(self.rounds)) / self.median if self.rounds else 0.0


def interleaved(
    cases: dict[str, Callable[[], object]],
    rounds: int,
    steps: int,
    sync: Callable[[], object] | None = None,
    log: Callable[[str], object] | None = None,
) -> dict[str, Timing]:
    """Time every case once a round, ``rounds`` times, in the same order each round, so that a
    slow phase of the machine hits every case alike: per round, the median of ``steps`` calls
    (each between two ``sync`` calls). Return each case's :class:`Timing`."""
    timings = {name: Timing() for name in cases}
    for index in range(rounds):
        for name, fn in cases.items():
            timings[name].rounds.append(statistics.median(time_calls(fn, steps, 0, sync)))
        if log is not None:
            log(f"  round {index + 1}/{rounds} done")
    return timings


def verdict(value: float | None, limit: float) -> str:
    """``'met'``/``'missed'`` for ``value <= limit``, ``'not measured'`` for None."""
    if value is None:
        return "not measured"
    return "met" if value <= limit else "missed"


def time_calls(
    fn: Callable[[], object], steps: int, warmup: int, sync: Callable[[], object] | None = None
) -> list[float]:
    """Milliseconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones; ``sync``
    (e.g. a device synchronisation) is called just before and just after each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def flax_adamw(flat: bool = False, learning_rate: float = 1e-4) -> Any:
    """The Flax benchmarks' optimizer: ``optax.adamw``, under ``optax.flatten`` when ``flat``
    (every trainable leaf in one vector: one AdamW update a step instead of a few per factor)."""
    import optax  # here: the torch benchmarks import this module without JAX

    adamw = optax.adamw(learning_rate)
    return optax.flatten(adamw) if flat else adamw


def state_as_leaves(step: Callable[..., Any], state: Any) -> tuple[Callable[..., Any], list[Any]]:
    """``step(state, *args) -> (out, new_state)`` as a function of the state's flat list of arrays,
    and that list: the state as a jitted call's argument without the host flattening an
    ``nnx.State`` (Variables in nested State objects, Python for every node) before and building
    one after each call. The structure is static, so unflattening inside the jitted function
    costs only at trace time."""
    import jax  # here: the torch benchmarks import this module without JAX

    treedef = jax.tree.structure(state)

    def over_leaves(leaves: list[Any], *args: Any) -> tuple[Any, list[Any]]:
        out, new_state = step(jax.tree.unflatten(treedef, leaves), *args)
        return out, jax.tree.leaves(new_state)

    return over_leaves, jax.tree.leaves(state)


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or ``'-'`` for a value not measured."""
    return "-" if value is None else format(value, spec)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``'0.3, 0.5, 0.4'``."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_report(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
