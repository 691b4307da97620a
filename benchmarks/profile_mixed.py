"""Where a Flax mixed batch's extra time goes (issue 23 item 7): the GPU kernels per jitted forward
of ``bench_mixed.py``'s Flax cases (BERT-base, 32 x 128, bf16: one adapter, 4 adapters mixed per
sample, 4 held with one active), from ``jax.profiler``'s trace, and what the mixed forward runs
beyond one adapter's, kernel kind by kind.

    python benchmarks/profile_mixed.py [--quick] [--out FILE]

On one H100 (2026-12-07) the mixed forward took 1.171x one adapter's (5.24 against 4.48 ms) while
XLA's optimised program (simulated H100) adds only 3 small kernels per transformer layer: this
says which kernels take the rest.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from benchmarks._common import BERT_CPU_SHAPE, utc_timestamp, write_report  # noqa: E402
from benchmarks.bench_mixed import flax_cases  # noqa: E402

CALLS = 5


def device_kernels(run: Callable[[], object]) -> dict[str, tuple[float, float]]:
    """Kernel name (numbering stripped) -> (launches, microseconds) per call of ``run``, from the
    trace's device processes (every process on a CPU, where there is no device track)."""
    folder = tempfile.mkdtemp()
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    for _ in range(CALLS):
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
    devices = {p for p, n in names.items() if "GPU" in n.upper() or "/device:" in n.lower()} or set(names)
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in devices and "dur" in e:
            name = re.sub(r"([._]\d+)+", "", e["name"])
            totals[name][0] += 1
            totals[name][1] += e["dur"]
    return {k: (n / CALLS, us / CALLS) for k, (n, us) in totals.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small BERT, to check the script on a CPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    config, batch, seq = (dict(BERT_CPU_SHAPE.config), 8, 32) if args.quick else ({}, 32, 128)
    cases = flax_cases(config, batch, seq)
    profiles = {name: device_kernels(run) for name, run in cases.items() if name != "flax base (jit)"}
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
        rows = sorted(
            (
                (
                    kernels.get(k, (0, 0.0))[1] - one.get(k, (0, 0.0))[1],
                    kernels.get(k, (0, 0))[0] - one.get(k, (0, 0))[0],
                    k,
                )
                for k in set(kernels) | set(one)
            ),
            reverse=True,
        )
        lines += ["", f"What `{name}` runs beyond one adapter (us, launches, kernel):", "```"]
        lines += [f"{dt:9.1f} {dn:6.1f}  {k[:100]}" for dt, dn, k in rows if abs(dt) > 1.0 or dn][:20]
        lines.append("```")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_report(args.out, text)


if __name__ == "__main__":
    main()
