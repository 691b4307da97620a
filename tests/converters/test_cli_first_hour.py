"""What a new user met in the command line's first hour (0.2): merging a PEFT adapter, the list of
layer kinds, and what ``inspect`` means by framework and layout."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import twinformat.kinds  # noqa: E402
from converters.files import TensorFile  # noqa: E402
from tests.zoo import bert  # noqa: E402
from tests.zoo.arrays import randomize_torch  # noqa: E402
from twinformat.kinds import KINDS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "converters", *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


@pytest.fixture(scope="module")
def peft_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft")
    transformers = bert.transformers_module()
    torch.manual_seed(0)
    base = randomize_torch(transformers.BertModel(transformers.BertConfig(**bert.SMALL_CONFIG))).eval()
    base.save_pretrained(str(folder / "base"))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value"]))
    bert.randomize_peft(model)
    model.save_pretrained(str(folder / "peft"))
    merged = {k: v.detach().numpy().copy() for k, v in model.merge_and_unload().state_dict().items()}
    return folder, merged


@pytest.mark.parametrize("given", ["directory", "adapter_model.safetensors"])
def test_merge_takes_a_peft_adapter_and_gives_peft_merge_and_unload_weights(tmp_path, peft_bert, given):
    folder, expected = peft_bert
    adapter = folder / "peft" if given == "directory" else folder / "peft" / "adapter_model.safetensors"
    result = run_cli("merge", folder / "base" / "model.safetensors", adapter, tmp_path / "merged.safetensors")
    assert result.returncode == 0, result.stderr
    assert "read the PEFT adapter" in result.stdout
    with TensorFile(tmp_path / "merged.safetensors") as merged:
        for key, value in expected.items():
            np.testing.assert_allclose(merged.get(key), value, rtol=1e-6, atol=1e-6, err_msg=key)


def test_merge_refuses_rank_and_alpha_for_a_peft_adapter_saying_why(tmp_path, peft_bert):
    folder, _ = peft_bert
    result = run_cli(
        "merge",
        folder / "base" / "model.safetensors",
        folder / "peft",
        tmp_path / "m.safetensors",
        "--rank",
        "4",
    )
    assert result.returncode != 0 and "is a PEFT adapter" in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_every_listing_of_layer_kinds_names_the_same_kinds():
    table = twinformat.kinds.__doc__.split("=\n", 2)[2]
    in_table = re.findall(r"^([a-z_]+)\s{2,}", table, flags=re.MULTILINE)
    assert in_table == list(KINDS)
    help_text = " ".join(run_cli("convert", "--help").stdout.split())
    listed = help_text.split("Kinds: ")[1].split(" --like")[0]
    assert listed.split(", ") == list(KINDS)


def test_inspect_says_what_framework_and_layout_mean(tmp_path):
    from flax import nnx

    import converters

    path = tmp_path / "flax.safetensors"
    converters.save_flax_layout(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), path)
    out = run_cli("inspect", path).stdout
    assert re.search(r"^layout: flax \(how the tensors are named and laid out: Flax NNX", out, re.MULTILINE)
    assert "the framework that wrote the file" in out
