"""SpeechBrain's ``Checkpointer`` saves only the adapters of an ``AdaptedModel`` whichever is
imported first, SpeechBrain or our model (0.1 registered the hooks only when SpeechBrain came
first: a model built before ``import speechbrain`` was saved whole, 6 tensors instead of 2).

Each order runs in a fresh interpreter: in the test process SpeechBrain may already be imported.
The real SpeechBrain is imported (``setup.sh`` makes it importable: torchaudio without its
extension built for another torch), no stub.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

# Found, not imported: SpeechBrain leaves lazy placeholder modules (k2, ...) in sys.modules, which
# break Hypothesis's scan of sys.modules at collection.
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("speechbrain") is None:
    pytest.skip("needs torch and SpeechBrain (the full environment)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, torch
order = sys.argv[2]
if order == "speechbrain first":
    from speechbrain.utils.checkpoints import Checkpointer
import torch_impl
from tests.zoo.torch_models import SeedMLP
torch.manual_seed(0)
model = torch_impl.AdaptedModel(SeedMLP(), torch_impl.LoRA, target_layers=["layer1"], adapter_kwargs={"rank": 2})
if order == "model first":
    assert "speechbrain" not in sys.modules
    from speechbrain.utils.checkpoints import Checkpointer
checkpointer = Checkpointer(sys.argv[1], recoverables={"model": model})
checkpointer.save_checkpoint()
import glob
[path] = glob.glob(sys.argv[1] + "/CKPT*/model.ckpt")
saved = torch.load(path, weights_only=True)
print(sorted(saved))
with torch.no_grad():
    model.adapted_model.layer1.adapter_up_proj.weight.fill_(3.0)
checkpointer.recover_if_possible()
assert float(model.adapted_model.layer1.adapter_up_proj.weight.abs().max()) == 0.0, "not recovered"
"""


@pytest.mark.parametrize("order", ["model first", "speechbrain first"])
def test_the_checkpointer_saves_and_recovers_only_the_adapters_whichever_is_imported_first(tmp_path, order):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), order], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == (
        "['adapted_model.layer1.adapter_down_proj.weight', 'adapted_model.layer1.adapter_up_proj.weight']"
    )
