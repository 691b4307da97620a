"""Multi-device LoRA training: PyTorch DDP and FSDP2, and a JAX mesh, against one device.

The same LoRA fine-tuning step (a stack of pre-norm MLP blocks ``x + fc2(gelu(fc1(norm(x))))``,
LoRA rank 16 on every ``fc1``/``fc2``, AdamW, MSE to a fixed random target, float32 at full
precision) runs on one device and then on all ``N`` devices with the *same global batch* split
over them (strong scaling), so that the losses of both runs must agree:

- ``torch``: one device; DDP over ``N`` processes; FSDP2 (``fully_shard`` per block) over ``N``
  processes. NCCL on GPUs, with NVLink multicast off (``NCCL_NVLS_ENABLE=0``); gloo on CPU.
- ``jax``: one device; a ``('data',)`` mesh over ``N`` devices (data parallel); a
  ``('data', 'model')`` mesh (``N/2 x 2``, data + Megatron tensor parallel: ``fc1`` split on its
  output axis, ``fc2`` on its input axis, LoRA factors following). On GPUs each setup runs in a
  process of its own (``XLA_PYTHON_CLIENT_PREALLOCATE=false``) so that its peak memory is its own.

Per row: median step time after warm-up, scaling efficiency ``t1 / (N * tN)`` against the
one-device row, peak memory per device (CUDA allocator / XLA ``peak_bytes_in_use``; on CPU the
process's peak RSS, which simulated devices share), and the largest loss difference from the
one-device run over all steps. ``--check`` exits with status 1 when a difference exceeds
``--tolerance``.

Usage::

    python benchmarks/bench_multi_gpu.py --device cuda --out benchmarks/results/multi_gpu.md
    python benchmarks/bench_multi_gpu.py --device cpu --devices 2 --jax-devices 8 --check
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (see KINDS.md of the lab)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import write_report  # noqa: E402

TARGETS = ["blocks.*.fc1", "blocks.*.fc2"]
MEGATRON = {"blocks.*.fc1": (None, "model"), "blocks.*.fc2": ("model", None)}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model and batch of one benchmark: ``batch`` is the global batch, split over devices."""

    width: int
    depth: int
    batch: int
    seq: int
    rank: int = 16
    steps: int = 20
    warmup: int = 5
    lr: float = 1e-3


SHAPES = {
    "cuda": Shape(width=1024, depth=8, batch=64, seq=256),
    "cpu": Shape(width=64, depth=2, batch=8, seq=16, rank=4, steps=5, warmup=3),
}


# ----------------------------------------------------------------------------- data
def _batch_numpy(shape: Shape):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((shape.batch, shape.seq, shape.width), dtype=np.float32)
    y = rng.standard_normal((shape.batch, shape.seq, shape.width), dtype=np.float32)
    return x, y


# ----------------------------------------------------------------------------- PyTorch
def _torch_model(shape: Shape):
    import torch
    from torch import nn

    from torch_impl import AdaptedModel, LoRA

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(shape.width)
            self.fc1 = nn.Linear(shape.width, 4 * shape.width)
            self.fc2 = nn.Linear(4 * shape.width, shape.width)

        def forward(self, x):
            return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block() for _ in range(shape.depth)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    base = Blocks()
    return AdaptedModel(
        base, LoRA, target_layers=TARGETS, adapter_kwargs={"rank": shape.rank, "alpha": 2.0 * shape.rank}
    )


