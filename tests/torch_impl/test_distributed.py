"""AdaptedModel under real ``torch.distributed`` process groups: DDP and FSDP2, gloo, 2 processes.

Each test starts one process group (``torch.multiprocessing`` spawn, a file store, no ports to
pick), runs everything it checks in it, and compares with the same training in this process on
the whole batch: 2 ranks on half a batch each, gradients averaged, is the same optimizer step.
Workers write what they saw to ``tmp_path``; the assertions run here.
"""

from __future__ import annotations

import datetime
import gc
import os
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from torch_impl import AdaptedModel, LoRA

WORLD = 2
STEPS = 3
LR = 0.1
TARGETS = ["layer1", "layer3"]
UNFROZEN = ["norm"]
ATOL = 1e-5

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


# ----------------------------------------------------------------------------- shared pieces
def _adapted(seed: int = 0) -> AdaptedModel:
    """Two LoRA layers and an unfrozen LayerNorm; up projections random so both factors train."""
    torch.manual_seed(0)
    base = nn.Sequential(
        OrderedDict(
            [
                ("layer1", nn.Linear(8, 16)),
                ("act", nn.Tanh()),
                ("layer2", nn.Linear(16, 16)),
                ("norm", nn.LayerNorm(16)),
                ("layer3", nn.Linear(16, 4)),
            ]
        )
    )
    model = AdaptedModel(
        base, LoRA, target_layers=TARGETS, unfrozen_layers=UNFROZEN, adapter_kwargs={"rank": 4}
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 8, generator=generator), torch.randn(8, 4, generator=generator)


