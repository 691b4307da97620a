"""PyTorch benchmark: a LoRA/Houlsby training step against the frozen-model floor, and inference.

Model: ``transformers.BertModel(BertConfig())`` (BERT-base shape, random init, sdpa attention,
dropout on), batch 32 x 128 tokens, rank 16, AdamW (fused on CUDA), loss ``mean(h.float()**2)``
over the last hidden state. One row per setup and dtype (bf16 autocast, float32):

- ``floor``: the frozen model, forward + backward with activation gradients only (the embedding
  output requires grad); no adapter step can cost less;
- ``full``: full fine-tuning;
- ``ours``: ``torch_impl.AdaptedModel`` + ``LoRA`` (its fused path);
- ``peft``: PEFT's LoRA on the same layers (same rank and scaling, no dropout);
- ``plain``: SpeechBrain's unfused formula ``pretrained(x) + up(down(x)) * scaling``;
- ``houlsby``: ``HoulsbyAdapterLinear`` with ``projection_size = rank`` on the same layers.

Targets are ``q,v`` (query, value) and ``q,k,v,o`` (query, key, value, attention.output.dense).
Each step is timed with ``torch.cuda.synchronize()`` on both sides; the median of ``--steps``
steps after ``--warmup`` is reported, plus the same step captured whole in a CUDA graph and
replayed (no CPU launch overhead: what the GPU alone needs). Inference rows compare the base
model with unmerged and merged adapters. ``--device cpu`` runs a smaller shape (see ``SHAPES``).

Usage::

    python benchmarks/bench_train.py --device cuda --out benchmarks/results/torch_gpu.md
    python benchmarks/bench_train.py --device cpu --out benchmarks/results/torch_cpu.md
    python benchmarks/bench_train.py --compile --setups ours --dtypes bf16   # torch.compile rows
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.machinery
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _stub_torchaudio_if_broken() -> None:
    """transformers and PEFT import torchaudio at import time; PyPI's torchaudio does not load
    beside the CPU torch wheel of the dev environment, and nothing here touches audio."""
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchaudio")
        stub.__path__ = []
        stub.__version__ = "0.0.0"
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None, is_package=True)
        sys.modules["torchaudio"] = stub


_stub_torchaudio_if_broken()

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import _common  # noqa: E402
from benchmarks._common import BERT_TARGETS as TARGETS  # noqa: E402
from benchmarks._common import RANK, Shape, bert_summary, fmt, with_counts, write_report  # noqa: E402
from torch_impl import AdaptedModel, HoulsbyAdapterLinear, LoRA, merge_lora  # noqa: E402

PEFT_TARGETS = {"q,v": ["query", "value"], "q,k,v,o": ["query", "key", "value", "attention.output.dense"]}
DTYPES = {"bf16": torch.bfloat16, "fp32": None}

SHAPES = {
    "cuda": Shape(config={}, batch=32, seq=128, steps=30, warmup=10),
    "cpu": _common.BERT_CPU_SHAPE,
}


class PlainLoRA(LoRA):
    """SpeechBrain 1.1's ``LoRA.forward``, verbatim: the unfused formula, for comparison."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_pretrained = self.pretrained_module(x)
        x_lora = self.adapter_up_proj(self.adapter_down_proj(x)) * self.scaling
        return x_pretrained + x_lora


