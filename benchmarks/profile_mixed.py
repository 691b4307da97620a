"""Where a Flax mixed batch's extra time goes (issue 23 item 7): the GPU kernels per jitted forward
of ``bench_mixed.py``'s Flax cases (BERT-base, 32 x 128, bf16: one adapter, 4 adapters mixed per
sample, 4 held with one active), from ``jax.profiler``'s trace (``bench_flax.kernel_profile``), and what the mixed forward runs
beyond one adapter's, kernel kind by kind.

    python benchmarks/profile_mixed.py [--quick] [--out FILE]

On one H100 (2026-12-07) the mixed forward took 1.171x one adapter's (5.24 against 4.48 ms) while
XLA's optimised program (simulated H100) adds only 3 small kernels per transformer layer: this
says which kernels take the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from benchmarks._common import BERT_CPU_SHAPE, utc_timestamp, write_report  # noqa: E402
from benchmarks.bench_flax import kernel_profile, kernels_beyond  # noqa: E402
from benchmarks.bench_mixed import flax_cases  # noqa: E402

CALLS = 5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small BERT, to check the script on a CPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    config, batch, seq = (dict(BERT_CPU_SHAPE.config), 8, 32) if args.quick else ({}, 32, 128)
    cases = flax_cases(config, batch, seq)
    profiles = {name: kernel_profile(run, CALLS) for name, run in cases.items() if name != "flax base (jit)"}
    lines = [
        f"## Kernels per jitted forward, Flax mixed batch vs one adapter ({utc_timestamp()}, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {batch} x {seq}, bf16)",
        "",
        "| case | kernels | kernel us |",
        "|---|---:|---:|",
    ]
    for name, kernels in profiles.items():
        lines.append(
            f"| {name} | {sum(n for n, _ in kernels.values()):.0f} | {sum(us for _, us in kernels.values()):.1f} |"
        )
    one = profiles["flax one (jit)"]
    for name, kernels in profiles.items():
        if kernels is one:
            continue
        lines += ["", f"What `{name}` runs beyond one adapter (us, launches, kernel):", "```"]
        lines += [f"{dt:9.1f} {dn:6.1f}  {k[:100]}" for dt, dn, k in kernels_beyond(kernels, one)[:20]]
        lines.append("```")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_report(args.out, text)


if __name__ == "__main__":
    main()