def _probe() -> torch.Tensor:
    return torch.linspace(-1, 1, 24).reshape(3, 8)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, check_frozen: nn.Module) -> tuple[list, bool]:
    """SGD steps on MSE; returns the losses and whether every frozen parameter kept grad None."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    losses, frozen_grad_free = [], True
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        frozen_grad_free &= all(p.grad is None for p in check_frozen.parameters() if not p.requires_grad)
        optimizer.step()
        losses.append(loss.detach())
    return losses, frozen_grad_free


def _global_mean(values: list[torch.Tensor]) -> list[float]:
    """Mean over ranks of each rank's half-batch loss: the whole batch's loss."""
    out = []
    for value in values:
        value = value.clone()
        torch.distributed.all_reduce(value)
        out.append(float(value) / torch.distributed.get_world_size())
    return out


def _reference(tmp_path: Path) -> dict:
    """This process, the whole batch: losses and trained state; also writes ``single.safetensors``,
    a single-process checkpoint (different adapter values) for the ranks to load."""
    model = _adapted()
    x, y = _batch()
    losses, frozen_grad_free = _train(model, x, y, model)
    assert frozen_grad_free
    other = _adapted(seed=7)
    other.saver(str(tmp_path / "single.safetensors"))
    with torch.no_grad():
        return {
            "losses": [float(v) for v in losses],
            "state": {k: v.clone() for k, v in model.trainable_state_dict().items()},
            "probe": model(_probe()),
            "single_probe": other(_probe()),
        }


def _spawn(worker, tmp_path: Path, timeout_s: float = 120.0) -> list[dict]:
    """Run ``worker(rank, world, folder)`` in ``WORLD`` fresh processes; return each rank's result."""
    context = mp.start_processes(
        worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{worker.__name__} did not finish within {timeout_s:.0f} s (a collective hung?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def _init(rank: int, world: int, folder: str) -> None:
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on the fused LoRA path
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(folder, 'store')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def _in_group(body, rank: int, world: int, folder: str) -> None:
    """Run ``body(rank, world, folder)`` inside the process group, then tear the group down.

    The body's objects (modules, FSDP2 state, collective handles) are collected while the group
    and the interpreter are alive: gloo's worker threads can hold async work whose tensors
    point back into Python, and destroying those during interpreter finalisation aborts the
    process ("terminate called without an active exception", SIGABRT after every result was
    written; about one run in ten on 2 cores, pytorch/pytorch#179291). A barrier keeps a rank
    from leaving while the other is still inside a collective.
    """
    _init(rank, world, folder)
    try:
        body(rank, world, folder)
        gc.collect()
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
        gc.collect()


def _half(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return tensor.chunk(world)[rank]


# ----------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, folder: str) -> None:
    _in_group(_ddp_body, rank, world, folder)


def _ddp_body(rank: int, world: int, folder: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _adapted()
    names = {id(p): n for n, p in model.named_parameters()}
    ddp = DDP(model)
    reduced: set[str] = set()

    def recording_allreduce(state, bucket):
        reduced.update(names[id(p)] for p in bucket.parameters())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, recording_allreduce)
    x, y = _batch()
    losses, frozen_grad_free = _train(ddp, _half(x, rank, world), _half(y, rank, world), model)

    # Every rank calls saver; only rank 0 may write (each names its own file to show it).
    model.saver(os.path.join(folder, f"ddp_rank{rank}.safetensors"))
    fresh = _adapted(seed=3)
    fresh_ddp = DDP(fresh)
    fresh.loader(os.path.join(folder, "single.safetensors"))  # every replica loads it
    with torch.no_grad():
        loaded_probe = fresh_ddp(_probe())
    result = {
        "losses": _global_mean(losses),
        "frozen_grad_free": frozen_grad_free,
        "reduced": sorted(reduced),
        "state": model.trainable_state_dict(),
        "loaded_probe": loaded_probe,
    }
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))


def test_ddp_matches_one_process_and_all_reduces_only_trainable_parameters(tmp_path):
    reference = _reference(tmp_path)
    ranks = _spawn(_ddp_worker, tmp_path)
    model = _adapted()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for rank, result in enumerate(ranks):
        assert result["frozen_grad_free"], f"rank {rank}: a frozen parameter got a gradient"
        # DDP's reducer holds only parameters that require grad: frozen ones are never synced.
        assert [n.removeprefix("module.") for n in result["reduced"]] == trainable, rank
        assert result["losses"] == pytest.approx(reference["losses"], abs=ATOL)
        for key, value in reference["state"].items():
            torch.testing.assert_close(result["state"][key], value, atol=ATOL, rtol=ATOL, msg=key)
        # A single-process checkpoint loads into every DDP replica.
        torch.testing.assert_close(result["loaded_probe"], reference["single_probe"], atol=ATOL, rtol=ATOL)
    # saver under a process group: rank 0 writes, the other ranks do not.
    assert (tmp_path / "ddp_rank0.safetensors").is_file()
    assert not (tmp_path / "ddp_rank1.safetensors").exists()
    single = _adapted(seed=5)
    single.loader(str(tmp_path / "ddp_rank0.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(single(_probe()), reference["probe"], atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------- FSDP2
def _fsdp_model(seed: int, mesh) -> AdaptedModel:
    from torch.distributed.fsdp import fully_shard

    model = _adapted(seed)
    for name in model.replace_layers:
        fully_shard(model.adapted_model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_worker(rank: int, world: int, folder: str) -> None:
    _in_group(_fsdp_body, rank, world, folder)


def _fsdp_body(rank: int, world: int, folder: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (world,))
    model = _fsdp_model(0, mesh)
    x, y = _batch()
    losses, frozen_grad_free = _train(model, _half(x, rank, world), _half(y, rank, world), model)
    all_sharded = all(isinstance(p, DTensor) for p in model.parameters())

    with CommDebugMode() as comm:
        model.saver(os.path.join(folder, "fsdp.safetensors"))  # a collective: every rank calls it
    gathers = sum(count for op, count in comm.get_comm_counts().items() if "all_gather" in str(op))

    fresh = _fsdp_model(3, mesh)
    fresh.loader(os.path.join(folder, "single.safetensors"))
    still_sharded = all(
        isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0]
        for p in fresh.parameters()
        if p.shape[0] > 1
    )
    with torch.no_grad():
        loaded_probe = fresh(_probe())
    result = {
        "losses": _global_mean(losses),
        "frozen_grad_free": frozen_grad_free,
        "all_sharded": all_sharded,
        "gathers": gathers,
        "state": model.trainable_state_dict(),
        "loaded_probe": loaded_probe,
        "still_sharded": still_sharded,
    }
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))


def test_fsdp2_matches_one_process_and_checkpoints_gather_only_trainable_shards(tmp_path):
    reference = _reference(tmp_path)
    ranks = _spawn(_fsdp_worker, tmp_path)
    model = _adapted()
    n_trainable = sum(p.requires_grad for p in model.parameters())
    n_frozen = sum(not p.requires_grad for p in model.parameters())
    assert n_frozen > 0
    for rank, result in enumerate(ranks):
        assert result["all_sharded"], f"rank {rank}: fully_shard left a parameter unsharded"
        assert result["frozen_grad_free"], f"rank {rank}: a frozen parameter got a gradient"
        assert result["losses"] == pytest.approx(reference["losses"], abs=ATOL)
        # saver gathered exactly one all-gather per trainable tensor and none for frozen weights.
        assert result["gathers"] == n_trainable, (rank, result["gathers"], n_trainable, n_frozen)
        for key, value in reference["state"].items():
            torch.testing.assert_close(result["state"][key], value, atol=ATOL, rtol=ATOL, msg=key)
        # A single-process checkpoint loads into the FSDP2 model, which stays sharded.
        assert result["still_sharded"], rank
        torch.testing.assert_close(result["loaded_probe"], reference["single_probe"], atol=ATOL, rtol=ATOL)
    # An FSDP2 checkpoint holds whole tensors and loads into a single-process model.
    single = _adapted(seed=5)
    single.loader(str(tmp_path / "fsdp.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(single(_probe()), reference["probe"], atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------- the benchmark
def test_multi_device_benchmark_runs_on_cpu_and_every_setup_agrees_with_one_device(tmp_path):
    """``benchmarks/bench_multi_gpu.py`` at its CPU shape: gloo DDP/FSDP2 over 2 processes and
    JAX meshes over 4 simulated devices, each row's losses within 1e-4 of the one-device run."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_multi_gpu.py"
    out = tmp_path / "multi.md"
    command = [sys.executable, str(script), "--device", "cpu", "--devices", "2", "--jax-devices", "4"]
    command += ["--steps", "1", "--warmup", "1", "--check", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [
        line.split("|")[1:-1]
        for line in out.read_text().splitlines()
        if line.startswith("| torch") or line.startswith("| jax")
    ]
    setups = [(cells[0].strip(), cells[1].strip(), int(cells[2])) for cells in rows]
    assert setups == [
        ("torch", "1 device", 1),
        ("torch", "DDP", 2),
        ("torch", "FSDP2", 2),
        ("jax", "1 device", 1),
        ("jax", "mesh data", 4),
        ("jax", "mesh data x model", 4),
    ]
    for cells in rows:
        assert float(cells[3]) > 0 and "MiB" in cells[5]
        assert float(cells[6]) <= 1e-4, cells
