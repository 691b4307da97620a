"""Where the LLM LoRA step's time goes, kernel by kernel: ``bench_llm.py``'s ~1B Llama step
(``--layers`` of its 16 blocks; 4 x 2048 tokens, LoRA r=16 on every linear layer, bf16, cuDNN
attention) as the frozen floor, the default LoRA step, the fused path with stacked GEMMs and
the Pallas kernels of ``flax_impl.kernels``,
traced with ``jax.profiler`` and every GPU kernel matched to the HLO instruction that launched it.

For each kernel the table gives its time a step and the bytes it moves (its operands read once
and its output written once, from the optimised HLO's shapes), so that ``time - bytes /
bandwidth`` says how far each kernel is from the memory bound: the LoRA overhead at this shape
is memory traffic (``gpu_kernels_aot.py --llm``: +2.3 to +3.3 GB a block over the floor), and
this is the profile that says which kernels move it slower than the GPU can. cuBLAS's and
cuDNN's kernels (the frozen GEMMs, attention) carry no HLO instruction in jax 0.11.2's trace: they
are listed by their own names, with no bytes (the "not matched" time of each program).

``--model whisper`` profiles ``bench_whisper.py``'s whisper-small step the same way (floor,
default LoRA, ``--whisper-variants``). On one H100 (2026-12-08) its GPU time was 26.13 ms for
the floor, 40.68 ms by default (30.4 GB more moved, 9.1 ms of it at full bandwidth; 3.19 ms in
XLA's padding copies) and 36.69 ms on the fused path with stacked GEMMs; a call waited for
added 5-10 ms of host time to each.

Usage (on the GPU; ``--quick`` runs a tiny config on the CPU to check the script)::

    python benchmarks/profile_llm.py --layers 4 --out /tmp/profile_llm.md
    python benchmarks/profile_llm.py --model whisper --out /tmp/profile_whisper.md
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import utc_timestamp, write_report  # noqa: E402
from benchmarks.bench_flax import _NOT_LAUNCHED  # noqa: E402
from benchmarks.gpu_kernels_aot import kernel_kind, shape_bytes  # noqa: E402

#: Peak memory bandwidth by ``device_kind`` prefix (bytes/s; NVIDIA's data sheets).
BANDWIDTH = {"NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12}
_LINE = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*?)\)(?:,|$)")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # output type text
    read: int  # bytes of its operands
    written: int  # bytes of its output
    operands: str  # the large operands' shapes, for the table
    op_name: str  # the JAX operation it came from (HLO metadata)


def entry_instructions(text: str) -> dict[str, Instruction]:
    """The entry computation's launched instructions of an optimised HLO text, by name."""
    entry = text[text.index("\nENTRY") :]
    shapes: dict[str, str] = {}
    found = {}
    for line in entry.splitlines()[1:]:
        if line.startswith("}"):
            break
        match = _LINE.match(line)
        if not match:
            continue
        name, shape, opcode, operands = match.groups()
        shapes[name] = shape
        if opcode in _NOT_LAUNCHED:
            continue
        inputs = [shapes.get(a, "") for a in re.findall(r"%([\w.\-]+)", operands)]
        op_name = re.search(r'op_name="([^"]*)"', line)
        found[name] = Instruction(
            name,
            shape.split("{")[0],
            sum(shape_bytes(s) for s in inputs),
            shape_bytes(shape),
            " ".join(s.split("{")[0] for s in inputs if shape_bytes(s) >= 2**20),
            op_name.group(1) if op_name else "",
        )
    return found


def traced_kernels(run: Any, steps: int, known: dict[str, Instruction]) -> dict[str, tuple[float, float]]:
    """``{HLO instruction (or kernel) name: (launches, microseconds)}`` a step, from the GPU
    lanes of a ``jax.profiler`` trace of ``steps`` calls of ``run``; a kernel is named by the
    instruction of ``known`` that launched it where the trace says which (``hlo_op``, or its own
    name with XLA's ``fusion_12`` spelled ``fusion.12``), else by its own name."""
    import jax

    directory = tempfile.mkdtemp()
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    for _ in range(steps):
        run()
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    processes = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu = {p for p, n in processes.items() if "/device:GPU" in n or "GPU" in n.upper()}
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or (gpu and e.get("pid") not in gpu):
            continue
        candidates = (e.get("args", {}).get("hlo_op"), e["name"], re.sub(r"_(\d+)$", r".\1", e["name"]))
        name = next((c for c in candidates if c in known), None)
        if name is None and not gpu:
            continue  # the CPU check of --quick: host events are not kernels
        name = name or e["name"]
        totals[name][0] += 1
        totals[name][1] += float(e["dur"])
    return {name: (n / steps, us / steps) for name, (n, us) in totals.items()}


