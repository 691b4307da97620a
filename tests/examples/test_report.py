"""The job's printed report and plot, its Houlsby settings, and the doctests of ``examples``."""

from __future__ import annotations

import doctest

import pytest

from examples import finetune_roundtrip, report, reviews


def houlsby_report(tmp_path) -> dict:
    """A report as a Houlsby run writes it: no PEFT export, no merge, two notes."""
    args = finetune_roundtrip.parse_args(["--adapter", "houlsby", "--rank", "6", "--out", str(tmp_path)])
    stage = {
        "stage": "after PyTorch fine-tuning",
        "framework": "torch",
        "steps": 3,
        "train_loss_first": 0.7,
        "train_loss_last": 0.5,
        "test_loss": 0.45,
        "test_accuracy": 0.8125,
        "key": "torch_trained",
    }
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "out": str(tmp_path),
        "parameters": {"total": 1000, "trainable": 10, "adapters": 6, "head": 4},
        "stages": [stage],
        "accuracy": {"torch_trained": 0.8125},
        "losses": {"torch": [0.7, 0.6, 0.5], "flax": [0.5, 0.4]},
        "diffs": {"torch_to_flax_embeddings": 1.5e-6, "peft_vs_ours_embeddings": None},
        "conversions": {},
        "files": {"adapter.safetensors": 2048},
        "base_model_bytes": 90_000_000,
        "notes": ["no merge: Houlsby cannot be merged"],
        "seconds": {"load": 1.0, "total": 2.0},
    }


def test_houlsby_uses_rank_as_projection_size_in_both_frameworks():
    import flax_impl
    import torch_impl

    args = finetune_roundtrip.parse_args(["--adapter", "houlsby", "--rank", "6"])
    assert finetune_roundtrip.adapter_classes(args) == (
        torch_impl.HoulsbyAdapterLinear,
        flax_impl.HoulsbyAdapterLinear,
        {"projection_size": 6},
    )


def test_printed_report_shows_skipped_checks_notes_and_sizes(tmp_path):
    text = report.format_report(houlsby_report(tmp_path))
    assert "Houlsby(projection_size=6)" in text
    assert "81.2%" in text and "0.700 -> 0.500" in text
    assert "PEFT adapter (peft.PeftModel) vs ours   skipped" in text
    assert "1.50e-06" in text and "2.0 KiB" in text and "85.8 MiB" in text
    assert text.rstrip().endswith("note: no merge: Houlsby cannot be merged")


def test_plot_is_written_as_png_even_when_a_stage_has_no_accuracy(tmp_path):
    path = tmp_path / "plot.png"
    report.plot_report(houlsby_report(tmp_path), path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_smoothing_follows_the_log_scale_and_keeps_the_ends_on_the_data():
    losses = [0.6, 0.005, 0.6, 0.005, 0.6, 0.005]
    smooth = report.smoothed(losses, window=3)

    assert len(smooth) == len(losses)
    # a geometric mean: the big batches do not dominate the curve on a log axis
    assert max(smooth) < 0.2 and min(smooth) > 0.01
    assert report.smoothed([0.3]) == pytest.approx([0.3])


@pytest.mark.parametrize("module", [report, reviews], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
