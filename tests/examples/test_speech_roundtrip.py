"""``python -m examples.speech_roundtrip``, as a user runs it: transformers -> Flax LoRA -> PyTorch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_speech_roundtrip_trains_in_flax_and_torch_computes_the_same_outputs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "examples.speech_roundtrip", "--steps", "8", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "random init (no offline pretrained package)" in done.stdout
    diff = float(re.search(r"max \|torch - flax\|\s+\| (\S+)", done.stdout).group(1))
    assert diff < 1e-4
    first, last = map(float, re.search(r"first -> last step\s+\| (\S+) -> (\S+)", done.stdout).groups())
    assert last < first
    assert (tmp_path / "wav2vec2" / "model.safetensors").exists() and (
        tmp_path / "adapters.safetensors"
    ).exists()
