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
from converters.files import TensorFile, write_safetensors
from tests.zoo import torch_models
from tests.zoo.arrays import randomize_torch, same_bits
from twinformat.format import adapter_metadata

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


def run_main(*args) -> subprocess.CompletedProcess:
    """The same command line in this process (no interpreter start-up: torch alone takes seconds)."""
    import contextlib
    import io

    from converters.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


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
    converters.save_torch_layout(randomize_torch(torch_models.Conv1dNormNet()).to(torch.bfloat16), path)
    return path


@pytest.mark.parametrize(
    "command", ["", "inspect", "convert", "kinds", "merge", "peft-import", "peft-export"]
)
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
    base = randomize_torch(torch_models.Conv1dNormNet())
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


# ----------------------------------------------------------------------------- sharded checkpoints
def test_inspect_reads_a_sharded_folder_and_its_index(tmp_path, model_file):
    from converters import convert_sharded
    from converters.files import INDEX_NAME, ShardedCheckpoint

    convert_sharded(model_file, tmp_path / "shards", layout="torch", max_shard_bytes=200)
    files = len(ShardedCheckpoint(tmp_path / "shards").files)
    assert files > 1
    for source in (tmp_path / "shards", tmp_path / "shards" / INDEX_NAME):
        result = run_main("inspect", source)
        assert result.returncode == 0, result.stderr
        assert f"(sharded, {files} file(s))" in result.stdout and "conv1.weight" in result.stdout
        with TensorFile(model_file) as f:
            assert (
                f"total: {f.total_bytes} B ({f.total_bytes} bytes) in {len(f.names)} tensors" in result.stdout
            )


def test_convert_between_one_file_and_a_sharded_folder_is_bit_exact(tmp_path, model_file):
    from converters.files import INDEX_NAME, ShardedCheckpoint

    result = run_main("convert", model_file, tmp_path / "flax", "--max-shard-size", "300B")
    assert result.returncode == 0, result.stderr
    assert "flax layout, sharded" in result.stdout and "bn.num_batches_tracked" in result.stdout
    flax = ShardedCheckpoint(tmp_path / "flax")
    assert flax.layout == "flax" and len(flax.files) > 1 and flax.shape("head.kernel") == (8, 4)
    # folder -> one file, index -> a folder given with a trailing slash (default shard size)
    assert run_main("convert", tmp_path / "flax", tmp_path / "back.safetensors").returncode == 0
    result = run_main("convert", tmp_path / "flax" / INDEX_NAME, f"{tmp_path / 'back'}/", "--to", "torch")
    assert result.returncode == 0 and "sharded: 1 file(s)" in result.stdout, result
    original = _bits(model_file)
    del original["bn.num_batches_tracked"]
    assert not same_bits(original, _bits(tmp_path / "back.safetensors"))
    assert not same_bits(original, _bits(tmp_path / "back"))
    _one_line_error(
        run_main("convert", model_file, tmp_path / "x.safetensors", "--max-shard-size", "1GB"), "folder"
    )
    _one_line_error(run_main("convert", model_file, tmp_path / "y", "--max-shard-size", "lots"), "not a size")


def test_merge_accepts_a_sharded_base_and_writes_what_a_single_file_gives(tmp_path):
    from converters import save_sharded

    base = randomize_torch(torch_models.Conv1dNormNet())
    converters.save_torch_layout(base, tmp_path / "base.safetensors")
    save_sharded(base, tmp_path / "base", max_shard_bytes=256)
    adapted = torch_impl.AdaptedModel(
        base, torch_impl.LoRA, target_layers="conv*", adapter_kwargs={"rank": 2}
    )
    randomize_torch(adapted, seed=5)
    adapted.saver(str(tmp_path / "adapter.safetensors"))
    for base_path, out in (
        (tmp_path / "base", "sharded.safetensors"),
        (tmp_path / "base.safetensors", "one.safetensors"),
    ):
        result = run_main("merge", base_path, tmp_path / "adapter.safetensors", tmp_path / out)
        assert result.returncode == 0, result.stderr
    assert not same_bits(_bits(tmp_path / "sharded.safetensors"), _bits(tmp_path / "one.safetensors"))


