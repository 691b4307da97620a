"""The command line, run as a real subprocess on files the tests write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import converters
import torch_impl
from converters.checkpoint import adapter_metadata
from converters.files import TensorFile, write_safetensors

from .twins import TorchConvNet, randomize_torch, same_bits

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "converters", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
    )


def _bits(path) -> dict[str, np.ndarray]:
    with TensorFile(path) as f:
        return {name: f.get(name) for name in f.names}


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, (
        result.stderr
    )
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    converters.save_torch_layout(randomize_torch(TorchConvNet()).to(torch.bfloat16), path)
    return path


@pytest.mark.parametrize("command", ["", "inspect", "convert", "merge", "peft-import", "peft-export"])
def test_every_subcommand_has_help(command):
    result = run_cli(*([command] if command else []), "--help")
    assert result.returncode == 0 and "usage: python -m converters" in result.stdout


def test_inspect_lists_tensors_dtypes_shapes_metadata_and_total_size(model_file):
    result = run_cli("inspect", model_file)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "layout: torch" in out and "content: base" in out and '"gn": "group_norm"' in out
    assert "conv1.weight" in out and "BF16" in out and "[8, 3, 3]" in out
    assert "bn.num_batches_tracked" in out and "I64" in out
    with TensorFile(model_file) as f:
        assert f"total: {f.total_bytes} B ({f.total_bytes} bytes) in {len(f.names)} tensors" in out


def test_convert_torch_to_flax_and_back_is_bit_exact_and_reports(model_file, tmp_path):
    result = run_cli("convert", model_file, tmp_path / "flax.safetensors")
    assert result.returncode == 0, result.stderr
    assert "flax layout" in result.stdout and "bn.num_batches_tracked" in result.stdout
    assert TensorFile(tmp_path / "flax.safetensors").shape("head.kernel") == (8, 4)
    result = run_cli("convert", tmp_path / "flax.safetensors", tmp_path / "back.safetensors", "--progress")
    # the bar goes to stderr: stdout (perhaps redirected into a file) holds the report only
    assert result.returncode == 0 and "100%" in result.stderr and "100%" not in result.stdout, result
    original = _bits(model_file)
    del original["bn.num_batches_tracked"]
    assert not same_bits(original, _bits(tmp_path / "back.safetensors"))


def test_convert_pickled_checkpoint_with_kinds_and_rename(tmp_path):
    torch.save({"enc.fc.weight": torch.randn(3, 2), "enc.fc.bias": torch.randn(3)}, tmp_path / "sb.ckpt")
    result = run_cli(
        "convert",
        tmp_path / "sb.ckpt",
        tmp_path / "f.safetensors",
        "--to",
        "flax",
        "--kinds",
        '{"enc.fc": "linear"}',
        "--rename",
        "enc.*",
        "encoder.*",
    )
    assert result.returncode == 0, result.stderr
    assert "renamed enc.fc.weight -> encoder.fc.weight" in result.stdout
    assert TensorFile(tmp_path / "f.safetensors").names == ["encoder.fc.kernel", "encoder.fc.bias"]


def test_merge_writes_the_same_file_as_the_python_api(tmp_path):
    base = randomize_torch(TorchConvNet())
    converters.save_torch_layout(base, tmp_path / "base.safetensors")
    adapted = torch_impl.AdaptedModel(
        base, torch_impl.LoRA, target_layers="conv*", adapter_kwargs={"rank": 2}
    )
    randomize_torch(adapted, seed=5)
    adapted.saver(str(tmp_path / "adapter.safetensors"))
    result = run_cli(
        "merge", tmp_path / "base.safetensors", tmp_path / "adapter.safetensors", tmp_path / "cli.safetensors"
    )
    assert result.returncode == 0 and "merged the LoRA update into conv1.weight" in result.stdout, result
    converters.merge_adapter_file(
        tmp_path / "base.safetensors", tmp_path / "adapter.safetensors", tmp_path / "api.safetensors"
    )
    assert not same_bits(_bits(tmp_path / "cli.safetensors"), _bits(tmp_path / "api.safetensors"))


def _write_peft_dir(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    tensors = {
        "base_model.model.head.lora_A.weight": rng.standard_normal((2, 8), dtype=np.float32),
        "base_model.model.head.lora_B.weight": rng.standard_normal((4, 2), dtype=np.float32),
    }
    write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["head"], "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def test_peft_import_then_export_round_trips_the_factors(tmp_path):
    tensors = _write_peft_dir(tmp_path / "peft")
    result = run_cli("peft-import", tmp_path / "peft", tmp_path / "ours.safetensors")
    assert result.returncode == 0, result.stderr
    ours = _bits(tmp_path / "ours.safetensors")
    np.testing.assert_array_equal(
        ours["adapted_model.head.adapter_down_proj.weight"], tensors["base_model.model.head.lora_A.weight"]
    )
    result = run_cli(
        "peft-export", tmp_path / "ours.safetensors", tmp_path / "out", "--base-model", "convnet"
    )
    assert result.returncode == 0 and "r=2, lora_alpha=4.0" in result.stdout, result
    assert not same_bits(_bits(tmp_path / "out" / "adapter_model.safetensors"), tensors)
    assert (
        json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "convnet"
    )


def test_bad_inputs_exit_non_zero_with_one_line_and_leave_no_output(tmp_path, model_file):
    _one_line_error(run_cli("inspect", tmp_path / "missing.safetensors"), "missing.safetensors", "not found")

    (tmp_path / "notes.safetensors").write_text("not a checkpoint")
    _one_line_error(
        run_cli("convert", tmp_path / "notes.safetensors", tmp_path / "o.safetensors"), "notes.safetensors"
    )

    write_safetensors(tmp_path / "foreign.safetensors", {"fc.weight": np.ones((3, 3), np.float32)})
    _one_line_error(run_cli("convert", tmp_path / "foreign.safetensors", tmp_path / "o.safetensors"), "'fc'")

    meta = adapter_metadata(framework="torch", adapter_class="HoulsbyAdapterLinear")
    write_safetensors(
        tmp_path / "houlsby.safetensors",
        {"adapted_model.head.adapter_down_proj.weight": np.ones((2, 4), np.float32)},
        meta,
    )
    _one_line_error(
        run_cli("merge", model_file, tmp_path / "houlsby.safetensors", tmp_path / "o.safetensors"), "Houlsby"
    )

    _write_peft_dir(tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    _one_line_error(run_cli("peft-import", tmp_path / "dora", tmp_path / "o.safetensors"), "DoRA")
    _one_line_error(run_cli("peft-export", tmp_path / "houlsby.safetensors", tmp_path / "odir"), "LoRA")

    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "odir").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert run_cli("convert").returncode == 2  # argparse usage error


def test_file_level_commands_import_neither_torch_nor_jax(tmp_path):
    write_safetensors(tmp_path / "t.safetensors", {"fc.weight": np.ones((3, 2), np.float32)})
    code = (
        "import sys, converters, converters.cli, converters.peft, converters.merge\n"
        f"converters.convert_file({str(tmp_path / 't.safetensors')!r}, {str(tmp_path / 'f.safetensors')!r}, "
        "layer_kinds={'fc': 'linear'})\n"
        "assert 'torch' not in sys.modules and 'jax' not in sys.modules, sorted(m for m in sys.modules if m in ('torch', 'jax'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
