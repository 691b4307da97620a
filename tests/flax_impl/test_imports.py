"""flax_impl works with only jax installed: importing it never pulls in torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_flax_impl_imports_and_runs_with_torch_unavailable():
    script = textwrap.dedent(
        """
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torch_impl"):
                    raise ImportError(f"{name} is blocked for this test")

        sys.meta_path.insert(0, BlockTorch())
        from flax import nnx
        import flax_impl
        from flax_impl.checkpoint import torch_style_state_dict

        model = flax_impl.AdaptedModel(
            nnx.Linear(3, 2, rngs=nnx.Rngs(0)), flax_impl.LoRA, all_linear=True, rngs=nnx.Rngs(1)
        )
        assert sorted(torch_style_state_dict(model)) == [
            "adapted_model.adapter_down_proj.weight",
            "adapted_model.adapter_up_proj.weight",
            "adapted_model.pretrained_module.bias",
            "adapted_model.pretrained_module.weight",
        ]
        assert not any(name.split(".")[0] == "torch" for name in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
