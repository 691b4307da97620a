"""What a Flax training step launches on an H100 or H200, without one: XLA:GPU's deviceless
(ahead-of-time) compilation of ``bench_flax.py``'s ``jax.jit`` steps for a simulated GPU, and the
kernels each compiled program launches, by kind, against its frozen floor.

Why this exists: the device is lent 30 minutes a session and often cannot be started at all, and
the Flax LoRA step's overhead is kernels, not FLOPs (``../shared/perf/``: 529 extra kernels per
step for q,k,v,o, half of the extra wall time launch gaps). Kernel counts of a candidate program
can be read here on the CPU, so that device time goes to timing only what already launches less.
The counts are XLA's optimised program (fusion, dot merging, split-K) as the device compiles it;
what they cannot show is autotuning's choices (it needs the GPU: split-K and tile sizes may differ
a little) and time. On 2026-12-07 the simulated H100 gave 638 kernels for the BERT-base floor and
1155 for ours q,k,v,o (jax 0.10.2), where the real H100's trace had counted 686 and 1215 (jax
0.11.2): the difference over the floor, +517 against +529, is the same within 2%.

Needs JAX's CUDA plugin for the installed jax (it compiles, it runs nothing, no GPU needed)::

    pip install "jax[cuda13]==$(python -c 'import jax; print(jax.__version__)')"
    JAX_PLATFORMS=cpu python benchmarks/gpu_kernels_aot.py --cases "ours:q,k,v,o;nnx.LoRA:q,k,v,o"

Each case takes ~45 s to compile at BERT-base on 2 cores; ``--layers 2`` keeps the per-layer
picture and takes ~10 s.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from benchmarks import bench_flax as bf  # noqa: E402
from flax_impl import fused  # noqa: E402

# GpuTargetConfigProto text for the device kinds this project is lent (one card each); the numbers
# are NVIDIA's (SM 9.0, 132 SMs, 228 KiB shared memory per SM, 50 MiB L2); memory size and
# bandwidth are the two that differ between the H100 SXM and the H200.
_TARGET = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
runtime_version {{ major: 13 }}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 12 }}
device_description_str: "{name}"
"""
GPUS = {
    "h100": _TARGET.format(bandwidth=3352320000000, memory=84929347584, name="NVIDIA H100 80GB HBM3"),
    "h200": _TARGET.format(bandwidth=4800000000000, memory=150109814784, name="NVIDIA H200"),
}


def simulated_gpu(kind: str = "h100") -> jax.Device:
    """One compile-only CUDA device of ``kind`` (``h100`` or ``h200``); raises ``SystemExit`` with
    what to install when JAX's CUDA plugin is missing."""
    from jax.experimental.topologies import get_topology_desc

    try:
        return get_topology_desc(kind, "cuda", target_config=GPUS[kind], topology="1x1x1").devices[0]
    except Exception as error:  # the plugin's absence shows as several exception types
        raise SystemExit(
            f"cannot compile for a simulated {kind} ({type(error).__name__}: {error}); install JAX's "
            f'CUDA plugin for jax {jax.__version__}: pip install "jax[cuda13]=={jax.__version__}"'
        ) from error


def compile_step(case: bf.Case, shape: bf.Shape, device: jax.Device) -> str:
    """``bench_flax``'s ``jax.jit`` step of ``case`` compiled for ``device``; its optimised HLO."""
    setup = case.setup.removesuffix(bf.FLAT)
    model, wrt = bf.build(setup, case.targets, case.dtype, shape, rank=case.rank)
    with bf.trace_context(setup):  # the switch is read at trace time
        pure, state = bf.jit_step_function(
            model, wrt, setup in bf.FACTOR_COPIES, case.setup.endswith(bf.FLAT)
        )
        placed = jax.sharding.SingleDeviceSharding(device)
        ids = jax.ShapeDtypeStruct((shape.batch, shape.seq), jax.numpy.int32, sharding=placed)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed), state)
        return jax.jit(pure, donate_argnums=0).lower(abstract, ids).compile().as_text()


def launches_by_name(text: str) -> collections.Counter[str]:
    """The entry computation's launched instructions of an optimised HLO text, by instruction name
    with XLA's numbering stripped (``gemm_fusion_dot.12`` -> ``gemm_fusion_dot``), so that two
    programs compare kind by kind."""
    return collections.Counter(_kind(instruction) for instruction in _launched(text))


def _launched(text: str) -> list[bf.HloInstruction]:
    """The entry computation's instructions that launch a kernel."""
    return [i for i in bf.hlo_computations(text).get("ENTRY", []) if i.opcode not in bf._NOT_LAUNCHED]