def wall_ms(run: Any, steps: int) -> float:
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def programs(layers: int, quick: bool) -> dict[str, tuple[Any, Any]]:
    """``{name: (compiled step, one call of it)}`` of the ~1B Llama step: the floor, the default
    LoRA step, the fused path with stacked GEMMs (as now and contraction-only, as in the seventh
    session) and the Pallas kernels, as ``bench_llm.py`` builds them; each compiled while its
    switches are on (they are read while tracing)."""
    import jax
    import jax.numpy as jnp

    from benchmarks import bench_llm as bl
    from flax_impl import fused, kernels

    base = bl.QUICK if quick else bl.FULL
    shape = dataclasses.replace(base, config={**base.config, "num_hidden_layers": layers})
    attention = "cudnn" if jax.default_backend() == "gpu" else None
    ids = jnp.asarray(
        jax.random.randint(jax.random.key(0), (shape.batch, shape.seq), 3, shape.config["vocab_size"])
    )
    floor, state = bl.flax_floor_step(bl.flax_model(shape, attention))
    compiled = jax.jit(floor).lower(state, ids).compile()
    out = {"floor": (compiled, runner(compiled, state, ids, False))}

    def lora(name: str) -> None:
        step, state, _ = bl.flax_lora_step(bl.flax_model(shape, attention), shape, grouped=False)
        compiled = jax.jit(step, donate_argnums=0).lower(state, ids).compile()
        out[name] = (compiled, runner(compiled, state, ids, True))

    lora("lora")
    with fused.enabled(), fused.stacked():
        lora("lora fused+stacked")
        # the seventh session's stacking: no x @ [K | A], no g @ [K; sB].T
        with mock.patch.object(fused, "_OUTPUT_STACKED", False):
            lora("lora fused+stacked contraction only")
    with kernels.enabled():  # the Pallas (Triton) kernels of flax_impl.kernels, timed at BERT only
        lora("lora pallas")
    return out


def runner(compiled: Any, state: Any, ids: Any, donates: bool) -> Any:
    """A call of ``compiled`` that waits for its loss (and keeps the donated state's successor)."""
    import jax

    holder = [state]

    def run() -> None:
        out = compiled(holder[0], ids)
        if donates:
            holder[0] = out[1]
        jax.block_until_ready(out[0])

    return run


