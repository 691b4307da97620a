"""The rank-r GEMMs of a LoRA training step, one at a time, against the GPU's memory bound.

A LoRA layer's step adds thin GEMMs to the frozen model's: ``h = x @ A`` and ``h @ B`` forward;
``dh = g @ B.T``, the factor gradients ``x.T @ dh`` and ``h.T @ g`` (contractions over every
token, float32 results) and ``dh @ A.T`` backward. Each moves one activation-sized operand for a
few FLOPs a byte, so its floor is the time to read that operand once. This script compiles each
(and alternative formulations of the two factor gradients: the tokens split into ``s`` slices
reduced by a batched GEMM and a sum) at the shapes the benchmarks train (the ~1B Llama's
2048/512/8192 features at 8,192 tokens, BERT-base's 768 at 4,096, whisper-small's encoder at
12,000), times its GPU kernels with ``jax.profiler`` and prints the time, the bytes and the
fraction of the bandwidth bound reached, so that the step's formulation is chosen from
measurements rather than from XLA's defaults.

Usage (on the GPU; ``--quick`` checks the script on the CPU with small shapes)::

    python benchmarks/bench_thin_gemms.py --out /tmp/thin_gemms.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import utc_timestamp, write_report  # noqa: E402
from benchmarks.profile_llm import BANDWIDTH, entry_instructions, traced_kernels  # noqa: E402

RANK = 16
#: (label, tokens, in, out)
SHAPES = [
    ("llama q/o", 8192, 2048, 2048),
    ("llama k/v", 8192, 2048, 512),
    ("llama gate/up", 8192, 2048, 8192),
    ("llama down", 8192, 8192, 2048),
    ("bert q/v", 4096, 768, 768),
    ("whisper enc fc1", 12000, 768, 3072),
]
QUICK = [("tiny", 256, 64, 128)]
SLICES = (8, 32)


def cases(tokens: int, d_in: int, d_out: int) -> dict[str, tuple]:
    """``{name: (function, arguments, bytes it must move)}`` for one layer shape."""
    import jax
    import jax.numpy as jnp

    bf16, f32 = jnp.bfloat16, jnp.float32
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (tokens, d_in), bf16)
    g = jax.random.normal(keys[1], (tokens, d_out), bf16)
    a = jax.random.normal(keys[2], (d_in, RANK), bf16)
    b = jax.random.normal(keys[3], (RANK, d_out), bf16)
    h = jax.random.normal(keys[4], (tokens, RANK), bf16)
    dh = jax.random.normal(keys[5], (tokens, RANK), bf16)
    size = {"x": x.nbytes, "g": g.nbytes, "h": h.nbytes}
    at_b = (((0,), (0,)), ((), ()))

    def factor_grad(left, right):  # left.T @ right over the tokens, float32
        return jax.lax.dot_general(left, right, at_b, preferred_element_type=f32)

    def sliced(slices):
        def grad(left, right):
            left = left.reshape(slices, -1, left.shape[-1])
            right = right.reshape(slices, -1, right.shape[-1])
            partial = jax.lax.dot_general(
                left, right, (((1,), (1,)), ((0,), (0,))), preferred_element_type=f32
            )
            return partial.sum(0)

        return grad

    out = {
        "x @ A": (lambda x, a: x @ a, (x, a), size["x"]),
        "h @ B": (lambda h, b: h @ b, (h, b), g.nbytes),
        "g @ B.T": (lambda g, b: g @ b.T, (g, b), size["g"]),
        "dh @ A.T": (lambda dh, a: dh @ a.T, (dh, a), x.nbytes),
        "dA = x.T @ dh": (factor_grad, (x, dh), size["x"]),
        "dB = h.T @ g": (factor_grad, (h, g), size["g"]),
        "x @ K (frozen, reference)": (
            lambda x, k: x @ k,
            (x, jax.random.normal(keys[0], (d_in, d_out), bf16)),
            x.nbytes + g.nbytes + d_in * d_out * 2,
        ),
    }
    for s in SLICES:
        if tokens % s == 0:
            out[f"dA, {s} slices"] = (sliced(s), (x, dh), size["x"])
            out[f"dB, {s} slices"] = (sliced(s), (h, g), size["g"])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("/tmp/thin_gemms.md"))
    args = parser.parse_args(argv)
    import jax

    device = jax.devices()[0]
    bandwidth = next((v for k, v in BANDWIDTH.items() if device.device_kind.startswith(k)), 3.35e12)
    lines = [
        f"# LoRA's thin GEMMs one at a time (rank {RANK}, bf16 operands)",
        "",
        f"{utc_timestamp()}; JAX {jax.__version__} on {device.device_kind}; GPU kernel time a call "
        f"(jax.profiler, {args.steps} calls); bound: the bytes it must move at {bandwidth / 1e12:.2f} TB/s "
        "(the activation-sized operand once; the frozen GEMM: its operands and output).",
        "",
        "| shape | GEMM | kernels | us | bound us | of bound | XLA's kernels |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for label, tokens, d_in, d_out in QUICK if args.quick else SHAPES:
        for name, (fn, arguments, moved) in cases(tokens, d_in, d_out).items():
            compiled = jax.jit(fn).lower(*arguments).compile()
            known = entry_instructions(compiled.as_text())

            def run(compiled=compiled, arguments=arguments) -> None:
                jax.block_until_ready(compiled(*arguments))

            run()
            kernels = traced_kernels(run, args.steps, known)
            count = sum(n for n, _ in kernels.values())
            us = sum(t for _, t in kernels.values())
            bound = moved / bandwidth * 1e6
            names = ", ".join(sorted({k.split(".")[0] for k in kernels}))[:60]
            lines.append(
                f"| {label} ({tokens} x {d_in} -> {d_out}) | {name} | {count:.0f} | {us:.1f} | {bound:.1f} | "
                f"{bound / us if us else 0:.0%} | {names} |"
            )
            write_report(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