def _kind(instruction: bf.HloInstruction) -> str:
    return kernel_kind(instruction.name)


def kernel_kind(name: str) -> str:
    """A kernel's name with XLA's numbering stripped: ``gemm_fusion_dot.12`` -> ``gemm_fusion_dot``."""
    return re.sub(r"([._]\d+)+$", "", name)


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}


def shape_bytes(shape: str) -> int:
    """Bytes of every array type in an HLO shape text (a tuple sums its elements)."""
    return sum(
        math.prod(int(d) for d in dims.split(",") if d) * _BYTES.get(dtype, 8)
        for dtype, dims in _SHAPE.findall(shape)
    )


def written_by_kind(text: str) -> dict[str, tuple[int, int]]:
    """``{kind: (launches, bytes its outputs hold)}`` over the entry computation of an optimised
    HLO text: what each launched kernel kind writes, a lower bound of its memory traffic (a GEMM
    or fusion also reads its operands), so that two programs compare by bytes as well as counts."""
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for instruction in _launched(text):
        total = totals[_kind(instruction)]
        total[0] += 1
        total[1] += shape_bytes(instruction.shape)
    return {kind: (n, size) for kind, (n, size) in totals.items()}


def llm_programs(layers: int, device: jax.Device) -> dict[str, str]:
    """``bench_llm.py``'s Flax floor and LoRA steps (the ~1B Llama config with ``layers`` layers,
    4 x 2048 tokens, LoRA r=16 on every linear layer, bf16, cuDNN attention), plain, with q/k/v
    and gate/up grouped, and on the fused path with stacked GEMMs (``flax_impl.fused.stacked``),
    compiled for ``device``: their optimised HLO by name."""
    from benchmarks import bench_llm as bl

    shape = dataclasses.replace(bl.FULL, config={**bl.FULL.config, "num_hidden_layers": layers})
    placed = jax.sharding.SingleDeviceSharding(device)
    ids = jax.ShapeDtypeStruct((shape.batch, shape.seq), jax.numpy.int32, sharding=placed)

    def abstract(state: object) -> object:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed), state)

    floor, state = bl.flax_floor_step(bl.flax_model(shape, "cudnn"))
    programs = {"floor": jax.jit(floor).lower(abstract(state), ids).compile().as_text()}
    for name, grouped in (("lora", False), ("lora grouped", True)):
        step, state, _ = bl.flax_lora_step(bl.flax_model(shape, "cudnn"), shape, grouped)
        programs[name] = jax.jit(step, donate_argnums=0).lower(abstract(state), ids).compile().as_text()
    with fused.enabled(), fused.stacked():  # read while tracing
        step, state, _ = bl.flax_lora_step(bl.flax_model(shape, "cudnn"), shape, False)
        programs["lora fused+stacked"] = (
            jax.jit(step, donate_argnums=0).lower(abstract(state), ids).compile().as_text()
        )
    return programs