# ----------------------------------------------------------------------------- manners (issue 14 item 10)
def test_output_piped_into_head_ends_quietly(tmp_path):
    many = {f"layer{i:04d}.weight": np.zeros(1, np.float32) for i in range(4000)}  # > a pipe's buffer
    write_safetensors(tmp_path / "many.safetensors", many)
    process = subprocess.Popen(
        [sys.executable, "-m", "converters", "inspect", str(tmp_path / "many.safetensors")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout.readline().startswith(b"file: ")  # what `head -1` reads, then it exits
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait() == 0 and stderr == "", stderr


def test_an_unknown_dtype_names_the_file_and_the_tensor(tmp_path):
    header = json.dumps({"enc.fc.weight": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    (tmp_path / "odd.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    for command in ("inspect", "convert"):
        args = [command, tmp_path / "odd.safetensors"] + (
            [tmp_path / "o.safetensors"] if command == "convert" else []
        )
        _one_line_error(run_main(*args), "odd.safetensors", "'enc.fc.weight'", "'F4'")


def test_a_pickle_holding_more_than_tensors_is_refused_in_one_plain_sentence(tmp_path):
    torch.save({"w": np.ones(2)}, tmp_path / "numpy.pt")  # a numpy array: weights_only refuses it
    result = run_main("inspect", tmp_path / "numpy.pt")
    _one_line_error(result, "numpy.pt", "weights_only=True", "numpy")
    assert (
        "\x1b[" not in result.stderr and "Re-running" not in result.stderr and "Warning" not in result.stderr
    )
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "step.pt")
    _one_line_error(run_main("inspect", tmp_path / "step.pt"), "step.pt", "'step'", "int")


def test_peft_export_leaves_an_existing_directory_alone_without_force(tmp_path):
    _write_peft_dir(tmp_path / "peft")
    assert run_main("peft-import", tmp_path / "peft", tmp_path / "ours.safetensors").returncode == 0
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_config.json").write_text("{}")
    _one_line_error(run_main("peft-export", tmp_path / "ours.safetensors", tmp_path / "out"), "--force")
    assert (tmp_path / "out" / "adapter_config.json").read_text() == "{}"
    result = run_main("peft-export", tmp_path / "ours.safetensors", tmp_path / "out", "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2
    (tmp_path / "empty").mkdir()  # an empty directory holds nothing to lose
    assert run_main("peft-export", tmp_path / "ours.safetensors", tmp_path / "empty").returncode == 0


def test_merge_prints_its_notes_one_per_line(tmp_path):
    base = randomize_torch(torch_models.Conv1dNormNet())
    converters.save_torch_layout(base, tmp_path / "base.safetensors")
    adapted = torch_impl.AdaptedModel(
        base, torch_impl.LoRA, target_layers="conv*", adapter_kwargs={"rank": 2}
    )
    adapted.saver(str(tmp_path / "adapter.safetensors"))
    result = run_main(
        "merge", tmp_path / "base.safetensors", tmp_path / "adapter.safetensors", tmp_path / "m.safetensors"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    notes = lines[lines.index(next(line for line in lines if line.startswith("notes (2):"))) + 1 :]
    assert [line.split(" (")[0] for line in notes] == [
        "  merged the LoRA update into conv1.weight",
        "  merged the LoRA update into conv2.weight",
    ]


# ----------------------------------------------------------------------------- Hugging Face files (item 4)
def test_buffers_need_no_kind_and_pass_through_a_torch_layout_conversion(tmp_path):
    torch.save(
        {
            "emb.weight": torch.randn(5, 3),
            "emb.position_ids": torch.arange(5)[None],
            "fc.weight": torch.randn(2, 3),
        },
        tmp_path / "hf.bin",
    )
    result = run_main("convert", tmp_path / "hf.bin", tmp_path / "t.safetensors")
    assert (
        result.returncode == 0
        and "emb.position_ids: buffer (not a parameter), passed through" in result.stdout
    )
    assert TensorFile(tmp_path / "t.safetensors").names == ["emb.weight", "emb.position_ids", "fc.weight"]
    # to Flax: the buffer is left out and named; every parameter still needs its kind
    _one_line_error(
        run_main("convert", tmp_path / "hf.bin", tmp_path / "f.safetensors", "--to", "flax"), "'emb'", "'fc'"
    )
    result = run_main(
        "convert",
        tmp_path / "hf.bin",
        tmp_path / "f.safetensors",
        "--to",
        "flax",
        "--kinds",
        "emb=embedding,f?=linear",
    )
    assert result.returncode == 0, result.stderr
    assert "emb.position_ids: buffer (not a parameter), left out of the Flax layout" in result.stdout
    assert TensorFile(tmp_path / "f.safetensors").names == ["emb.embedding", "fc.kernel"]
    _one_line_error(
        run_main(
            "convert",
            tmp_path / "hf.bin",
            tmp_path / "g.safetensors",
            "--to",
            "flax",
            "--kinds",
            "*.dense=linear",
        ),
        "'*.dense'",
        "matches no module",
    )


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    from examples.pretrained import minilm_path

    try:
        return minilm_path()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(str(exc))


def test_the_real_minilm_file_converts_to_flax_described_by_its_twin_or_by_globs(tmp_path, minilm_dir):
    """The Hugging Face file holds the buffer embeddings.position_ids and records no kinds: the
    Flax twin describes it (no hand-written kinds), or four glob patterns do; either way the
    buffer is named and left out, and the Flax-layout file loads strictly into the twin and
    computes what transformers computes."""
    import jax.numpy as jnp
    from flax import nnx

    from examples.pretrained import load_minilm
    from flax_impl.models import BertConfig, BertModel

    source, config = minilm_dir / "model.safetensors", minilm_dir / "config.json"
    twin = ["--like", "flax_impl.models:BertModel", "--config", config]
    result = run_main("convert", source, tmp_path / "twin.safetensors", *twin)
    assert result.returncode == 0, result.stderr
    assert "loaded: 103" in result.stdout
    assert "embeddings.position_ids: buffer (not a parameter), left out of the Flax layout" in result.stdout
    result = run_main(
        "convert",
        source,
        tmp_path / "globs.safetensors",
        "--kinds",
        "*LayerNorm=layer_norm,*_embeddings=embedding",
        "--kinds",
        "*.dense=linear,*.self.*=linear",
    )
    assert result.returncode == 0, result.stderr
    assert not same_bits(_bits(tmp_path / "twin.safetensors"), _bits(tmp_path / "globs.safetensors"))
    # a kinds file written from the twin in one command says the same
    kinds = run_main("kinds", *twin)
    assert kinds.returncode == 0 and json.loads(kinds.stdout)["pooler.dense"] == "linear"
    (tmp_path / "kinds.json").write_text(kinds.stdout)
    result = run_main("convert", source, tmp_path / "file.safetensors", "--kinds", tmp_path / "kinds.json")
    assert result.returncode == 0 and not same_bits(
        _bits(tmp_path / "twin.safetensors"), _bits(tmp_path / "file.safetensors")
    )
    # strict for parameters: a kind-less parameter is still refused, named
    _one_line_error(
        run_main("convert", source, tmp_path / "x.safetensors", "--kinds", "*LayerNorm=layer_norm"),
        "'embeddings.word_embeddings'",
        "'encoder.layer.0.attention.self.query'",
    )

    _, torch_model = load_minilm()
    flax_model = BertModel(BertConfig.from_config(torch_model.config), rngs=nnx.Rngs(0))
    report = converters.load_flax_layout(flax_model, tmp_path / "twin.safetensors")
    assert report.ok and len(report.loaded) == 103
    flax_model.eval()
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(flax_model(jnp.asarray(ids))), expected, atol=1e-4, rtol=1e-4)
