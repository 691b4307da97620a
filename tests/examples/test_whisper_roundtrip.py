"""``python -m examples.whisper_roundtrip``, as a user runs it: PyTorch LoRA -> Flax -> PyTorch,
the same greedy transcripts at every stage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_whisper_roundtrip_gives_the_same_transcripts_in_both_frameworks(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.whisper_roundtrip",
            "--torch-steps",
            "1",
            "--flax-steps",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "no package ships pretrained Whisper weights for offline use" in done.stdout
    assert re.search(r"the same in Flax after loading\s+\| yes", done.stdout)
    assert re.search(r"the same in PyTorch after loading back\s+\| yes", done.stdout)
    assert (
        float(re.search(r"max \|torch - flax\| after loading back\s+\| (\S+)", done.stdout).group(1)) < 1e-4
    )
    assert float(re.search(r"log-mel front end.*\| (\S+)", done.stdout).group(1)) < 1e-4
    assert (tmp_path / "whisper" / "model.safetensors").exists()
    assert (tmp_path / "flax_adapters.safetensors").exists() and (
        tmp_path / "torch_adapters.safetensors"
    ).exists()
