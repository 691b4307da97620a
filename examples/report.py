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

from twinformat.format import atomic_write

__all__ = [
    "describe_setup",
    "format_bytes",
    "format_diff",
    "format_report",
    "plot_report",
    "smoothed",
    "stage_steps",
    "write_json",
]

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


#: How each stage's test point is drawn: (marker, size, filled); stages evaluated on the same
#: weights (converted, merged) are drawn as rings around the point they must sit on.
STAGE_STYLE = {
    "untrained": ("o", 7, True),
    "torch_trained": ("o", 8, True),
    "flax_converted": ("s", 13, False),
    "flax_trained": ("s", 8, True),
    "torch_converted": ("o", 15, False),
    "torch_merged": ("D", 23, False),
}
FRAMEWORK_COLOR = {"torch": "tab:red", "flax": "tab:blue"}


def smoothed(losses: Sequence[float], window: int | None = None) -> list[float]:
    """A centred moving geometric mean of ``losses`` (the plot's y axis is logarithmic, where an
    arithmetic mean would follow the largest batches), the window shrinking at both ends so the
    curve starts and ends on the data.

    >>> [round(v, 3) for v in smoothed([1.0, 4.0, 1.0, 4.0, 1.0], window=3)]
    [2.0, 1.587, 2.52, 1.587, 2.0]
    """
    import math

    n = len(losses)
    if window is None:
        window = max(3, n // 8)
    half = window // 2
    logs = [math.log(max(float(v), 1e-12)) for v in losses]
    out = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        out.append(math.exp(sum(logs[lo:hi]) / (hi - lo)))
    return out


def stage_steps(stages: Sequence[Mapping[str, Any]]) -> list[int]:
    """The training step at which each stage is evaluated: the steps trained so far, so that a
    conversion or a merge sits on the step of the stage it starts from.

    >>> stage_steps([{"steps": 0}, {"steps": 5}, {"steps": 0}, {"steps": 3}, {"steps": 0}])
    [0, 5, 5, 8, 8]
    """
    steps, total = [], 0
    for stage in stages:
        total += int(stage.get("steps") or 0)
        steps.append(total)
    return steps


def plot_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Two panels on one step axis: the training loss (smoothed over the faint per-batch values)
    of the PyTorch stage and the Flax stage that continues it, with the test loss after each
    stage; below, the test accuracy after each stage. Conversions and the merge are evaluated
    on the step of the stage they start from, drawn as rings that must sit on its point; the
    switch between frameworks is a vertical line across both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    torch_losses, flax_losses = list(report["losses"]["torch"]), list(report["losses"]["flax"])
    n_torch, n_flax = len(torch_losses), len(flax_losses)
    last = max(n_torch + n_flax, 1)
    fig, (loss_ax, acc_ax) = plt.subplots(
        2, 1, figsize=(11.5, 6.6), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    # Without AdamW's moments the Flax stage restarts Adam: full-size first steps, a loss bump.
    carried = "adam_step" in report.get("conversions", {}).get("torch_to_flax", {})
    curves = (
        ("torch", range(1, n_torch + 1), torch_losses, "PyTorch (torch_impl)"),
        (
            "flax",
            range(n_torch + 1, n_torch + n_flax + 1),
            flax_losses,
            "Flax NNX (flax_impl),\n" + ("AdamW state carried over" if carried else "fresh AdamW state"),
        ),
    )
    for framework, steps, losses, label in curves:
        if not losses:
            continue
        color = FRAMEWORK_COLOR[framework]
        loss_ax.plot(steps, losses, color=color, alpha=0.22, linewidth=0.9)
        loss_ax.plot(steps, smoothed(losses), color=color, linewidth=2.2, label=f"train loss in {label}")
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("cross-entropy, log scale\n(train: curves, test: markers)")
    loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))

    stages = list(report["stages"])
    positions = stage_steps(stages)
    for ax, field, scale in ((loss_ax, "test_loss", 1.0), (acc_ax, "test_accuracy", 100.0)):
        for stage, step in zip(stages, positions, strict=True):
            value = stage.get(field)
            if value is None:
                continue
            marker, size, filled = STAGE_STYLE.get(stage.get("key", ""), ("o", 8, True))
            color = FRAMEWORK_COLOR.get(stage["framework"], "black")
            ax.plot(
                [step],
                [scale * value],
                marker=marker,
                markersize=size,
                linestyle="none",
                markerfacecolor=color if filled else "none",
                markeredgecolor="black" if filled else color,
                markeredgewidth=1.6 if not filled else 0.8,
                zorder=4 if filled else 5,
            )
    # Every marker inside the panel, with a margin (the log axis would clip the last test point).
    shown = [v for v in (*torch_losses, *flax_losses) if v > 0]
    shown += [s["test_loss"] for s in stages if s.get("test_loss")]
    if shown:
        loss_ax.set_ylim(min(shown) / 1.25, max(shown) * 1.25)
        # within a decade every minor tick gets its number; over several, only 2s and 5s
        narrow = max(shown) / min(shown) < 10
        loss_ax.yaxis.set_minor_formatter(
            FuncFormatter(lambda value, _: f"{value:g}" if narrow or _leading(value) in (2, 5) else "")
        )
    _annotate_accuracy(acc_ax, stages, positions)
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_xlabel("training step")
    low = min((100 * s["test_accuracy"] for s in stages if s.get("test_accuracy") is not None), default=0.0)
    acc_ax.set_ylim(max(0.0, low - 15), 104)

    for ax in (loss_ax, acc_ax):
        ax.axvspan(-0.03 * last, n_torch + 0.5, color=FRAMEWORK_COLOR["torch"], alpha=0.05, linewidth=0)
        ax.axvspan(n_torch + 0.5, last * 1.04, color=FRAMEWORK_COLOR["flax"], alpha=0.05, linewidth=0)
        ax.axvline(n_torch + 0.5, color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    loss_ax.set_xlim(-0.03 * last, last * 1.04)
    loss_ax.annotate(
        "weights (and AdamW state) converted\nPyTorch -> Flax"
        if carried
        else "weights converted\nPyTorch -> Flax",
        (n_torch + 0.5, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, -4),
        textcoords="offset points",
        va="top",
        fontsize=8,
        color="dimgrey",
    )

    for ax, y in ((acc_ax, 0.04),):
        for x, text, framework in ((0.0, "PyTorch", "torch"), (n_torch + 0.5, "Flax NNX", "flax")):
            ax.annotate(
                text,
                (x, y),
                xycoords=("data", "axes fraction"),
                xytext=(6, 0),
                textcoords="offset points",
                fontsize=9,
                fontweight="bold",
                color=FRAMEWORK_COLOR[framework],
            )
    handles, _ = loss_ax.get_legend_handles_labels()
    handles.append(
        Line2D([], [], color="grey", alpha=0.5, linewidth=0.9, label="(faint: loss of each batch)")
    )
    handles += _stage_legend(stages)
    fig.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(0.745, 0.5),
        fontsize=7.5,
        frameon=False,
        title="curves: train loss, smoothed\nmarkers: test set after each stage\n(rings: the same weights, converted or merged)",
        title_fontsize=7.5,
        alignment="left",
    )
    fig.suptitle(describe_setup(report["config"], sep="\non "), fontsize=9, x=0.38)
    fig.tight_layout(rect=(0, 0, 0.745, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _stage_legend(stages: Sequence[Mapping[str, Any]]) -> list[Any]:
    from matplotlib.lines import Line2D

    handles = []
    for stage in stages:
        marker, size, filled = STAGE_STYLE.get(stage.get("key", ""), ("o", 8, True))
        color = FRAMEWORK_COLOR.get(stage["framework"], "black")
        handles.append(
            Line2D(
                [],
                [],
                marker=marker,
                markersize=min(size, 10),
                linestyle="none",
                markerfacecolor=color if filled else "none",
                markeredgecolor="black" if filled else color,
                markeredgewidth=1.6 if not filled else 0.8,
                label=f"test: {stage['stage']} ({stage['framework']})",
            )
        )
    return handles


def _leading(value: float) -> int:
    """The leading digit of a positive number (2 for 0.2 and 20)."""
    import math

    return int(f"{value:e}"[0]) if value > 0 and math.isfinite(value) else 0


#: Short names of the stages for the accuracy labels.
SHORT_NAMES = {
    "untrained": "untrained head",
    "torch_trained": "after PyTorch",
    "flax_converted": "converted to Flax",
    "flax_trained": "after Flax",
    "torch_converted": "back in PyTorch",
    "torch_merged": "merged",
}


def _annotate_accuracy(ax: Any, stages: Sequence[Mapping[str, Any]], positions: Sequence[int]) -> None:
    """One label per step: the accuracy and the stages evaluated there, joined by '=' when they
    agree (an exact conversion or merge), by '/' when they do not."""
    at: dict[int, list[Mapping[str, Any]]] = {}
    for stage, step in zip(stages, positions, strict=True):
        if stage.get("test_accuracy") is not None:
            at.setdefault(step, []).append(stage)
    last = max(at, default=0)
    for step, group in at.items():
        values = [100 * s["test_accuracy"] for s in group]
        names = [SHORT_NAMES.get(s.get("key", ""), s["stage"]) for s in group]
        if max(values) - min(values) < 0.05:
            text = f"{values[0]:.1f}%\n" + "\n= ".join(names)
        else:
            text = "\n".join(f"{v:.1f}% {n}" for v, n in zip(values, names, strict=True))
        right = step == last and step > 0
        ax.annotate(
            text,
            (step, min(values)),
            textcoords="offset points",
            xytext=(-18 if right else 14, 0),
            ha="right" if right else "left",
            va="center",
            fontsize=7.5,
        )


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