@dataclasses.dataclass
class Row:
    """One measured line of a table."""

    setup: str
    targets: str
    dtype: str
    trainable: int
    ms: float
    graph_ms: float | None
    peak_mib: float | None
    ratio: float | None = None
    graph_ratio: float | None = None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _randomize_up_projections(model: nn.Module) -> None:
    """A fresh LoRA has ``up = 0``; time on non-zero weights, as after some training."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("adapter_up_proj.weight", "lora_B.default.weight")):
                param.normal_(0.0, 0.02)


def build_model(setup: str, targets: str, shape: Shape, device: torch.device) -> nn.Module:
    """The BERT model of one row, on ``device``, in train mode, with only its trainable
    parameters requiring grad."""
    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig(**shape.config)).to(device)
    if setup == "full":
        return base.train()
    base.requires_grad_(False)
    if setup == "base":
        return base.train()
    if setup == "floor":
        # Activation gradients only: the embedding output is a fresh leaf that requires grad.
        base.embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        return base.train()
    if setup in ("ours", "plain", "houlsby"):
        adapter, kwargs = {
            "ours": (LoRA, {"rank": RANK}),
            "plain": (PlainLoRA, {"rank": RANK}),
            "houlsby": (HoulsbyAdapterLinear, {"projection_size": RANK}),
        }[setup]
        model = AdaptedModel(base, adapter, target_layers=TARGETS[targets], adapter_kwargs=kwargs)
    elif setup == "peft":
        import peft

        config = peft.LoraConfig(
            r=RANK, lora_alpha=1.0, lora_dropout=0.0, target_modules=PEFT_TARGETS[targets]
        )
        model = peft.get_peft_model(base, config)
    else:
        raise ValueError(f"unknown setup {setup!r}")
    _randomize_up_projections(model)
    return model.train()


def make_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer | None:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return None
    cuda = device.type == "cuda"
    return torch.optim.AdamW(params, lr=1e-4, fused=cuda, capturable=cuda)


def make_step(
    model: nn.Module, optimizer, ids: torch.Tensor, amp_dtype: torch.dtype | None
) -> Callable[[bool], torch.Tensor]:
    """One training step; ``zero_grad=False`` inside a CUDA-graph capture."""
    device_type = ids.device.type

    def step(zero_grad: bool = True) -> torch.Tensor:
        if optimizer is not None and zero_grad:
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            hidden = model(input_ids=ids).last_hidden_state
        loss = hidden.float().square().mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss

    return step


def time_calls(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` calls after ``warmup``, synchronising around each."""
    return _common.time_calls(fn, steps, warmup, sync=lambda: _sync(device))


def time_graph(fn: Callable[[], object], prepare: Callable[[], None], steps: int, warmup: int) -> float:
    """Median ms of replaying ``fn`` captured whole in a CUDA graph (side-stream warm-up first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            prepare()
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    prepare()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = time_calls(graph.replay, steps, warmup, torch.device("cuda"))
    del graph
    return statistics.median(times)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_training(
    setup: str, targets: str, dtype: str, shape: Shape, device: torch.device, graphs: bool, compile_: bool
) -> Row:
    model = build_model(setup, targets, shape, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, device)
    ids = torch.randint(0, model.config.vocab_size, (shape.batch, shape.seq), device=device)
    runner = torch.compile(model) if compile_ else model
    step = make_step(runner, optimizer, ids, DTYPES[dtype])
    for _ in range(shape.warmup):
        step()
    _sync(device)
    _reset_peak(device)
    ms = statistics.median(time_calls(step, shape.steps, 0, device))
    peak = _peak_mib(device)
    graph_ms, note = None, ""
    if graphs and device.type == "cuda" and not compile_:
        try:
            prepare = (lambda: optimizer.zero_grad(set_to_none=True)) if optimizer else (lambda: None)
            graph_ms = time_graph(lambda: step(zero_grad=False), prepare, shape.steps, shape.warmup)
        except Exception as error:  # a capture failure is reported, not fatal
            note = f"graph capture failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    name = f"{setup} (torch.compile)" if compile_ else setup
    return Row(
        name,
        targets if setup not in ("floor", "full") else "-",
        dtype,
        trainable,
        ms,
        graph_ms,
        peak,
        note=note,
    )


def bench_inference(
    setup: str, targets: str, dtype: str, shape: Shape, device: torch.device, graphs: bool
) -> Row:
    kind, _, merged = setup.partition(" ")
    model = build_model(kind, targets, shape, device).eval()
    if merged == "merged":
        merge_lora(model)
    ids = torch.randint(0, model.config.vocab_size, (shape.batch, shape.seq), device=device)
    amp_dtype = DTYPES[dtype]

    def forward() -> torch.Tensor:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None),
        ):
            return model(input_ids=ids).last_hidden_state

    _reset_peak(device)
    ms = statistics.median(time_calls(forward, shape.steps, shape.warmup, device))
    peak = _peak_mib(device)
    graph_ms, note = None, ""
    if graphs and device.type == "cuda":
        try:
            graph_ms = time_graph(forward, lambda: None, shape.steps, shape.warmup)
        except Exception as error:
            note = f"graph capture failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return Row(setup, targets if kind != "base" else "-", dtype, 0, ms, graph_ms, peak, note=note)


def profile_training(
    setup: str, targets: str, dtype: str, shape: Shape, device: torch.device, steps: int = 5
) -> str:
    """torch.profiler key averages of ``steps`` training steps, plus GPU kernel time per step."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(setup, targets, shape, device)
    optimizer = make_optimizer(model, device)
    ids = torch.randint(0, model.config.vocab_size, (shape.batch, shape.seq), device=device)
    step = make_step(model, optimizer, ids, DTYPES[dtype])
    for _ in range(shape.warmup):
        step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    kernel_us = sum(
        e.device_time_total
        for e in prof.events()
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
    )
    kernels = sum(
        1 for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
    )
    averages = prof.key_averages()
    tables = []
    if device.type == "cuda":
        gpu = averages.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70)
        tables.append("GPU time by op and kernel (5 steps):\n" + gpu)
    cpu = averages.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70)
    tables.append("CPU time by op (5 steps):\n" + cpu)
    header = (
        f"### {setup} {targets} {dtype}: wall {wall_ms:.2f} ms/step (profiled), GPU kernels "
        f"{kernel_us / 1e3 / steps:.2f} ms/step in {kernels / steps:.0f} kernels/step\n"
    )
    return header + "".join(f"\n```\n{table}\n```\n" for table in tables)


