"""The main job, end to end: ``python -m examples.finetune_roundtrip`` with a tiny step count.

One run in a subprocess (as a user runs it) feeds most assertions, shared by all pytest-xdist
workers of the session; a second run with the same seed checks that the report reproduces.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
RANK = 4
TINY = ["--torch-steps", "8", "--flax-steps", "8", "--rank", str(RANK), "--lr", "5e-3", "--seed", "3"]
#: What differs between two runs of the same job: where it wrote and how long it took.
VOLATILE_KEYS = ("out", "seconds")


def without_volatile(report: dict) -> dict:
    return {key: value for key, value in report.items() if key not in VOLATILE_KEYS}


def run_job(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if os.environ.get("PYTEST_XDIST_WORKER"):  # as tests/conftest.py: one thread per worker
        env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "examples.finetune_roundtrip", *TINY, *extra, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> tuple[Path, dict, str]:
    """``(out folder, report, stdout)`` of one tiny job. Under xdist, whichever worker asks
    first runs it, under a lock in the session's shared temporary folder; the others reuse it."""
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent
    out, stdout = shared / "examples-roundtrip", shared / "examples-roundtrip.stdout"
    with open(shared / "examples-roundtrip.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "report.json").is_file():
            result = run_job(out)
            assert result.returncode == 0, f"job failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
            stdout.write_text(result.stdout)
    return out, json.loads((out / "report.json").read_text()), stdout.read_text()


def test_fine_tuning_improves_test_accuracy_over_the_untrained_head(tiny_run):
    _, report, _ = tiny_run
    accuracy = report["accuracy"]
    assert accuracy["flax_trained"] > accuracy["untrained"], accuracy
    assert report["stages"][1]["train_loss_last"] < report["stages"][1]["train_loss_first"]


def test_both_conversions_keep_the_embeddings_and_the_accuracy(tiny_run):
    _, report, stdout = tiny_run
    diffs, accuracy = report["diffs"], report["accuracy"]
    assert diffs["torch_to_flax_embeddings"] < 1e-4
    assert diffs["flax_to_torch_embeddings"] < 1e-4
    assert accuracy["flax_converted"] == accuracy["torch_trained"]
    assert accuracy["torch_converted"] == accuracy["flax_trained"]
    assert "max abs diff of test embeddings" in stdout
    assert report["conversions"]["torch_to_flax"]["adam_step"] == 8  # Flax continues AdamW at step 8


def test_merged_lora_computes_what_the_unmerged_model_computes(tiny_run):
    _, report, _ = tiny_run
    assert report["diffs"]["merged_vs_unmerged_embeddings"] < 1e-4
    assert report["accuracy"]["torch_merged"] == report["accuracy"]["torch_converted"]


def test_peft_export_loads_in_peft_and_computes_the_same_embeddings(tiny_run):
    out, report, _ = tiny_run
    assert report["diffs"]["peft_vs_ours_embeddings"] < 1e-4
    config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK


def test_the_plot_puts_each_stage_on_its_step_and_the_exact_ones_on_the_flax_point(tiny_run):
    from examples.report import stage_steps

    out, report, _ = tiny_run
    stages = {
        s["key"]: (step, s) for s, step in zip(report["stages"], stage_steps(report["stages"]), strict=True)
    }
    flax_step, flax = stages["flax_trained"]

    assert flax_step == len(report["losses"]["torch"]) + len(report["losses"]["flax"])
    assert stages["flax_converted"][0] == stages["torch_trained"][0] == len(report["losses"]["torch"])
    for key in ("torch_converted", "torch_merged"):
        step, stage = stages[key]
        assert step == flax_step
        assert stage["test_accuracy"] == flax["test_accuracy"]
        assert abs(stage["test_loss"] - flax["test_loss"]) < 1e-5
    assert (out / "loss_curves.png").read_bytes().startswith(b"\x89PNG")


def test_parameter_counts_are_the_adapters_and_the_head(tiny_run):
    _, report, _ = tiny_run
    hidden, layers, targets, labels = 384, 6, 2, 2
    adapters = layers * targets * RANK * (hidden + hidden)  # down (rank, in) + up (out, rank)
    params = report["parameters"]
    assert params["adapters"] == adapters
    assert params["head"] == hidden * labels + labels
    assert params["trainable"] == adapters + params["head"]
    assert 22_000_000 < params["total"] < 23_000_000  # all-MiniLM-L6-v2 has 22.7 M parameters


def test_output_files_exist_with_the_reported_sizes(tiny_run):
    out, report, _ = tiny_run
    for name, size in report["files"].items():
        assert (out / name).stat().st_size == size, name
    assert report["files"]["adapter.safetensors"] < report["base_model_bytes"] / 50
    png = (out / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert len(report["losses"]["torch"]) == 8 and len(report["losses"]["flax"]) == 8


def test_adapter_checkpoint_loads_into_a_fresh_torch_model_and_reproduces_the_accuracy(tiny_run):
    import torch
    from safetensors.torch import load_file

    from examples import finetune_roundtrip as job
    from examples.pretrained import load_minilm
    from examples.reviews import load_reviews

    out, report, _ = tiny_run
    tokenizer, bert = load_minilm()
    _, test = load_reviews(tokenizer)
    encoder, head = job.build_torch_model(bert, job.parse_args([*TINY, "--out", str(out)]))
    encoder.loader(str(out / "adapter.safetensors"))
    head.load_state_dict(load_file(str(out / "head.safetensors")))
    evaluation = job.evaluate_torch(encoder, head, test)
    assert evaluation.accuracy == report["accuracy"]["torch_converted"]
    assert abs(evaluation.loss - report["stages"][4]["test_loss"]) < 1e-5
    assert any(torch.count_nonzero(p) for n, p in encoder.named_parameters() if "adapter_up_proj" in n)


def test_same_seed_gives_the_same_report(tiny_run, tmp_path):
    _, first, _ = tiny_run
    result = run_job(tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    second = json.loads((tmp_path / "report.json").read_text())
    assert without_volatile(first) == without_volatile(second)


def test_help_lists_every_flag():
    result = subprocess.run(
        [sys.executable, "-m", "examples.finetune_roundtrip", "--help"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for flag in (
        "--targets",
        "--rank",
        "--alpha",
        "--adapter",
        "--torch-steps",
        "--flax-steps",
        "--lr",
        "--batch-size",
        "--seed",
        "--out",
    ):
        assert flag in result.stdout, flag


@pytest.mark.parametrize(
    "argv", [["--rank", "0"], ["--batch-size", "0"], ["--lr", "0"], ["--adapter", "dora"]]
)
def test_bad_flag_values_are_refused_before_anything_loads(argv, capsys):
    from examples.finetune_roundtrip import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.fixture
def torch_global_flags():
    """``main`` switches torch to deterministic algorithms for the whole process: restore it."""
    import torch

    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("encoder.layer.*.attention.self.qkv", "'encoder.layer.*.attention.self.qkv' matches no layer"),
        ("encoder.layer.*.attention.self.*", "cannot wrap layer 'encoder.layer.0.attention.self.dropout'"),
    ],
)
def test_bad_target_patterns_end_with_a_one_line_error_naming_them(
    pattern, expected, tmp_path, capsys, torch_global_flags
):
    from examples.finetune_roundtrip import main

    argv = ["--targets", pattern, "--torch-steps", "0", "--flax-steps", "0", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --targets") and "\n" not in err
    assert expected in err


def test_batch_schedule_visits_every_example_once_per_epoch_in_a_seeded_order():
    from examples.reviews import batch_schedule

    schedule = batch_schedule(num_examples=240, batch_size=16, steps=30, seed=5)
    assert schedule.shape == (30, 16)
    assert sorted(schedule[:15].ravel().tolist()) == list(range(240))  # 15 batches = one epoch
    assert np.array_equal(schedule, batch_schedule(240, 16, 30, seed=5))
    assert not np.array_equal(schedule, batch_schedule(240, 16, 30, seed=6))


def test_shipped_data_has_a_balanced_fixed_split_without_shared_sentences():
    from examples.reviews import DATA_DIR, read_jsonl

    train, test = read_jsonl(DATA_DIR / "train.jsonl"), read_jsonl(DATA_DIR / "test.jsonl")
    assert (len(train), len(test)) == (240, 80)
    for rows in (train, test):
        assert sum(row["label"] == "positive" for row in rows) == len(rows) // 2
    assert not {row["text"] for row in train} & {row["text"] for row in test}


def test_a_malformed_data_line_is_reported_with_its_file_and_line(tmp_path):
    from examples.reviews import read_jsonl

    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "positive"}\n{"text": "odd", "label": "neutral"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl' line 2: expected"):
        read_jsonl(path)
