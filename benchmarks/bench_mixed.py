"""Several adapters in one batch (issue 23): the forward of a batch whose samples use 4 different
LoRA adapters against the same model with one adapter, in both frameworks, with PEFT's
``adapter_names`` path in the same run for reference.

Model: BERT-base (``transformers.BertModel(BertConfig())`` and its Flax twin, random init),
batch 32 x 128 tokens, LoRA rank 16 (alpha 16) on query and value, every factor random (no zero up
factor), inference (eval, no gradient), bf16 compute with float32 parameters (torch autocast;
Flax ``dtype=bfloat16``). The mixed batch gives samples ``i`` the adapter ``i mod 4``.

Rows (each timed once per round, ``--rounds`` interleaved rounds, the median of ``--steps``
synchronised calls per round; spread = (max - min) / median over rounds):

- ``torch base / one / mixed (graph)``: the base model, ``torch_impl.AdaptedModel`` with one
  adapter, and with 4 adapters given ``adapter_mask=model.adapter_mask(names)``, each forward
  captured once in a CUDA graph (the mask is a tensor the graph reads: any mix replays it);
- ``torch one / mixed (eager)``: the same without a graph (``adapter_names=`` for the mix);
- ``peft one / mixed (eager)``: PEFT's ``LoraModel`` with one active adapter, and its
  ``adapter_names=`` mixed batch (a gather per adapter: it cannot be captured);
- ``flax base / one / mixed (jit)``: the Flax twin under ``jax.jit`` over split state, the mix
  passed as data (``adapter_mask``), so one compiled function serves any mix.

Usage::

    python benchmarks/bench_mixed.py --out benchmarks/results/mixed_gpu.md   # GPU
    python benchmarks/bench_mixed.py --quick                                  # tiny, CPU, seconds
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import BERT_CPU_SHAPE, BERT_TARGETS, fmt, interleaved, utc_timestamp, write_report  # noqa: E402
from examples.pretrained import hide_broken_torchaudio  # noqa: E402

hide_broken_torchaudio()

NAMES = ["default", "b", "c", "d"]
RANK = 16
LIMIT = 1.15  # issue 23: a mixed batch of 4 adapters at most this x one adapter's forward


def _mix(batch: int) -> list[str]:
    return [NAMES[i % len(NAMES)] for i in range(batch)]


def torch_cases(
    config: dict, batch: int, seq: int, modes: str = "graph,eager"
) -> dict[str, Callable[[], Any]]:
    """The torch rows of ``modes`` (``graph``: CUDA graphs, GPU only; ``eager``: ours and PEFT)."""
    import peft
    import torch
    import transformers

    from torch_impl import AdaptedModel, LoRA

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig(**config)).to(device).eval()
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=device)
    # Given, so that BERT's embeddings do not gather them from a buffer inside the graphs.
    token_types = torch.zeros_like(ids)
    targets = BERT_TARGETS["q,v"]

    def randomize(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adapter_" in name or "lora_" in name:
                    p.normal_(0.0, 0.02)

    kwargs = {"rank": RANK, "alpha": RANK}
    one = AdaptedModel(copy.deepcopy(base), LoRA, target_layers=targets, adapter_kwargs=kwargs)
    many = AdaptedModel(copy.deepcopy(base), LoRA, target_layers=targets, adapter_kwargs=kwargs)
    for name in NAMES[1:]:
        many.add_adapter(name, LoRA, targets, adapter_kwargs={"rank": RANK, "alpha": RANK})
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["query", "value"])
    )
    for name in NAMES[1:]:
        theirs.add_adapter(name, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["query", "value"]))
    for model in (one, many, theirs):
        randomize(model)
        model.eval()
    names = _mix(batch)
    mask = many.adapter_mask(names)

    def forward(model: Any, **kwargs: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return model(input_ids=ids, token_type_ids=token_types, **kwargs).last_hidden_state

        return run

    def synced(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            fn()
            if cuda:
                torch.cuda.synchronize()

        return run

    # The mixed forward must equal each sample's adapter alone (checked here, not only in tests).
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float32, enabled=False):
        mixed = many(
            input_ids=ids[:4], token_type_ids=token_types[:4], adapter_names=names[:4]
        ).last_hidden_state
        for i, name in enumerate(names[:4]):
            many.set_adapter(name)
            alone = many(input_ids=ids[i : i + 1], token_type_ids=token_types[i : i + 1]).last_hidden_state
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-4, atol=1e-4)
        many.set_adapter("default")

    cases: dict[str, Callable[[], Any]] = {}
    if cuda and "graph" in modes:
        from benchmarks.bench_train import capture_graph

        for label, fn in (
            ("torch base (graph)", forward(base)),
            ("torch one (graph)", forward(one)),
            ("torch mixed (graph)", forward(many, adapter_mask=mask)),
        ):
            graph = capture_graph(fn, lambda: None)
            cases[label] = synced(graph.replay)
    if "eager" in modes:
        cases["torch one (eager)"] = synced(forward(one))
        cases["torch mixed (eager)"] = synced(forward(many, adapter_names=names))
        theirs.base_model.set_adapter("default")
        cases["peft one (eager)"] = synced(forward(theirs))
        cases["peft mixed (eager)"] = synced(forward(theirs, adapter_names=names))
    for fn in cases.values():  # warm up (autotuning, caches) before the rounds
        fn()
    return cases


def flax_cases(config: dict, batch: int, seq: int) -> dict[str, Callable[[], Any]]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_impl import AdaptedModel, LoRA
    from flax_impl.models.bert import BertConfig, BertModel

    targets = BERT_TARGETS["q,v"]

    def model() -> Any:
        bert = BertModel(BertConfig(**config), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        bert.eval()
        return bert

    def adapted(n: int) -> Any:
        ours = AdaptedModel(
            model(),
            LoRA,
            target_layers=targets,
            adapter_kwargs={"rank": RANK, "alpha": RANK},
            rngs=nnx.Rngs(1),
        )
        for i, name in enumerate(NAMES[1:n]):
            ours.add_adapter(
                name, LoRA, targets, adapter_kwargs={"rank": RANK, "alpha": RANK}, rngs=nnx.Rngs(2 + i)
            )
        params = nnx.state(ours, nnx.Param)
        keys = iter(jax.random.split(jax.random.key(7), 4096))
        for path, variable in nnx.to_flat_state(params):
            if any("adapter_" in str(part) for part in path):
                value = variable.get_value()
                variable.set_value(0.02 * jax.random.normal(next(keys), value.shape, value.dtype))
        nnx.update(ours, params)
        ours.eval()
        return ours

    ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, BertConfig(**config).vocab_size)
    cases: dict[str, Callable[[], Any]] = {}

    def jitted(module: Any, mixed: Any = None) -> Callable[[], None]:
        graphdef, state = nnx.split(module)

        @jax.jit
        def forward(state: Any, ids: jax.Array, mask: Any) -> jax.Array:
            m = nnx.merge(graphdef, state)
            out = m(ids) if mask is None else m(ids, adapter_mask=mask)
            return out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)

        def run() -> None:
            jax.block_until_ready(forward(state, ids, mixed))

        run()  # compiles
        return run

    cases["flax base (jit)"] = jitted(model())
    cases["flax one (jit)"] = jitted(adapted(1))
    many = adapted(len(NAMES))
    cases["flax mixed (jit)"] = jitted(many, many.adapter_mask(_mix(batch)))
    # The same 4 adapters held, one active for the whole batch (set_adapter: the active set is
    # data, so every held adapter's factors are in the program; one concatenated GEMM pair).
    held = adapted(len(NAMES))
    held.set_adapter(NAMES[1])
    cases["flax 4 held, 1 active (jit)"] = jitted(held)
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small BERT on CPU, to check the script")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-flax", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-modes", default="graph,eager", help="graph, eager or both (one process)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (a median and a spread need them)")
    if not args.no_torch and not args.no_flax:
        # One process per framework and per torch mode: the ratios compare within a framework
        # and mode. A process replaying torch's CUDA graphs between eager forwards of the same
        # models hit a device-side index assert in BERT's embedding gather in its second round
        # (one H200 2026-12-06, after JAX's programs; one H100 2026-12-07, torch alone; not
        # understood: the graphs' inputs and models are persistent tensors).
        import subprocess
        import tempfile

        texts = []
        for flags in (
            ["--no-flax", "--torch-modes", "graph"],
            ["--no-flax", "--torch-modes", "eager"],
            ["--no-torch"],
        ):
            with tempfile.TemporaryDirectory() as folder:
                part = Path(folder) / "part.md"
                command = [
                    sys.executable,
                    __file__,
                    *flags,
                    "--rounds",
                    str(args.rounds),
                    "--steps",
                    str(args.steps),
                ]
                done = subprocess.run(command + ["--out", str(part)] + (["--quick"] if args.quick else []))
                texts.append(
                    part.read_text()
                    if done.returncode == 0
                    else f"{' '.join(flags)}: failed ({done.returncode})\n"
                )
        text = "\n".join(texts)
        print(text)
        if args.out:
            write_report(args.out, text)
        return
    config, batch, seq = ({}, 32, 128)
    if args.quick:
        config, batch, seq = dict(BERT_CPU_SHAPE.config), 8, 32
    cases: dict[str, Callable[[], Any]] = {}
    if not args.no_torch:
        cases.update(torch_cases(config, batch, seq, args.torch_modes))
    if not args.no_flax:
        cases.update(flax_cases(config, batch, seq))
    timings = interleaved(
        cases, args.rounds, args.steps, log=lambda line: print(line, file=sys.stderr, flush=True)
    )

    if args.no_flax:
        import torch

        versions = f"torch {torch.__version__} on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
    else:
        import jax

        versions = f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
    lines = [
        f"## Several adapters in one batch ({'PyTorch' if args.no_flax else 'Flax'}): 4 LoRA adapters (r=16, q,v) "
        "mixed per sample vs one adapter",
        "",
        f"{utc_timestamp()}; {versions}; BERT{' (quick: small config)' if args.quick else '-base'}, batch "
        f"{batch} x {seq} tokens, bf16 inference; {args.rounds} interleaved rounds of {args.steps} calls, "
        "median of the round medians, spread (max - min) / median.",
        "",
        "| case | ms / forward | spread | x one adapter (same framework, mode) | x base |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, timing in timings.items():
        framework, mode = name.split(" ", 1)[0], name.rsplit(" ", 1)[1]
        one = timings.get(f"{framework} one {mode}")
        base = timings.get(f"{framework} base {mode}")
        lines.append(
            f"| {name} | {timing.median:.3f} | {timing.spread:.1%} | "
            f"{fmt(timing.median / one.median if one else None, '.3f')} | "
            f"{fmt(timing.median / base.median if base else None, '.3f')} |"
        )
    verdicts = []
    for framework, mode in (
        ("torch", "(graph)"),
        ("flax", "(jit)"),
        ("torch", "(eager)"),
        ("peft", "(eager)"),
    ):
        one, mixed = timings.get(f"{framework} one {mode}"), timings.get(f"{framework} mixed {mode}")
        if one and mixed:
            ratio = mixed.median / one.median
            met = "met" if ratio <= LIMIT else "missed"
            target = f"target <= {LIMIT}: {met}" if framework != "peft" and mode != "(eager)" else "reference"
            target = "quick run: no verdict" if args.quick else target
            verdicts.append(f"- {framework} {mode}: mixed / one = {ratio:.3f} ({target})")
    lines += ["", *verdicts, ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_report(args.out, text)


if __name__ == "__main__":
    main()
