"""Benchmark: stream-convert a synthetic checkpoint vs a plain safetensors load + save of it.

Writes a transformer-shaped torch-layout checkpoint of about ``--size-gb`` (Linear weights of a
1024-wide model with a 4096-wide MLP, LayerNorms, an embedding), then times, each in a fresh
subprocess so that peaks do not mix:

- ``floor``: ``safetensors.numpy.load_file`` + ``save_file`` of the same file (what any
  conversion must at least do: read every byte, write every byte);
- ``ours torch->flax``: ``converters.convert_file(..., layout="flax")`` (reads, transposes every
  Linear weight into a Flax kernel, writes, tensor by tensor);
- ``ours torch->torch``: the same path with no re-layout (a pure streaming copy).

and prints, side by side, wall time (best of ``--repeat``), the ratio to the floor (goal: within
1.3x), the peak resident memory (VmHWM, which counts the file pages a memory map touches) and
the peak anonymous memory (sampled RssAnon: the memory the process really allocated), next to
the file size and the largest tensor.

Usage::

    python benchmarks/bench_convert.py                 # ~1 GB
    python benchmarks/bench_convert.py --size-gb 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, MLP, VOCAB = 1024, 4096, 8192

_MEASURE = textwrap.dedent(
    """
    import json, os, sys, threading, time

    def status_bytes(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def rss_anon():
        return status_bytes("RssAnon")

    def vm_hwm():
        return status_bytes("VmHWM")

    task, source, target = sys.argv[1:4]
    import numpy, safetensors.numpy
    import converters.file_convert
    idle_anon, idle_hwm = rss_anon(), vm_hwm()
    peak = [idle_anon]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if task == "floor":
        tensors = safetensors.numpy.load_file(source)
        safetensors.numpy.save_file(tensors, target)
        del tensors
    else:
        converters.file_convert.convert_file(source, target, layout=task)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_anon())
    print(json.dumps({"seconds": seconds, "peak_anon": peak[0] - idle_anon, "hwm": vm_hwm() - idle_hwm}))
    """
)


def write_checkpoint(path: Path, size_bytes: int) -> tuple[int, int]:
    """A torch-layout checkpoint of about ``size_bytes``; returns (file tensor bytes, largest tensor)."""
    sys.path.insert(0, str(ROOT))
    from converters.files import write_safetensors

    per_layer = (4 * HIDDEN * HIDDEN + 2 * HIDDEN * MLP) * 4
    layers = max(1, round((size_bytes - VOCAB * HIDDEN * 4) / per_layer))
    specs, kinds = {"embed.weight": ("F32", (VOCAB, HIDDEN))}, {"embed": "embedding"}
    for i in range(layers):
        block = f"layers.{i}"
        for name, shape in (
            ("attn.q", (HIDDEN, HIDDEN)),
            ("attn.k", (HIDDEN, HIDDEN)),
            ("attn.v", (HIDDEN, HIDDEN)),
            ("attn.o", (HIDDEN, HIDDEN)),
            ("mlp.fc1", (MLP, HIDDEN)),
            ("mlp.fc2", (HIDDEN, MLP)),
        ):
            specs[f"{block}.{name}.weight"] = ("F32", shape)
            specs[f"{block}.{name}.bias"] = ("F32", (shape[0],))
            kinds[f"{block}.{name}"] = "linear"
        for norm in ("norm1", "norm2"):
            specs[f"{block}.{norm}.weight"] = ("F32", (HIDDEN,))
            specs[f"{block}.{norm}.bias"] = ("F32", (HIDDEN,))
            kinds[f"{block}.{norm}"] = "layernorm"
    rng = np.random.default_rng(0)

    def produce(name: str) -> np.ndarray:
        return rng.standard_normal(specs[name][1], dtype=np.float32)

    write_safetensors(path, None, {"layer_kinds": json.dumps(kinds)}, specs=specs, produce=produce)
    sizes = [int(np.prod(shape)) * 4 for _, shape in specs.values()]
    return sum(sizes), max(sizes)


def measure(task: str, source: Path, target: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, task, str(source), str(target)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    target.unlink()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GB (default 1)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per task; the best time counts (default 3)"
    )
    parser.add_argument("--dir", help="folder for the files (default: a temporary folder)")
    args = parser.parse_args(argv)

    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench_convert_"))
    source = folder / "synthetic.safetensors"
    data_bytes, largest = write_checkpoint(source, int(args.size_gb * 1e9))
    file_bytes = source.stat().st_size
    source.read_bytes()  # page cache warm for every contender alike

    tasks = {
        "floor": "floor (safetensors load+save)",
        "flax": "ours torch->flax",
        "torch": "ours torch->torch",
    }
    results: dict[str, list[dict[str, float]]] = {task: [] for task in tasks}
    for _ in range(args.repeat):
        for task in tasks:  # interleaved, so drift in machine load hits all alike
            results[task].append(measure(task, source, folder / f"out_{task}.safetensors"))

    mib = 2**20
    print(
        f"file: {file_bytes / 1e9:.2f} GB ({file_bytes / mib:.0f} MiB), largest tensor {largest / mib:.0f} MiB"
    )
    print(f"{'task':<32}{'time (s)':>10}{'vs floor':>10}{'peak RSS':>14}{'peak anon':>14}")
    floor = min(r["seconds"] for r in results["floor"])
    for task, label in tasks.items():
        best = min(results[task], key=lambda r: r["seconds"])
        hwm = max(r["hwm"] for r in results[task])
        anon = max(r["peak_anon"] for r in results[task])
        print(
            f"{label:<32}{best['seconds']:>10.2f}{best['seconds'] / floor:>9.2f}x"
            f"{hwm / mib:>10.0f} MiB{anon / mib:>10.0f} MiB"
        )
    print("peak RSS and anon are above the idle interpreter; RSS also counts file pages a memory map touched")
    if not args.dir:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