def _torch_run(mode: str, rank: int, world: int, shape: Shape, device_type: str) -> dict:
    """One setup on this rank; returns step time, global losses and peak memory (max over ranks)."""
    import torch
    import torch.distributed as dist

    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    model = _torch_model(shape).to(device)
    wrapped = model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[rank] if cuda else None)
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device_type, (world,))
        for block in model.adapted_model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    x, y = (torch.from_numpy(a).chunk(world)[rank].to(device) for a in _batch_numpy(shape))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=shape.lr)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(shape.warmup + shape.steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(wrapped(x), y)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.detach())
    losses_t = torch.stack(losses).double()
    peak = (
        torch.cuda.max_memory_allocated(device)
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    peak_t = torch.tensor([float(peak)], device=device)
    if world > 1:
        dist.all_reduce(losses_t)  # mean over equal shards = the global batch's loss
        losses_t /= world
        dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
    return {
        "step_s": statistics.median(times[shape.warmup :]),
        "losses": losses_t.tolist(),
        "peak_bytes": int(peak_t.item()),
        "peak_kind": "allocator" if cuda else "process RSS",
    }


def _torch_worker(
    rank: int, world: int, shape_json: str, device_type: str, modes: list[str], folder: str
) -> None:
    import torch
    import torch.distributed as dist

    _full_precision_torch()
    shape = Shape(**json.loads(shape_json))
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=f"file://{os.path.join(folder, 'store')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=5),
    )
    try:
        results = {}
        for mode in modes:
            results[mode] = _torch_run(mode, rank, world, shape, device_type)
            dist.barrier()
        if rank == 0:
            Path(folder, "torch.json").write_text(json.dumps(results))
        # Collect the runs' models and collective handles while the group is alive: gloo work
        # freed during interpreter finalisation can abort the process (see the FSDP2 test).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _full_precision_torch() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def bench_torch(shape: Shape, device_type: str, devices: int) -> list[dict]:
    """Rows for one device, DDP and FSDP2 over ``devices``."""
    import torch.multiprocessing as mp

    _full_precision_torch()
    rows = [
        {
            "framework": "torch",
            "setup": "1 device",
            "devices": 1,
            **_torch_run("single", 0, 1, shape, device_type),
        }
    ]
    if device_type == "cuda":
        import torch

        torch.cuda.empty_cache()
    if devices > 1:
        with tempfile.TemporaryDirectory() as folder:
            modes = ["ddp", "fsdp2"]
            args = (json.dumps(dataclasses.asdict(shape)), device_type, modes, folder)
            mp.start_processes(_torch_worker, args=(devices, *args), nprocs=devices, start_method="spawn")
            results = json.loads(Path(folder, "torch.json").read_text())
        for mode, label in (("ddp", "DDP"), ("fsdp2", "FSDP2")):
            rows.append({"framework": "torch", "setup": label, "devices": devices, **results[mode]})
    return rows


# ----------------------------------------------------------------------------- JAX
def _jax_setup(setup: str, shape: Shape, devices: int) -> dict:
    """One JAX setup, in this (fresh) process."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from flax_impl import AdaptedModel, LoRA
    from flax_impl.sharding import shard_model

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.norm = nnx.LayerNorm(shape.width, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
            self.fc1 = nnx.Linear(shape.width, 4 * shape.width, rngs=rngs)
            self.fc2 = nnx.Linear(4 * shape.width, shape.width, rngs=rngs)

        def __call__(self, x):
            return x + self.fc2(jax.nn.gelu(self.fc1(self.norm(x)), approximate=False))

    class Blocks(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.blocks = nnx.List([Block(rngs) for _ in range(shape.depth)])

        def __call__(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    auto = jax.sharding.AxisType.Auto
    base = Blocks(nnx.Rngs(0))
    mesh = None
    if setup == "data":
        mesh = jax.make_mesh((devices,), ("data",), axis_types=(auto,))
        shard_model(base, mesh)
    elif setup == "data x model":
        mesh = jax.make_mesh((devices // 2, 2), ("data", "model"), axis_types=(auto, auto))
        shard_model(base, mesh, MEGATRON)
    model = AdaptedModel(
        base,
        LoRA,
        target_layers=TARGETS,
        adapter_kwargs={"rank": shape.rank, "alpha": 2.0 * shape.rank},
        rngs=nnx.Rngs(1),
    )
    optimizer = nnx.Optimizer(model, optax.adamw(shape.lr), wrt=model.trainable)
    # Commit every array (freshly created ones are not) to where it will stay: otherwise the
    # second step sees committed outputs of the first and compiles the step again.
    default = (
        jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if mesh is None
        else NamedSharding(mesh, PartitionSpec())
    )
    state = nnx.state((model, optimizer))
    nnx.update(
        (model, optimizer),
        jax.tree.map(
            lambda a: jax.device_put(a, a.sharding if isinstance(a.sharding, NamedSharding) else default),
            state,
        ),
    )
    x, y = (jax.device_put(jnp.asarray(a), default) for a in _batch_numpy(shape))
    if mesh is not None:
        x, y = (jax.device_put(a, NamedSharding(mesh, PartitionSpec("data"))) for a in (x, y))

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable))(model)
        optimizer.update(model, grads)
        return loss

    times, losses = [], []
    for _ in range(shape.warmup + shape.steps):
        start = time.perf_counter()
        loss = train_step(model, optimizer, x, y).block_until_ready()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    used = jax.devices()[:1] if mesh is None else list(mesh.devices.flat)
    stats = [d.memory_stats() or {} for d in used]
    if all("peak_bytes_in_use" in s for s in stats):
        peak, kind = max(s["peak_bytes_in_use"] for s in stats), "allocator"
    else:  # CPU: simulated devices share the process
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS"
    return {
        "step_s": statistics.median(times[shape.warmup :]),
        "losses": losses,
        "peak_bytes": peak,
        "peak_kind": kind,
    }


def bench_jax(shape: Shape, device_type: str, devices: int) -> list[dict]:
    """Rows for one device, a data mesh and a data x model mesh.

    On GPUs each setup runs in a fresh process, so that its peak memory is its own; on CPU all
    run in one process (simulated devices share its memory anyway) to save start-up time.
    """
    setups = ["1 device", "data"] + (["data x model"] if devices >= 2 and devices % 2 == 0 else [])
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONPATH": str(ROOT)}
    if device_type == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        flags = [
            f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
        ]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    groups = [setups] if device_type == "cpu" else [[setup] for setup in setups]
    rows = []
    for group in groups:
        command = [sys.executable, __file__, "--jax-setup", ",".join(group), "--jax-devices", str(devices)]
        command += ["--jax-shape", json.dumps(dataclasses.asdict(shape))]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"JAX setups {group} failed:\n{done.stderr[-4000:]}")
        results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        for setup, result in zip(group, results, strict=True):
            count = 1 if setup == "1 device" else devices
            rows.append(
                {
                    "framework": "jax",
                    "setup": setup if count == 1 else f"mesh {setup}",
                    "devices": count,
                    **result,
                }
            )
    return rows


# ----------------------------------------------------------------------------- report
def summarize(rows: list[dict]) -> list[dict]:
    """Add scaling efficiency and loss difference against each framework's one-device row."""
    base = {row["framework"]: row for row in rows if row["devices"] == 1}
    for row in rows:
        one = base[row["framework"]]
        row["efficiency"] = one["step_s"] / (row["devices"] * row["step_s"])
        row["loss_diff"] = max(abs(a - b) for a, b in zip(row["losses"], one["losses"], strict=True))
    return rows