def environment(device: torch.device) -> str:
    import peft

    parts = []
    if device.type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(device)}")
        parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    else:
        parts.append(
            f"CPU: {_cpu_name()} ({torch.get_num_threads()} threads, "
            f"load average {_common.load_average()} at start)"
        )
        parts.append(f"torch {torch.__version__}")
    parts += [
        f"transformers {transformers.__version__}",
        f"peft {peft.__version__}",
        f"float32 matmul precision {torch.get_float32_matmul_precision()!r}",
        _common.utc_timestamp(),
    ]
    return " · ".join(parts)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def training_table(rows: list[Row]) -> str:
    lines = [
        "| setup | targets | dtype | trainable params | ms/step | x floor | CUDA-graph ms | x floor (graph) | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.setup} | {row.targets} | {row.dtype} | {row.trainable:,} | {row.ms:.2f} | "
            f"{fmt(row.ratio, '.2f')} | {fmt(row.graph_ms, '.2f')} | {fmt(row.graph_ratio, '.2f')} | "
            f"{fmt(row.peak_mib, '.0f')} |"
        )
    return "\n".join(lines)


def inference_table(rows: list[Row]) -> str:
    lines = [
        "| model | targets | dtype | ms/forward | x base | CUDA-graph ms | x base (graph) | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.setup} | {row.targets} | {row.dtype} | {row.ms:.2f} | {fmt(row.ratio, '.3f')} | "
            f"{fmt(row.graph_ms, '.2f')} | {fmt(row.graph_ratio, '.3f')} | {fmt(row.peak_mib, '.0f')} |"
        )
    return "\n".join(lines)


def _set_ratios(rows: list[Row], reference: str) -> None:
    for dtype in {row.dtype for row in rows}:
        ref = next((r for r in rows if r.dtype == dtype and r.setup == reference), None)
        if ref is None:
            continue
        for row in rows:
            if row.dtype == dtype:
                row.ratio = row.ms / ref.ms
                if row.graph_ms is not None and ref.graph_ms is not None:
                    row.graph_ratio = row.graph_ms / ref.graph_ms


