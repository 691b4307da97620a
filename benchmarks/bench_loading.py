"""Host memory and time of ``from_pretrained`` on a ~1 GB sharded checkpoint (issue 22, item 2).

Writes a Llama-style checkpoint (transformers' names: ``model.embed_tokens``,
``model.layers.N.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, norms, ``lm_head``) of
numpy random data with ``safetensors.numpy``, split into shards and an index as ``save_pretrained``
writes them, into a temporary folder; then loads it in a fresh process per setup and reads that
process's peak resident memory (``VmHWM`` of ``/proc/self/status``, reset with ``clear_refs``
after a warm-up load of a tiny checkpoint, so the number is the load's own):

- ``streaming`` (today's loader): abstract build, one shard mapped and one tensor read at a time,
  each placed by ``jax.make_array_from_callback``;
- ``read everything`` (the loader before issue 22): every shard read into memory, the model
  built with zero-filled variables, each tensor converted and assigned;
- ``streaming, 8 devices, FSDP`` (``XLA_FLAGS=--xla_force_host_platform_device_count=8``): the
  same file split over 8 simulated CPU devices by ``partitioning.fsdp_rules``.

On CPU the devices *are* host memory, so the loaded weights count once in every row; the budget
for the loader itself is the largest shard plus one tensor. Run from the repository root::

    python benchmarks/bench_loading.py                 # ~1 GB bf16, shards of 256 MB
    python benchmarks/bench_loading.py --size-gb 0.1   # quick

Results go to ``benchmarks/results/loading.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def llama_config(size_gb: float, itemsize: int) -> dict:
    """A Llama config (hidden 1024, 16 heads, 8 KV heads, FFN 4096, vocab 32000, untied head)
    with as many layers as bring the weights to ``size_gb``."""
    config = {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16" if itemsize == 2 else "float32",
    }
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    fixed = 2 * v * h + h
    config["num_hidden_layers"] = max(1, round((size_gb * 1e9 / itemsize - fixed) / per_layer))
    return config


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """transformers' ``LlamaForCausalLM`` state-dict names and shapes (PyTorch layout)."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes.update(
            {
                f"{layer}.input_layernorm.weight": (h,),
                f"{layer}.self_attn.q_proj.weight": (h, h),
                f"{layer}.self_attn.k_proj.weight": (kv, h),
                f"{layer}.self_attn.v_proj.weight": (kv, h),
                f"{layer}.self_attn.o_proj.weight": (h, h),
                f"{layer}.post_attention_layernorm.weight": (h,),
                f"{layer}.mlp.gate_proj.weight": (f, h),
                f"{layer}.mlp.up_proj.weight": (f, h),
                f"{layer}.mlp.down_proj.weight": (h, f),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def write_checkpoint(directory: Path, config: dict, dtype: str, shard_bytes: int) -> dict:
    """Write config.json, the shards (in state-dict order, a new shard when the next tensor would
    pass ``shard_bytes``, as ``save_pretrained`` does) and the index; one shard in memory at a time."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else np.dtype(np.float32)
    shapes = llama_shapes(config)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(0)
    weight_map = {}
    total = 0
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            scale = 1.0 if name.endswith("layernorm.weight") or name == "model.norm.weight" else 0.02
            tensors[name] = (scale * rng.standard_normal(shapes[name], dtype=np.float32)).astype(np_dtype)
        save_file(tensors, str(directory / file))
        total += sum(a.nbytes for a in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    (directory / "config.json").write_text(json.dumps(config))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    files = sorted(directory.glob("*.safetensors"))
    return {
        "weights": total,
        "shards": len(files),
        "largest_shard": max(f.stat().st_size for f in files),
        "largest_tensor": max(int(np.prod(s)) for s in shapes.values()) * np_dtype.itemsize,
        "tensors": len(shapes),
        "layers": config["num_hidden_layers"],
    }


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(directory: str, mode: str) -> None:
    """Load ``directory`` once in this fresh process; print the memory and time as JSON."""
    import jax
    from flax import nnx

    from flax_impl.models.llama import LlamaForCausalLM as cls

    def load(path: str):
        if mode == "read everything":
            return _read_everything(cls, path)
        if mode == "streaming":
            return cls.from_pretrained(path, param_dtype=_param_dtype(path))
        from flax_impl.models.partitioning import fsdp_rules, make_mesh

        mesh = make_mesh({"fsdp": -1})
        return cls.from_pretrained(path, param_dtype=_param_dtype(path), mesh=mesh, rules=fsdp_rules)

    # Warm up on a tiny checkpoint of the same family: the JAX runtime's first-use allocations
    # (client, compiled fills of the random-key streams) are not the loader's.
    config = json.loads(Path(directory, "config.json").read_text())
    tiny_config = {**config, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128}
    tiny_config["num_hidden_layers"] = 1
    with tempfile.TemporaryDirectory() as tiny:
        write_checkpoint(
            Path(tiny), tiny_config, "bf16" if config.get("torch_dtype") == "bfloat16" else "f32", 1 << 20
        )
        jax.block_until_ready(nnx.state(load(tiny)))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before = _status("VmRSS")
    start = time.perf_counter()
    model = load(directory)
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - start
    on_devices = sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))
        for shard in leaf.addressable_shards
    )
    print(
        json.dumps(
            {
                "before": before,
                "peak": _status("VmHWM"),
                "after": _status("VmRSS"),
                "seconds": seconds,
                "on_devices": on_devices,
                "devices": jax.device_count(),
            }
        )
    )


def _param_dtype(directory: str):
    import jax.numpy as jnp

    config = json.loads(Path(directory, "config.json").read_text())
    return jnp.bfloat16 if config.get("torch_dtype") == "bfloat16" else jnp.float32


def _read_everything(cls: type, directory: str):
    """The loader before issue 22, step for step: every shard read whole, the model built with
    zero-filled variables, each tensor converted (Flax layout, the variable's dtype) and assigned."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_impl import interchange as bridge
    from flax_impl.models.pretrained import read_pretrained_tensors

    config, tensors = read_pretrained_tensors(directory)
    param_dtype = _param_dtype(directory)
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: cls(config, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    )

    def fill(abstract: jax.ShapeDtypeStruct) -> jax.Array:
        if jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
            return (
                jax.random.key(0)
                if not abstract.shape
                else jnp.broadcast_to(jax.random.key(0), abstract.shape)
            )
        return jnp.zeros(abstract.shape, abstract.dtype)

    model = nnx.merge(graphdef, jax.tree.map(fill, state))
    expected = {entry.key for entry in bridge.torch_entries(model, strict=False)}
    arrays = {name: array for name, array in tensors.items() if name in expected}
    report, assignments = bridge._plan_load(model, arrays, strict=False)
    bridge._assign(assignments)
    return model


def run_child(directory: Path, mode: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8" if mode.endswith("FSDP") else ""
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(directory), "--mode", mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode}: the loading process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(facts: dict, rows: dict[str, dict], args: argparse.Namespace) -> str:
    budget = facts["largest_shard"] + facts["largest_tensor"]
    lines = [
        "# Loading a sharded checkpoint: host memory and time (issue 22, item 2)",
        "",
        f"Written by `benchmarks/bench_loading.py --size-gb {args.size_gb} --shard-mb {args.shard_mb} "
        f"--dtype {args.dtype}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()} CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} when done: "
        "the seconds are wall time on a shared machine, the memory numbers do not depend on it), "
        f"Python {platform.python_version()}.",
        "",
        f"Checkpoint: a Llama-style tensor set ({facts['layers']} layers, hidden 1024, FFN 4096, vocab 32000, "
        f"untied head; {facts['tensors']} tensors) of numpy random data, {args.dtype}, "
        f"**{facts['weights'] / MIB:.0f} MiB** in {facts['shards']} shards (largest "
        f"{facts['largest_shard'] / MIB:.0f} MiB; largest tensor {facts['largest_tensor'] / MIB:.1f} MiB), "
        "loaded into the Flax `LlamaForCausalLM` twin with `param_dtype` = the file's dtype.",
        "",
        "Peak growth is the loading process's peak resident memory (`VmHWM`, reset after a warm-up load) "
        "minus its resident memory before the load. On CPU the devices are host memory, so the "
        "loaded weights count in every row; *beyond the weights* subtracts them. The loader's budget is the "
        f"largest shard plus one tensor: **{budget / MIB:.0f} MiB**.",
        "",
        "| setup | peak growth (MiB) | beyond the weights (MiB) | within budget | resident after (MiB) | seconds |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for mode, row in rows.items():
        growth = row["peak"] - row["before"]
        beyond = growth - row["on_devices"]
        lines.append(
            f"| {mode} ({row['devices']} device{'s' if row['devices'] > 1 else ''}) | {growth / MIB:.0f} | "
            f"{beyond / MIB:.0f} | {'yes' if beyond <= budget else 'no'} | "
            f"{(row['after'] - row['before']) / MIB:.0f} | {row['seconds']:.1f} |"
        )
    lines += [
        "",
        "*Beyond the weights* for the streaming rows is what the loader itself holds at its peak: the "
        "memory-mapped shard being read (file pages count as resident once touched, and are unmapped when "
        "the shard is done) plus the blocks of one tensor (a transposed tensor is filled 16 MiB of rows at "
        "a time, not read whole and then transposed). Each process first loads a tiny checkpoint of the "
        "same family, so that the JAX runtime's first-use allocations are not counted. *Read everything* "
        "holds every shard, a zero-filled model and the converted copies at once.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size (default 1.0)")
    parser.add_argument("--shard-mb", type=int, default=256, help="max shard size in MiB (default 256)")
    parser.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    parser.add_argument("--skip-baseline", action="store_true", help="do not measure 'read everything'")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loading.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy
    if args.child:
        child(args.child, args.mode)
        return 0
    if not sys.platform.startswith("linux"):
        raise SystemExit("reads the peak resident memory from /proc/self/status: Linux only")
    itemsize = 2 if args.dtype == "bf16" else 4
    config = llama_config(args.size_gb, itemsize)
    modes = ["streaming", "streaming, 8 devices, FSDP"] + ([] if args.skip_baseline else ["read everything"])
    with tempfile.TemporaryDirectory(prefix="bench_loading_") as tmp:
        directory = Path(tmp)
        facts = write_checkpoint(directory, config, args.dtype, args.shard_mb * MIB)
        print(
            f"wrote {facts['weights'] / MIB:.0f} MiB in {facts['shards']} shards to {directory}", flush=True
        )
        rows = {}
        for mode in modes:
            rows[mode] = run_child(directory, mode)
            row = rows[mode]
            print(
                f"{mode}: peak growth {(row['peak'] - row['before']) / MIB:.0f} MiB, "
                f"weights on devices {row['on_devices'] / MIB:.0f} MiB, {row['seconds']:.1f} s",
                flush=True,
            )
    text = report(facts, rows, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
