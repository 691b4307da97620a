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

__all__ = ["describe_setup", "format_bytes", "format_diff", "format_report", "plot_losses", "write_json"]

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


def describe_setup(report: Mapping[str, Any]) -> str:
    """One line: the adapter, its size arguments and the target patterns."""
    config = report["config"]
    if config["adapter"] == "lora":
        adapter = f"LoRA(rank={config['rank']}, alpha={config['alpha']:g})"
    else:
        adapter = f"Houlsby(projection_size={config['rank']})"
    return f"all-MiniLM-L6-v2 + {adapter} on {', '.join(config['targets'])}"


def format_report(report: Mapping[str, Any]) -> str:
    """The printed summary: stages, conversion checks, parameter counts, files and wall times."""
    params = report["parameters"]
    lines = [
        "",
        describe_setup(report),
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
                    str(s["steps"]),
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


def plot_losses(losses: Mapping[str, Sequence[float]], path: str | os.PathLike[str], title: str) -> None:
    """Plot the PyTorch steps, then the Flax steps that continue them, on one step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch_losses, flax_losses = list(losses["torch"]), list(losses["flax"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(range(1, len(torch_losses) + 1), torch_losses, label="PyTorch (torch_impl)", color="tab:red")
    flax_steps = range(len(torch_losses) + 1, len(torch_losses) + len(flax_losses) + 1)
    ax.plot(flax_steps, flax_losses, label="Flax NNX (flax_impl), after conversion", color="tab:blue")
    if torch_losses and flax_losses:
        ax.axvline(len(torch_losses) + 0.5, color="grey", linestyle=":", label="torch -> flax conversion")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (training batch)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
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
