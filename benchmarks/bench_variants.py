"""PyTorch benchmark of LoRA's PEFT options: a training step with each, against the frozen floor
and against PEFT's own implementation, in the same run.

Model: ``transformers.BertModel(BertConfig())`` (BERT-base shape, random init, dropout on),
batch 32 x 128 tokens, rank 16, AdamW (fused on CUDA), loss ``mean(h.float()**2)``; LoRA on
query and value. Rows, each in bf16 autocast and float32:

- ``floor``: the frozen model, activation gradients only (no adapter step can cost less);
- ``ours`` / ``peft``: plain LoRA (ours takes its fused path);
- ``ours-rslora``: ``use_rslora=True`` (a different constant: should cost nothing);
- ``ours-dora`` / ``peft-dora``: DoRA (``use_dora=True`` on both sides);
- ``ours-embedding`` / ``peft-embedding``: LoRA on ``word_embeddings`` too.

Setups are built once, then timed in interleaved rounds (every setup once per round, ``--rounds``
rounds, ``--steps`` timed steps after ``--warmup`` in each), so that drift of the machine hits
every row alike; a row reports the median over rounds of the per-round median step time, and the
spread (min..max of the round medians). Target (issue 16): ``ours-dora`` at most 0.8x
``peft-dora`` in both dtypes.

Usage::

    python benchmarks/bench_variants.py --device cuda --out benchmarks/results/variants_gpu.md
    python benchmarks/bench_variants.py --device cpu --rounds 2 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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
from benchmarks._common import RANK, Shape, bert_summary, write_report  # noqa: E402
from torch_impl import AdaptedModel, LoRA  # noqa: E402

SETUPS = (
    "floor",
    "ours",
    "peft",
    "ours-rslora",
    "ours-dora",
    "peft-dora",
    "ours-embedding",
    "peft-embedding",
)
VS_PEFT = {
    "ours": "peft",
    "ours-rslora": "peft",
    "ours-dora": "peft-dora",
    "ours-embedding": "peft-embedding",
}
DTYPES = {"bf16": torch.bfloat16, "fp32": None}
SHAPES = {
    "cuda": Shape(config={}, batch=32, seq=128, steps=15, warmup=5),
    "cpu": _common.BERT_CPU_SHAPE,
}
OUR_TARGETS = ["encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value"]
PEFT_TARGETS = ["query", "value"]


def build(setup: str, shape: Shape, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig(**shape.config)).to(device)
    base.requires_grad_(False)
    if setup == "floor":
        base.embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        return base.train()
    family, _, option = setup.partition("-")
    embedding = option == "embedding"
    if family == "ours":
        kwargs = {"rank": RANK, "use_rslora": option == "rslora", "use_dora": option == "dora"}
        targets = OUR_TARGETS + (["embeddings.word_embeddings"] if embedding else [])
        model = AdaptedModel(base, LoRA, target_layers=targets, adapter_kwargs=kwargs)
    else:
        import peft

        config = peft.LoraConfig(
            r=RANK,
            lora_alpha=1.0,
            lora_dropout=0.0,
            use_dora=option == "dora",
            target_modules=PEFT_TARGETS + (["word_embeddings"] if embedding else []),
        )
        model = peft.get_peft_model(base, config)
    with torch.no_grad():  # non-zero up factors, as after some training
        for name, param in model.named_parameters():
            if name.endswith(("adapter_up_proj.weight", "lora_B.default.weight", "lora_embedding_B.default")):
                param.normal_(0.0, 0.02)
    return model.train()


def make_step(model: nn.Module, ids: torch.Tensor, amp_dtype: torch.dtype | None):
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = ids.device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda) if params else None

    def step() -> None:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast(ids.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            hidden = model(input_ids=ids).last_hidden_state
        hidden.float().square().mean().backward()
        if optimizer is not None:
            optimizer.step()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = _common.with_counts(SHAPES[device.type], args.steps, args.warmup)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows measure fp32
        torch.backends.cudnn.allow_tf32 = False
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    torch.manual_seed(0)
    vocab = transformers.BertConfig(**shape.config).vocab_size
    ids = torch.randint(0, vocab, (shape.batch, shape.seq), device=device)
    models = {setup: build(setup, shape, device) for setup in SETUPS}
    lines = []
    for dtype_name in args.dtypes.split(","):
        amp = DTYPES[dtype_name]
        steps = {setup: make_step(model, ids, amp) for setup, model in models.items()}
        rounds: dict[str, list[float]] = {setup: [] for setup in SETUPS}
        for _ in range(args.rounds):
            for setup in SETUPS:  # interleaved: every setup once per round
                times = _common.time_calls(steps[setup], shape.steps, shape.warmup, sync)
                rounds[setup].append(statistics.median(times))
        floor = statistics.median(rounds["floor"])
        for setup in SETUPS:
            med = statistics.median(rounds[setup])
            spread = f"{min(rounds[setup]):.2f}..{max(rounds[setup]):.2f}"
            peft_setup = VS_PEFT.get(setup)
            vs_peft = f"{med / statistics.median(rounds[peft_setup]):.2f}x" if peft_setup else ""
            lines.append(
                f"| {setup} | {dtype_name} | {med:.2f} | {spread} | {med / floor:.2f}x | {vs_peft} |"
            )
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    config = transformers.BertConfig(**shape.config)
    header = (
        f"# LoRA options: training step (BERT {bert_summary(config, shape)}, q,v)\n\n"
        f"{args.rounds} interleaved rounds x {shape.steps} steps (after {shape.warmup} warm-up) on "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch "
        f"{torch.__version__}, {_common.utc_timestamp()}; median of round medians (spread: min..max).\n\n"
        "| setup | dtype | step ms | spread | vs floor | vs PEFT's same option |\n"
        "|---|---|---|---|---|---|\n"
    )
    text = header + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_report(args.out, text)


if __name__ == "__main__":
    main()