def bytes_report(programs: dict[str, str], adapted_layers: int, title: str) -> str:
    """Kernels and bytes written per program, and by kind beyond the floor's (``programs['floor']``)."""
    written = {name: written_by_kind(text) for name, text in programs.items()}
    floor = written["floor"]
    lines = [
        f"### {title}",
        "",
        "| program | kernels | MB written | kernels - floor | MB written - floor | MB - floor per adapted layer |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, kinds in written.items():
        n, size = sum(v[0] for v in kinds.values()), sum(v[1] for v in kinds.values())
        fn, fsize = sum(v[0] for v in floor.values()), sum(v[1] for v in floor.values())
        per = f"{(size - fsize) / 1e6 / adapted_layers:.1f}" if name != "floor" else "-"
        lines.append(
            f"| {name} | {n} | {size / 1e6:.0f} | {n - fn:+d} | {(size - fsize) / 1e6:+.0f} | {per} |"
        )
    for name, kinds in written.items():
        if name == "floor":
            continue
        rows = sorted(
            (
                (
                    kinds.get(k, (0, 0))[1] - floor.get(k, (0, 0))[1],
                    kinds.get(k, (0, 0))[0] - floor.get(k, (0, 0))[0],
                    k,
                )
                for k in set(kinds) | set(floor)
            ),
            reverse=True,
        )
        lines += ["", f"`{name}` beyond the floor (MB written, launches, kind):", "```"]
        lines += [f"{size / 1e6:+9.1f} {n:+5d}  {k}" for size, n, k in rows if size or n]
        lines.append("```")
    return "\n".join(lines) + "\n"


def report(programs: dict[bf.Case, str], adapted_layers: dict[bf.Case, int], title: str) -> str:
    keys = ("kernels", "gemm", "convert", "transpose", "other")
    counts = {case: bf.hlo_counts(text) for case, text in programs.items()}
    floor = next((c for c in counts if c.setup == "floor"), None)
    lines = [
        f"## {title}",
        "",
        "| case | " + " | ".join(keys) + " | kernels - floor | per adapted layer |",
        "|---|" + "---:|" * (len(keys) + 2),
    ]
    for case, c in counts.items():
        extra = None if floor is None else c["kernels"] - counts[floor]["kernels"]
        per = f"{extra / adapted_layers[case]:.1f}" if extra is not None and adapted_layers.get(case) else "-"
        shown = "-" if extra is None else f"{extra:+d}"
        lines.append(
            f"| {case.setup} {case.targets} | "
            + " | ".join(str(c[k]) for k in keys)
            + f" | {shown} | {per} |"
        )
    if floor is not None:
        base = launches_by_name(programs[floor])
        for case, text in programs.items():
            if case == floor:
                continue
            named = launches_by_name(text)
            diff = sorted(
                ((named[k] - base[k], k) for k in set(named) | set(base) if named[k] != base[k]), reverse=True
            )
            lines += ["", f"What `{case.setup} {case.targets}` launches beyond the floor (kind: count):", ""]
            lines.append(", ".join(f"`{name}` {n:+d}" for n, name in diff))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument(
        "--cases",
        default="ours:q,v;ours:q,k,v,o;nnx.LoRA:q,k,v,o",
        help="';'-separated setup:targets as bench_flax.py's --jit-cases (the floor is always compiled)",
    )
    parser.add_argument(
        "--layers", type=int, default=12, help="BERT-base (or --llm's Llama) with this many layers"
    )
    parser.add_argument(
        "--llm",
        action="store_true",
        help="bench_llm.py's ~1B Llama steps (floor, LoRA on all linear layers, grouped, fused+stacked) instead of "
        "BERT's, with the bytes each kernel kind writes",
    )
    parser.add_argument("--dtype", default="bf16", choices=sorted(bf.DTYPES))
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--hlo-dir", type=Path, help="also write each optimised HLO program into this folder")
    args = parser.parse_args(argv)

    device = simulated_gpu(args.gpu)
    if args.llm:
        began = time.perf_counter()
        named = llm_programs(args.layers, device)
        if args.hlo_dir:
            for name, text in named.items():
                bf.write_report(args.hlo_dir / f"llm_{name.replace(' ', '_')}.hlo.txt", text)
        title = (
            f"Kernels and bytes written per `jax.jit` step, simulated {args.gpu.upper()} (XLA:GPU "
            f"deviceless compile, jax {jax.__version__}, flax {bf.flax.__version__}): the ~1B Llama of "
            f"bench_llm.py with {args.layers} layers, 4 x 2048 tokens, bf16, LoRA r=16 on all 7 linear "
            f"layers a block ({time.perf_counter() - began:.0f} s)"
        )
        text = bytes_report(named, 7 * args.layers, title)
        print(text)
        if args.out:
            bf.write_report(args.out, text)
        return 0
    shape = dataclasses.replace(bf.SHAPES["gpu"], config={"num_hidden_layers": args.layers})
    cases = [bf.Case("floor", dtype=args.dtype)]
    for item in [c for c in args.cases.split(";") if c]:
        setup, _, targets = item.partition(":")
        cases.append(bf.Case(setup, targets, args.dtype))
    programs: dict[bf.Case, str] = {}
    layers: dict[bf.Case, int] = {}
    for case in cases:
        began = time.perf_counter()
        programs[case] = compile_step(case, shape, device)
        if args.hlo_dir:
            name = re.sub(r"[^\w.+-]+", "_", f"{case.setup}_{case.targets}")
            bf.write_report(args.hlo_dir / f"{name}.hlo.txt", programs[case])
        if case.setup != "floor":
            layers[case] = args.layers * len(bf.TARGETS[case.targets])
        print(
            f"{case.setup} {case.targets}: {bf.hlo_counts(programs[case])} ({time.perf_counter() - began:.0f} s)",
            flush=True,
        )
    title = (
        f"Kernels per `jax.jit` training step, simulated {args.gpu.upper()} (XLA:GPU deviceless compile, "
        f"jax {jax.__version__}, flax {bf.flax.__version__}): BERT-base, {args.layers} layers, "
        f"{shape.batch} x {shape.seq}, {args.dtype}, rank {bf.RANK}, AdamW"
    )
    text = report(programs, layers, title)
    print("\n" + text)
    if args.out:
        bf.write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