def table(rows: list[dict], shape: Shape, device: str) -> str:
    lines = [
        f"Multi-device LoRA training ({device}): {shape.depth} blocks of width {shape.width}, rank {shape.rank}, "
        f"global batch {shape.batch} x {shape.seq}, median of {shape.steps} steps after {shape.warmup}; float32.",
        "",
        "| framework | setup | devices | step (ms) | scaling efficiency | peak memory / device | max abs loss diff vs 1 device |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        peak = f"{row['peak_bytes'] / 2**20:.0f} MiB" + (
            " (process RSS)" if row["peak_kind"] == "process RSS" else ""
        )
        lines.append(
            f"| {row['framework']} | {row['setup']} | {row['devices']} | {row['step_s'] * 1e3:.2f} | "
            f"{row['efficiency']:.2f} | {peak} | {row['loss_diff']:.2e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--devices", type=int, help="torch devices/processes (default: all GPUs; 2 on CPU)")
    parser.add_argument("--jax-devices", type=int, help="JAX devices (default: all GPUs; 8 simulated on CPU)")
    parser.add_argument("--framework", choices=["torch", "jax", "both"], default="both")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a loss differs by more than --tolerance"
    )
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--jax-setup", help=argparse.SUPPRESS)  # internal: one JAX setup per process
    parser.add_argument("--jax-shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.jax_setup:
        for setup in args.jax_setup.split(","):
            result = _jax_setup(setup, Shape(**json.loads(args.jax_shape)), args.jax_devices)
            print(json.dumps(result), flush=True)
        return 0

    shape = SHAPES[args.device]
    shape = dataclasses.replace(shape, steps=args.steps or shape.steps, warmup=args.warmup or shape.warmup)
    rows = []
    if args.framework in ("torch", "both"):
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda but no GPU is visible; use --device cpu")
        devices = args.devices or (torch.cuda.device_count() if args.device == "cuda" else 2)
        rows += bench_torch(shape, args.device, devices)
    if args.framework in ("jax", "both"):
        devices = args.jax_devices or (_count_gpus() if args.device == "cuda" else 8)
        rows += bench_jax(shape, args.device, devices)
    report = table(summarize(rows), shape, args.device)
    print(report)
    if args.out:
        write_report(args.out, report + "\n")
    worst = max(row["loss_diff"] for row in rows)
    if args.check and worst > args.tolerance:
        print(f"loss differs from the one-device run by {worst:.2e} > {args.tolerance:.0e}", file=sys.stderr)
        return 1
    return 0


def _count_gpus() -> int:
    """GPUs visible to JAX, counted in a child process (this one may hold torch's CUDA context)."""
    code = "import jax; print(len(jax.devices('gpu')))"
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