TRAINING_SETUPS = [
    ("floor", "-"),
    ("full", "-"),
    ("ours", "q,v"),
    ("peft", "q,v"),
    ("plain", "q,v"),
    ("houlsby", "q,v"),
    ("ours", "q,k,v,o"),
    ("peft", "q,k,v,o"),
    ("plain", "q,k,v,o"),
    ("houlsby", "q,k,v,o"),
]
INFERENCE_SETUPS = [
    ("base", "-"),
    ("ours", "q,v"),
    ("ours", "q,k,v,o"),
    ("ours merged", "q,k,v,o"),
    ("plain", "q,k,v,o"),
    ("peft", "q,k,v,o"),
    ("houlsby", "q,k,v,o"),
]
PROFILED = [
    ("floor", "-", "bf16"),
    ("full", "-", "bf16"),
    ("ours", "q,v", "bf16"),
    ("ours", "q,k,v,o", "bf16"),
    ("plain", "q,k,v,o", "bf16"),
    ("floor", "-", "fp32"),
    ("ours", "q,k,v,o", "fp32"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the markdown tables here too")
    parser.add_argument("--steps", type=int, help="timed steps (median); default per device")
    parser.add_argument("--warmup", type=int, help="untimed steps first; default per device")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32")
    parser.add_argument("--setups", help="comma list of setup names to run (default: all)")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--no-inference", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="run every training row under torch.compile (no inference)"
    )
    parser.add_argument("--profile-out", type=Path, help="write torch.profiler tables (bf16 rows) here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    shape = with_counts(SHAPES[device.type], args.steps, args.warmup)
    dtypes = [d for d in args.dtypes.split(",") if d]
    wanted = set(args.setups.split(",")) if args.setups else None
    graphs = not args.no_graphs and device.type == "cuda"
    config = transformers.BertConfig(**shape.config)
    header = (
        f"## PyTorch: BERT {bert_summary(config, shape)}, AdamW; median of {shape.steps} steps after "
        f"{shape.warmup} warm-up, synchronised timing\n\n{environment(device)}\n"
    )
    print(header, flush=True)

    rows: list[Row] = []
    for dtype in dtypes:
        for setup, targets in TRAINING_SETUPS:
            if wanted and setup not in wanted and setup != "floor":
                continue
            row = bench_training(setup, targets, dtype, shape, device, graphs, compile_=args.compile)
            _release(device)
            rows.append(row)
            print(
                f"train {row.setup:8s} {row.targets:8s} {dtype}: {row.ms:8.2f} ms  graph "
                f"{fmt(row.graph_ms, '8.2f')} ms  {row.note}",
                flush=True,
            )
    _set_ratios(rows, "floor (torch.compile)" if args.compile else "floor")

    inference: list[Row] = []
    if not (args.no_inference or args.compile):
        for dtype in dtypes:
            for setup, targets in INFERENCE_SETUPS:
                if wanted and setup.split()[0] not in wanted and setup != "base":
                    continue
                row = bench_inference(setup, targets, dtype, shape, device, graphs)
                _release(device)
                inference.append(row)
                print(
                    f"infer {row.setup:12s} {row.targets:8s} {dtype}: {row.ms:8.2f} ms  graph "
                    f"{fmt(row.graph_ms, '8.2f')} ms  {row.note}",
                    flush=True,
                )
        _set_ratios(inference, "base")

    notes = [f"- {r.setup} {r.targets} {r.dtype}: {r.note}" for r in rows + inference if r.note]
    text = "\n".join(
        [
            header,
            "### Training step (x floor: ratio to the frozen floor of the same dtype)\n",
            training_table(rows),
            "",
            "### Inference (forward, eval, inference_mode)\n",
            inference_table(inference) if inference else "(skipped)",
            "",
            *(["Notes:", *notes, ""] if notes else []),
        ]
    )
    print("\n" + text, flush=True)
    if args.out:
        write_report(args.out, text + "\n")

    if args.profile_out:
        profiles = []
        for setup, targets, dtype in PROFILED:
            if dtype not in dtypes:
                continue
            profiles.append(profile_training(setup, targets, dtype, shape, device))
            _release(device)
        write_report(args.profile_out, header + "\n" + "\n".join(profiles))
        for profile_text in profiles:
            print(profile_text.splitlines()[0], flush=True)


if __name__ == "__main__":
    main()
