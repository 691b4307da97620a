"""The round-trip job's report: a printed table, ``report.json`` and a plot of both loss curves.

Example
-------
>>> format_bytes(295_312), format_bytes(90_868_376)
('288.4 KiB', '86.7 MiB')
>>> format_diff(None), format_diff(3.1e-06)
('skipped', '3.10e-06')
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.checkpoint import atomic_write

__all__ = ["describe_setup", "format_bytes", "format_diff", "format_report", "plot_report", "write_json"]

DIFF_LABELS = {
    "torch_to_flax_embeddings": "PyTorch -> Flax",
    "flax_to_torch_embeddings": "Flax -> PyTorch",
    "peft_vs_ours_embeddings": "PEFT adapter (peft.PeftModel) vs ours",
    "merged_vs_unmerged_embeddings": "LoRA merged vs unmerged",
}


def format_bytes(size: int) -> str:
    """``size`` in B, KiB or MiB, one decimal."""
    if size < 1024:
        return f"{size} B"
    if size < 1024**2:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 1024**2:.1f} MiB"


def format_diff(diff: float | None) -> str:
    """A max-abs-diff in scientific notation, or ``skipped`` where the check does not apply."""
    return "skipped" if diff is None else f"{diff:.2e}"


def describe_setup(config: Mapping[str, Any], sep: str = " on ") -> str:
    """The adapter, its size arguments and the target patterns, from the job's ``config``."""
    if config["adapter"] == "lora":
        adapter = f"LoRA(rank={config['rank']}, alpha={config['alpha']:g})"
    else:
        adapter = f"Houlsby(projection_size={config['rank']})"
    return f"all-MiniLM-L6-v2 + {adapter}{sep}{', '.join(config['targets'])}"


def format_report(report: Mapping[str, Any]) -> str:
    """The printed summary: stages, conversion checks, parameter counts, files and wall times."""
    params = report["parameters"]
    lines = [
        "",
        describe_setup(report["config"]),
        f"parameters: {params['total']:,} total, {params['trainable']:,} trainable "
        f"({100 * params['trainable'] / params['total']:.2f}%: adapters {params['adapters']:,}, "
        f"head {params['head']:,})",
        "",
        _table(
            ["stage", "framework", "steps", "train loss first -> last", "test loss", "test acc"],
            [
                [
                    s["stage"],
                    s["framework"],
                    str(s["steps"]) if s["steps"] else "-",
                    "-"
                    if s["train_loss_first"] is None
                    else f"{s['train_loss_first']:.3f} -> {s['train_loss_last']:.3f}",
                    f"{s['test_loss']:.3f}",
                    f"{100 * s['test_accuracy']:.1f}%",
                ]
                for s in report["stages"]
            ],
            align="llrrrr",
        ),
        "",
        "checks: max abs diff of the 80 test-set embeddings",
        _table(
            ["", ""],
            [[DIFF_LABELS.get(k, k), format_diff(v)] for k, v in report["diffs"].items()],
            "lr",
            show_header=False,
        ),
        "",
        f"files in {report['out']} (base model.safetensors: {format_bytes(report['base_model_bytes'])})",
        _table(
            ["", ""],
            [[name, format_bytes(size)] for name, size in report["files"].items()],
            "lr",
            show_header=False,
        ),
        "",
        "wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()),
    ]
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def plot_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Plot the PyTorch training losses, then the Flax ones that continue them, on one step
    axis, with the test accuracy after each training stage on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch_losses, flax_losses = list(report["losses"]["torch"]), list(report["losses"]["flax"])
    n_torch, n_flax = len(torch_losses), len(flax_losses)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    ax.plot(range(1, n_torch + 1), torch_losses, label="PyTorch (torch_impl)", color="tab:red")
    # Without AdamW's moments the Flax stage restarts Adam: full-size first steps, a loss bump.
    carried = "adam_step" in report.get("conversions", {}).get("torch_to_flax", {})
    flax_label = "Flax NNX (flax_impl), " + ("AdamW state carried over" if carried else "fresh AdamW state")
    flax_steps = range(n_torch + 1, n_torch + n_flax + 1)
    ax.plot(flax_steps, flax_losses, label=flax_label, color="tab:blue")
    ax.axvline(n_torch + 0.5, color="grey", linestyle=":", label="converted PyTorch -> Flax")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy of the training batch (log scale)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)

    accuracy = report["accuracy"]
    points = [(0, accuracy.get("untrained")), (n_torch, accuracy.get("torch_trained"))]
    points.append((n_torch + n_flax, accuracy.get("flax_trained")))
    acc_ax = ax.twinx()
    steps, values = zip(*[(step, 100 * value) for step, value in points if value is not None], strict=True)
    acc_ax.plot(steps, values, "kD--", linewidth=0.8, markersize=5, label="test accuracy")
    for step, value in zip(steps, values, strict=True):
        acc_ax.annotate(
            f"{value:.1f}%", (step, value), textcoords="offset points", xytext=(0, 7), ha="center"
        )
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_ylim(0, 105)

    handles, labels = ax.get_legend_handles_labels()
    acc_handles, acc_labels = acc_ax.get_legend_handles_labels()
    ax.legend(handles + acc_handles, labels + acc_labels, loc="lower left", fontsize=8)
    ax.set_title(describe_setup(report["config"], sep="\non "), fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def write_json(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``report`` as indented JSON, atomically."""
    text = json.dumps(report, indent=2, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def _table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], align: str, show_header: bool = True
) -> str:
    """Plain-text columns, left- or right-aligned per ``align`` (one ``l``/``r`` per column)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return (
            "  "
            + "  ".join(
                str(c).ljust(w) if a == "l" else str(c).rjust(w)
                for c, w, a in zip(cells, widths, align, strict=True)
            ).rstrip()
        )

    return "\n".join(([line(columns)] if show_header else []) + [line(row) for row in rows])
