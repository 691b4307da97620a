"""PyTorch benchmark: a LoRA/Houlsby training step against the frozen-model floor, and inference.

Model: ``transformers.BertModel(BertConfig())`` (BERT-base shape, random init, sdpa attention,
dropout on), batch 32 x 128 tokens, rank 16, AdamW (fused on CUDA), loss ``mean(h.float()**2)``
over the last hidden state. Setups, each in bf16 autocast and float32:

- ``floor``: the frozen model, forward + backward with activation gradients only (the one
  trainable tensor is the embedding LayerNorm's scale, so the whole encoder backward runs for
  activations; no optimizer); no adapter step can cost less;
- ``full``: full fine-tuning;
- ``ours``: ``torch_impl.AdaptedModel`` + ``LoRA`` (its fused path, ``torch_impl.fused``);
- ``ours+qkv``: the same plus the opt-in ``torch_impl.fused.group_shared_input(model)`` (query,
  key and value computed in one autograd function);
- ``peft``: PEFT's LoRA on the same layers (same rank and scaling, no dropout);
- ``plain``: SpeechBrain's unfused formula ``pretrained(x) + up(down(x)) * scaling``;
- ``houlsby``: ``HoulsbyAdapterLinear`` with ``projection_size = rank`` on the same layers.

Modes (``--modes``, ``--compile-modes``): ``eager``; ``graph`` (the whole step captured once in a
CUDA graph and replayed: the GPU's time without the host's launch overhead); ``compile`` and
``compile-max-autotune-no-cudagraphs`` (``torch.compile(model, fullgraph=True, mode=...)``, the
optimizer step eager). Every ratio is taken to the floor of the same dtype and mode, timed in the
same group: every setup of a group is prepared first, then timed once a round for ``--rounds``
rounds (per round the median of ``--steps`` synchronised steps); the tables give the median of the
rounds and their spread ``(max - min) / median``, so that a slow phase of the machine cannot decide
a ranking. Peak memory is the allocator's peak over a case's warm-up minus what was allocated
before it was built. Also: scaling rows (q,k,v,o at rank 8 and 64 and at 8 x 512 tokens, graph
mode), inference (base, unmerged, merged), a torch.profiler table (``--profile-out``) and the
issue-17 target table. ``--deadline`` skips the groups that would start past it, for device
calls of bounded length. ``--device cpu`` runs a smaller shape (see ``SHAPES``).

Usage::

    python benchmarks/bench_train.py --device cuda --out benchmarks/results/torch_gpu.md \
        --profile-out benchmarks/results/torch_gpu_profile.txt
    python benchmarks/bench_train.py --device cuda --modes "" --no-scaling --no-inference \
        --compile-modes default,max-autotune-no-cudagraphs --out benchmarks/results/torch_gpu_compile.md
    python benchmarks/bench_train.py --device cpu --out benchmarks/results/torch_cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.pretrained import hide_broken_torchaudio  # noqa: E402

# transformers and PEFT import torchaudio at import time; the one beside the CPU torch wheel of
# the dev environment does not load, and nothing here touches audio.
hide_broken_torchaudio()

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import _common  # noqa: E402
from benchmarks._common import BERT_TARGETS as TARGETS  # noqa: E402
from benchmarks._common import RANK, Shape, bert_summary, fmt, with_counts, write_report  # noqa: E402
from torch_impl import AdaptedModel, HoulsbyAdapterLinear, LoRA, fused, merge_and_unload, merge_lora  # noqa: E402

PEFT_TARGETS = {"q,v": ["query", "value"], "q,k,v,o": ["query", "key", "value", "attention.output.dense"]}
DTYPES = {"bf16": torch.bfloat16, "fp32": None}

SHAPES = {
    "cuda": Shape(config={}, batch=32, seq=128, steps=20, warmup=5),
    "cpu": _common.BERT_CPU_SHAPE,
}


class PlainLoRA(LoRA):
    """SpeechBrain 1.1's ``LoRA.forward``, verbatim: the unfused formula, for comparison."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_pretrained = self.pretrained_module(x)
        x_lora = self.adapter_up_proj(self.adapter_down_proj(x)) * self.scaling
        return x_pretrained + x_lora