def whisper_programs(quick: bool, variants: list[str]) -> dict[str, tuple[Any, Any]]:
    """The same for ``bench_whisper.py``'s whisper-small step (batch 8 x 30 s, 64 target
    tokens, LoRA r=16 on all 192 linear layers): the floor, the default LoRA step and
    ``variants`` of ``bench_whisper.VARIANTS`` (``fused``: its backward with token-sliced factor
    gradients; ``fused+stacked``: also the stacked GEMMs)."""
    import jax.numpy as jnp

    from benchmarks import bench_whisper as bw

    setup = bw.Setup(quick)
    features, ids, labels = (jnp.asarray(a) for a in setup.inputs())
    cases = {"floor": bw.flax_floor(setup, features, ids, labels)}
    cases["lora"], _ = bw.flax_lora(setup, features, ids, labels)
    for variant in variants:
        cases[f"lora {variant}"], _ = bw.flax_lora(setup, features, ids, labels, **bw.VARIANTS[variant])
    return {name: (run.compiled, run) for name, run in cases.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("llama", "whisper"), default="llama")
    parser.add_argument(
        "--whisper-variants",
        default="fused+stacked",
        help="','-separated bench_whisper.VARIANTS to profile too",
    )
    parser.add_argument("--layers", type=int, default=4, help="Llama blocks (whisper: all 12 + 12)")
    parser.add_argument("--steps", type=int, default=3, help="traced steps (and timed steps)")
    parser.add_argument("--top", type=int, default=30, help="instructions listed per LoRA program")
    parser.add_argument("--quick", action="store_true", help="tiny config, CPU: checks the script")
    parser.add_argument("--out", type=Path, default=Path("/tmp/profile_llm.md"))
    args = parser.parse_args(argv)
    import jax

    device = jax.devices()[0]
    bandwidth = next((v for k, v in BANDWIDTH.items() if device.device_kind.startswith(k)), 3.35e12)
    if args.model == "whisper":
        # 6 adapted layers an encoder layer, 10 a decoder layer: 12 + 12 layers (--quick: 1 + 1)
        title, adapted = "whisper-small LoRA step", 16 if args.quick else 192
        built = whisper_programs(args.quick, args.whisper_variants.split(","))
    else:
        title, adapted = f"~1B Llama LoRA step ({args.layers} blocks)", 7 * args.layers
        built = programs(args.layers, args.quick)
    lines = [
        f"# The {title} kernel by kernel",
        "",
        f"{utc_timestamp()}; JAX {jax.__version__} on {device.device_kind}; {args.steps} traced steps; "
        f"bandwidth bound at {bandwidth / 1e12:.2f} TB/s. Bytes: each kernel's operands read once and "
        "its output written once (optimised HLO shapes); cuBLAS and cuDNN kernels, not matched to an "
        "instruction, count no bytes. `excess`: kernel time minus bytes / bandwidth.",
        "",
        "| program | wall ms | kernels | kernel ms | GB moved | ms at bandwidth | excess ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    header = len(lines)
    per_program: dict[str, dict[str, tuple[float, float, float]]] = {}
    details: list[str] = []
    for name, (compiled, run) in built.items():
        hlo = entry_instructions(compiled.as_text())
        for _ in range(2):
            run()
        wall = wall_ms(run, args.steps)
        kernels = traced_kernels(run, args.steps, hlo)
        rows = {}  # instruction -> (launches, us, bytes)
        for kernel, (n, us) in kernels.items():
            instruction = hlo.get(kernel)
            moved = instruction.read + instruction.written if instruction else 0
            rows[kernel] = (n, us, moved * n)
        per_program[name] = rows
        count = sum(r[0] for r in rows.values())
        us = sum(r[1] for r in rows.values())
        moved = sum(r[2] for r in rows.values())
        bound = moved / bandwidth * 1e3
        lines.insert(
            header + len(per_program) - 1,
            f"| {name} | {wall:.2f} | {count:.0f} | {us / 1e3:.2f} | {moved / 1e9:.2f} | {bound:.2f} | "
            f"{us / 1e3 - bound:.2f} |",
        )
        unmatched = sum(r[1] for k, r in rows.items() if k not in hlo)
        if name == "floor":
            details += [
                "",
                f"Floor: {unmatched / 1e3:.2f} ms of kernel time not matched to an HLO instruction.",
            ]
            write_report(args.out, "\n".join(lines + details) + "\n")
            continue
        floor = per_program["floor"]
        by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
        for rowset, sign in ((rows, 1), (floor, -1)):
            for kernel, (n, t, b) in rowset.items():
                total = by_kind[kernel_kind(kernel)]
                total[0] += sign * n
                total[1] += sign * t
                total[2] += sign * b
        details += [
            "",
            f"## `{name}` over the floor, by kernel kind ({adapted} adapted layers; "
            f"{unmatched / 1e3:.2f} ms of its kernel time not matched to an HLO instruction)",
            "",
            "| kind | launches | us | MB moved | us at bandwidth | excess us |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for k, (n, t, b) in sorted(by_kind.items(), key=lambda kv: -abs(kv[1][1])):
            if abs(t) < 1 and not n:
                continue
            details.append(
                f"| `{k}` | {n:+.0f} | {t:+.0f} | {b / 1e6:+.0f} | {b / bandwidth * 1e6:+.0f} | "
                f"{t - b / bandwidth * 1e6:+.0f} |"
            )
        details += [
            "",
            f"Its {args.top} instructions furthest from the memory bound (us a step, all launches):",
            "",
            "| instruction | us | MB moved | TB/s | output | large operands | from |",
            "|---|---:|---:|---:|---|---|---|",
        ]
        excess = sorted(rows.items(), key=lambda kv: -(kv[1][1] - kv[1][2] / bandwidth * 1e6))
        for kernel, (n, t, b) in excess[: args.top]:
            instruction = hlo.get(kernel)
            rate = b / (t * 1e-6) / 1e12 if t else 0.0
            shape = instruction.shape if instruction else "?"
            operands = instruction.operands if instruction else ""
            origin = instruction.op_name[-70:] if instruction else ""
            details.append(
                f"| `{kernel}` x{n:.0f} | {t:.0f} | {b / 1e6:.0f} | {rate:.2f} | `{shape}` | `{operands}` | `{origin}` |"
            )
        write_report(args.out, "\n".join(lines + details) + "\n")
    text = "\n".join(lines + details) + "\n"
    write_report(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