@dataclasses.dataclass(frozen=True)
class Case:
    """One setup of one table: what is built, in which dtype and mode, at which size."""

    setup: str  # floor, full, ours, peft, plain, houlsby, base, "ours merged"
    targets: str = "-"
    dtype: str = "bf16"
    mode: str = "eager"  # eager, graph, compile, compile-max-autotune-no-cudagraphs
    rank: int = RANK
    batch: int = 0  # 0: the run's shape
    seq: int = 0
    infer: bool = False  # an inference forward instead of a training step
    no_grad: bool = False  # inference under torch.no_grad() instead of torch.inference_mode()

    @property
    def key(self) -> str:
        size = (
            ""
            if (self.rank, self.batch, self.seq) == (RANK, 0, 0)
            else f" r{self.rank} {self.batch}x{self.seq}"
        )
        grad = " no_grad" if self.no_grad else ""
        return f"{'infer' if self.infer else 'train'} {self.setup} {self.targets} {self.dtype} {self.mode}{grad}{size}"

    @property
    def floor(self) -> Case:
        """The frozen floor this case's ratio is taken against (same dtype, mode and size)."""
        return dataclasses.replace(self, setup="base" if self.infer else "floor", targets="-", rank=RANK)


@dataclasses.dataclass
class Result:
    case: Case
    trainable: int = 0
    adapter_mib: float = 0.0  # adapter params + grads + AdamW states, float32
    peak_mib: float | None = None
    timing: _common.Timing | None = None
    note: str = ""
    tokens: str = "-"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _randomize_up_projections(model: nn.Module) -> None:
    """A fresh LoRA has ``up = 0``; time on non-zero weights, as after some training."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("adapter_up_proj.weight", "lora_B.default.weight")):
                param.normal_(0.0, 0.02)


def build_model(setup: str, targets: str, shape: Shape, device: torch.device, rank: int = RANK) -> nn.Module:
    """The BERT model of one row, on ``device``, in train mode, with only its trainable
    parameters requiring grad."""
    torch.manual_seed(0)
    with device:  # initialise on the device: seconds less per model on a GPU
        base = transformers.BertModel(transformers.BertConfig(**shape.config))
    if setup == "full":
        return base.train()
    base.requires_grad_(False)
    if setup == "base":
        return base.train()
    if setup == "floor":
        # Activation gradients only, as far down as the embeddings: the one trainable tensor is
        # the embedding LayerNorm's scale (768 numbers; no optimizer), so autograd runs the whole
        # encoder's backward for activations. (A hook making the embedding output require grad
        # does the same eagerly, but torch.compile(fullgraph=True) refuses it.)
        base.embeddings.LayerNorm.weight.requires_grad_(True)
        return base.train()
    if setup in ("ours", "ours+qkv", "plain", "houlsby"):
        adapter, kwargs = {
            "ours": (LoRA, {"rank": rank}),
            "ours+qkv": (LoRA, {"rank": rank}),
            "plain": (PlainLoRA, {"rank": rank}),
            "houlsby": (HoulsbyAdapterLinear, {"projection_size": rank}),
        }[setup]
        model = AdaptedModel(base, adapter, target_layers=TARGETS[targets], adapter_kwargs=kwargs)
        if setup == "ours+qkv":
            fused.group_shared_input(model)  # opt-in: q, k, v computed together
    elif setup == "peft":
        import peft

        config = peft.LoraConfig(
            r=rank, lora_alpha=1.0, lora_dropout=0.0, target_modules=PEFT_TARGETS[targets]
        )
        model = peft.get_peft_model(base, config)
    else:
        raise ValueError(f"unknown setup {setup!r}")
    _randomize_up_projections(model)
    return model.train()


def make_optimizer(model: nn.Module, device: torch.device, setup: str) -> torch.optim.Optimizer | None:
    params = [p for p in model.parameters() if p.requires_grad]
    if setup == "floor":  # nothing to train: no optimizer, but zero_grad between steps
        return _ZeroGrad(params)
    cuda = device.type == "cuda"
    return torch.optim.AdamW(params, lr=1e-4, fused=cuda, capturable=cuda)


class _ZeroGrad:
    """The floor's stand-in for an optimizer: ``zero_grad`` only, ``step`` does nothing."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None

    def step(self) -> None:
        return None


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


def make_forward(
    model: nn.Module, ids: torch.Tensor, amp_dtype: torch.dtype | None, no_grad: bool = False
) -> Callable[[], torch.Tensor]:
    device_type = ids.device.type
    grad_off = torch.no_grad if no_grad else torch.inference_mode

    def forward() -> torch.Tensor:
        with (
            grad_off(),
            torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None),
        ):
            return model(input_ids=ids).last_hidden_state

    return forward


def capture_graph(fn: Callable[[], object], prepare: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """``fn`` captured whole in a CUDA graph (side-stream warm-up first)."""
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
    return graph


def _peak_mib(device: torch.device, start: int) -> float | None:
    return (torch.cuda.max_memory_allocated(device) - start) / 2**20 if device.type == "cuda" else None


def prepare(
    case: Case, shape: Shape, device: torch.device, warmup: int
) -> tuple[Callable[[], object], Result]:
    """Build ``case``, warm it up (compiling or capturing it), and return one step to time.

    The peak memory of an eager or compiled case is the allocator's peak over its warm-up minus
    what was allocated before the case was built: its model, optimizer state and step alone.
    """
    gc.collect()
    start = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch, seq = case.batch or shape.batch, case.seq or shape.seq
    run_shape = dataclasses.replace(shape, batch=batch, seq=seq)
    kind, _, merged = case.setup.partition(" ")
    model = build_model(kind, case.targets, run_shape, device, rank=case.rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if case.setup == "floor":
        trainable = []
    result = Result(case, trainable=sum(p.numel() for p in trainable))
    result.tokens = f"{batch}x{seq}"
    result.adapter_mib = 4 * sum(p.numel() * p.element_size() for p in trainable) / 2**20
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    amp = DTYPES[case.dtype]
    if case.infer:
        model.eval()
        if merged == "merged":
            # Ours keeps the wrappers (merge_lora); PEFT's merge_and_unload drops them.
            if kind == "ours":
                merge_lora(model)
            else:
                model = model.merge_and_unload()
        elif merged == "unloaded":
            model = merge_and_unload(model)  # ours, wrappers dropped as PEFT's merge_and_unload does
    runner: nn.Module = model
    if case.mode.startswith("compile"):
        mode = None if case.mode == "compile" else case.mode.removeprefix("compile-")
        runner = torch.compile(model, fullgraph=True, mode=mode)
    if case.infer:
        fn = make_forward(runner, ids, amp, no_grad=case.no_grad)
        prepare_fn = lambda: None  # noqa: E731
    else:
        optimizer = make_optimizer(model, device, kind)
        fn = make_step(runner, optimizer, ids, amp)
        prepare_fn = (lambda: optimizer.zero_grad(set_to_none=True)) if optimizer else (lambda: None)
    for _ in range(warmup):
        fn()
    _sync(device)
    result.peak_mib = _peak_mib(device, start)
    if case.mode == "graph":
        capture = fn if case.infer else (lambda: fn(False))
        graph = capture_graph(capture, prepare_fn)
        for _ in range(warmup):
            graph.replay()
        _sync(device)
        # The graph reads the model's weights, the optimizer's state and ``ids`` where they were at
        # capture time: keep them all alive for as long as the replay function lives.
        keep = (graph, fn, model, runner, ids)

        def replay(keep: tuple = keep) -> None:
            keep[0].replay()

        return replay, result
    return fn, result


def run_group(
    title: str, cases: list[Case], shape: Shape, device: torch.device, rounds: int, log
) -> list[Result]:
    """Prepare every case of a group, then time them interleaved (one step set a round each)."""
    log(f"{title}: preparing {len(cases)} cases")
    fns, results = {}, {}
    for case in cases:
        began = time.perf_counter()
        try:
            fns[case.key], results[case.key] = prepare(case, shape, device, shape.warmup)
        except Exception as error:  # reported in the table, not fatal
            results[case.key] = Result(
                case, note=f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            )
        log(f"  {case.key}: ready in {time.perf_counter() - began:.1f} s {results[case.key].note}")
    timings = _common.interleaved(fns, rounds, shape.steps, sync=lambda: _sync(device), log=log)
    for key, timing in timings.items():
        results[key].timing = timing
    del fns
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(results.values())


def _ms(result: Result | None) -> float | None:
    return None if result is None or result.timing is None else result.timing.median


def ratio(results: dict[Case, Result], case: Case, reference: Case | None = None) -> float | None:
    value, ref = _ms(results.get(case)), _ms(results.get(reference or case.floor))
    return None if value is None or ref is None else value / ref


def table(results: dict[Case, Result], reference_name: str) -> str:
    lines = [
        f"| setup | targets | dtype | mode | rank | tokens | trainable | ms (median of rounds) | spread | x {reference_name} | peak MiB |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for case, r in results.items():
        lines.append(
            f"| {case.setup} | {case.targets} | {case.dtype} | {case.mode}{' no_grad' if case.no_grad else ''} | {case.rank} | {r.tokens} | "
            f"{r.trainable:,} | {fmt(_ms(r), '.2f')} | {fmt(r.timing.spread * 100 if r.timing else None, '.1f')}% | "
            f"{fmt(ratio(results, case), '.3f')} | {fmt(r.peak_mib, '.0f')} |"
            + (f" {r.note}" if r.note else "")
        )
    return "\n".join(lines)


def training_cases(dtypes: list[str], modes: list[str], setups: list[str]) -> list[list[Case]]:
    groups = []
    for dtype in dtypes:
        group = []
        for mode in modes:
            group.append(Case("floor", dtype=dtype, mode=mode))
            for setup in setups:
                if setup == "full":
                    group.append(Case("full", dtype=dtype, mode=mode))
                    continue
                for targets in TARGETS:
                    if setup == "ours+qkv" and targets == "q,v":
                        continue  # nothing to group: query and value only
                    group.append(Case(setup, targets, dtype, mode))
        groups.append(group)
    return groups


def scaling_cases(dtypes: list[str]) -> list[list[Case]]:
    groups = []
    for dtype in dtypes:
        group = []
        for mode in ("graph",):  # the targets' graph rows
            group += [
                Case("floor", dtype=dtype, mode=mode),
                Case("floor", dtype=dtype, mode=mode, batch=8, seq=512),
                Case("ours", "q,k,v,o", dtype, mode, rank=8),
                Case("ours", "q,k,v,o", dtype, mode, rank=64),
                Case("ours", "q,k,v,o", dtype, mode, batch=8, seq=512),
                Case("peft", "q,k,v,o", dtype, mode, rank=64),
            ]
        groups.append(group)
    return groups


INFERENCE_SETUPS = [
    ("base", "-"),
    ("ours", "q,k,v,o"),
    ("ours merged", "q,k,v,o"),  # merge_lora: the wrappers stay
    ("ours unloaded", "q,k,v,o"),  # merge_and_unload: plain layers again
    ("peft", "q,k,v,o"),
    ("peft merged", "q,k,v,o"),  # PEFT's merge_and_unload
]


def inference_cases(
    dtypes: list[str], modes: list[str], no_grad: tuple[bool, ...] = (False, True)
) -> list[list[Case]]:
    """One group per dtype: every setup under ``inference_mode`` and under ``no_grad`` (the
    context most user code and SpeechBrain's evaluation use), each against its own base row."""
    return [
        [
            Case(setup, targets, dtype, mode, infer=True, no_grad=grad)
            for mode in modes
            for grad in no_grad
            for setup, targets in INFERENCE_SETUPS
        ]
        for dtype in dtypes
    ]


def target_summary(
    train: dict[Case, Result], compiled: dict[Case, Result], scaling: dict, infer: dict
) -> str:
    """Issue 17's targets, each with its number and 'met' / 'missed'."""
    lines = ["| target | row | measured | limit | verdict |", "|---|---|---:|---:|---|"]

    def add(target: str, row: str, value: float | None, limit: float) -> None:
        lines.append(
            f"| {target} | {row} | {fmt(value, '.3f')} | {limit:.2f} | {_common.verdict(value, limit)} |"
        )

    # Each ratio within its own group: the setups that were timed interleaved with it.
    for group in (train, scaling, compiled):
        for case in group:
            if case.setup not in ("ours", "ours+qkv"):
                continue
            mode = "compile" if case.mode.startswith("compile") else case.mode
            limit = _common.TARGET_LIMITS.get((mode, case.targets))
            if limit is not None:
                add(f"{mode} x floor", case.key, ratio(group, case), limit)
            if case.mode == "eager":
                peft = dataclasses.replace(case, setup="peft")
                if peft in group:
                    add("eager x PEFT", case.key, ratio(group, case, peft), _common.EAGER_VS_PEFT)
            if case.mode == "eager" and not case.batch and case.rank == RANK:
                floor, mine = group.get(case.floor), group[case]
                if floor is not None and floor.peak_mib is not None and mine.peak_mib is not None:
                    allowed = (floor.peak_mib + mine.adapter_mib) * _common.MEMORY_SLACK
                    add("peak memory / allowed", case.key, mine.peak_mib / allowed, 1.0)
    for case in infer:
        if case.setup in ("ours merged", "ours unloaded"):
            add("merged inference x base", case.key, ratio(infer, case), _common.MERGED_LIMIT)
        if case.setup == "ours":
            peft = dataclasses.replace(case, setup="peft")
            if peft in infer:
                add("unmerged inference x PEFT", case.key, ratio(infer, case, peft), 1.0)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the markdown tables here too")
    parser.add_argument("--steps", type=int, help="timed steps per round (median); default per device")
    parser.add_argument("--warmup", type=int, help="untimed steps first; default per device")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds (median and spread over them)"
    )
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32")
    parser.add_argument(
        "--setups", default="full,ours,peft,plain,houlsby", help="training setups beside the floor"
    )
    parser.add_argument("--modes", default="eager,graph", help="training modes: eager, graph")
    parser.add_argument(
        "--compile-modes",
        default="",
        help="comma list of torch.compile modes for the compile table (default, max-autotune-no-cudagraphs)",
    )
    parser.add_argument("--compile-setups", default="ours,plain,peft")
    parser.add_argument(
        "--compile-targets", default="q,v;q,k,v,o", help="';'-separated target sets to compile"
    )
    parser.add_argument("--no-training", action="store_true", help="skip the training table")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--no-inference", action="store_true")
    parser.add_argument(
        "--infer-grad-modes",
        default="inference_mode,no_grad",
        help="inference contexts: inference_mode, no_grad",
    )
    parser.add_argument(
        "--profile-infer", type=Path, help="write torch.profiler tables of eager bf16 inference rows here"
    )
    parser.add_argument(
        "--deadline", type=float, default=0.0, help="seconds; skip later groups past it (0: none)"
    )
    parser.add_argument("--profile-out", type=Path, help="write torch.profiler tables (bf16 rows) here")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    device = torch.device(args.device)
    shape = with_counts(SHAPES[device.type], args.steps, args.warmup)
    dtypes = [d for d in args.dtypes.split(",") if d]
    modes = [m for m in args.modes.split(",") if m and (m != "graph" or device.type == "cuda")]
    config = transformers.BertConfig(**shape.config)
    header = (
        f"## PyTorch: BERT {bert_summary(config, shape)}, AdamW; {args.rounds} interleaved rounds of "
        f"{shape.steps} steps after {shape.warmup} warm-up (median of rounds, spread = (max - min) / median)\n\n"
        f"{environment(device)}\n"
    )
    print(header, flush=True)

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {text}", flush=True)

    def in_time(name: str) -> bool:
        if args.deadline and time.perf_counter() - began > args.deadline:
            log(f"{name}: skipped (past the {args.deadline:.0f} s deadline)")
            return False
        return True

    sections: list[str] = []

    def flush() -> None:
        text = "\n".join([header, *sections])
        if args.out:
            write_report(args.out, text + "\n")

    train: dict[Case, Result] = {}
    for group in training_cases(dtypes, modes, [s for s in args.setups.split(",") if s]):
        if in_time("training") and not args.no_training:
            train.update({r.case: r for r in run_group("training", group, shape, device, args.rounds, log)})
    sections += [
        "### Training step (x floor: the frozen floor of the same dtype and mode)\n",
        table(train, "floor"),
        "",
    ]
    print(sections[-2], flush=True)
    flush()

    scaling: dict[Case, Result] = {}
    if device.type == "cuda" and not args.no_scaling:
        for group in scaling_cases(dtypes):
            if in_time("scaling"):
                scaling.update(
                    {r.case: r for r in run_group("scaling", group, shape, device, args.rounds, log)}
                )
        sections += [
            "### Scaling: q,k,v,o at rank 8 and 64, and at 8 x 512 tokens\n",
            table(scaling, "floor"),
            "",
        ]
        print(sections[-2], flush=True)
        flush()

    infer: dict[Case, Result] = {}
    if not args.no_inference:
        grads = tuple(g == "no_grad" for g in args.infer_grad_modes.split(",") if g)
        for group in inference_cases(dtypes, modes, grads):
            if in_time("inference"):
                infer.update(
                    {r.case: r for r in run_group("inference", group, shape, device, args.rounds, log)}
                )
        sections += [
            "### Inference (forward, eval; inference_mode, or no_grad where the mode says so; x base)\n",
            table(infer, "base"),
            "",
        ]
        print(sections[-2], flush=True)
        flush()

    compiled: dict[Case, Result] = {}
    for mode in [m for m in args.compile_modes.split(",") if m]:
        name = "compile" if mode == "default" else f"compile-{mode}"
        for dtype in dtypes:
            group = [Case("floor", dtype=dtype, mode=name)]
            for targets in args.compile_targets.split(";"):
                group += [Case(s, targets, dtype, name) for s in args.compile_setups.split(",") if s]
            if in_time(name):
                torch._dynamo.reset()
                compiled.update({r.case: r for r in run_group(name, group, shape, device, args.rounds, log)})
            sections_now = ["### torch.compile (fullgraph=True; x the compiled floor of the same mode)\n"]
            sections_now.append(table(compiled, "floor"))
            flush_sections = [*sections, *sections_now, ""]
            text = "\n".join([header, *flush_sections])
            if args.out:
                write_report(args.out, text + "\n")
    if compiled:
        sections += [
            "### torch.compile (fullgraph=True; x the compiled floor of the same mode)\n",
            table(compiled, "floor"),
            "",
        ]

    notes = [
        f"- {r.case.key}: {r.note}"
        for r in [*train.values(), *scaling.values(), *infer.values(), *compiled.values()]
        if r.note
    ]
    sections += [
        "### Targets (issue 17)\n",
        target_summary(train, compiled, scaling, infer),
        "",
        *(["Notes:", *notes, ""] if notes else []),
    ]
    print("\n" + "\n".join(sections[-3:]), flush=True)
    flush()

    if args.profile_infer and in_time("profile inference"):
        write_report(args.profile_infer, header + "\n" + profile_inference(shape, device, args.rounds))
        print(args.profile_infer.read_text().split("\n### ")[0][-3000:], flush=True)

    if args.profile_out and in_time("profile"):
        profiles = []
        for setup, targets, dtype in PROFILED:
            if dtype in dtypes:
                profiles.append(profile_training(setup, targets, dtype, shape, device))
                gc.collect()
        write_report(args.profile_out, header + "\n" + "\n".join(profiles))
        for profile_text in profiles:
            print(profile_text.splitlines()[0], flush=True)
    log("done")


PROFILED = [
    ("floor", "-", "bf16"),
    ("ours", "q,k,v,o", "bf16"),
    ("ours+qkv", "q,k,v,o", "bf16"),
]


PROFILED_INFERENCE = ["base", "ours", "ours merged", "ours unloaded", "peft", "peft merged"]


def profile_inference(shape: Shape, device: torch.device, rounds: int, steps: int = 5) -> str:
    """Eager bf16 inference under ``no_grad`` and ``inference_mode``: per forward, the host time
    (until the forward returns, before synchronising), the wall time, the GPU kernel time and
    the number of kernels and of dispatched ops; then the op tables of ``ours`` in both contexts."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    lines = [
        "### Eager bf16 inference, q,k,v,o: host and GPU time per forward",
        "",
        "| setup | context | host ms (median) | wall ms (median) | GPU kernel ms | kernels | ops |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    tables = []
    for grad in (True, False):
        for setup in PROFILED_INFERENCE:
            case = Case(
                setup, "-" if setup == "base" else "q,k,v,o", "bf16", "eager", infer=True, no_grad=grad
            )
            fn, _ = prepare(case, shape, device, shape.warmup)
            host, wall = [], []
            for _ in range(rounds * shape.steps):
                _sync(device)
                start = time.perf_counter()
                fn()
                host.append(time.perf_counter() - start)
                _sync(device)
                wall.append(time.perf_counter() - start)
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    fn()
                _sync(device)
            events = prof.events()
            gpu = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
            ops = sum(1 for e in events if e.name.startswith("aten::"))
            context = "no_grad" if grad else "inference_mode"
            lines.append(
                f"| {setup} | {context} | {statistics.median(host) * 1e3:.2f} | "
                f"{statistics.median(wall) * 1e3:.2f} | {sum(e.device_time_total for e in gpu) / 1e3 / steps:.2f} | "
                f"{len(gpu) / steps:.0f} | {ops / steps:.0f} |"
            )
            if setup in ("ours", "ours merged"):
                averages = prof.key_averages()
                table = averages.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60)
                tables.append(
                    f"\n#### {setup}, {context}: ops by CPU time ({steps} forwards)\n\n```\n{table}\n```\n"
                )
            del fn
            gc.collect()
    return "\n".join(lines) + "\n" + "".join(tables)


def profile_training(
    setup: str, targets: str, dtype: str, shape: Shape, device: torch.device, steps: int = 5
) -> str:
    """torch.profiler key averages of ``steps`` training steps, plus GPU kernel time per step."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(setup, targets, shape, device)
    optimizer = make_optimizer(model, device, setup)
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


if __name__ == "__main__":
    main()
