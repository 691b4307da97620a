"""Packaging: each twin says which extra to install when its framework is missing, and the
framework-free part (bf16 files included, through the declared ml_dtypes) works with neither.

The missing framework is simulated in a subprocess by a meta-path finder that refuses it, so
these run in the full environment too (where the real torch-only and jax-only environments of
``.ci/run`` are not at hand)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]

BLOCK = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Block())
"""


def _run(blocked: tuple[str, ...], body: str) -> subprocess.CompletedProcess[str]:
    script = BLOCK.format(blocked=set(blocked)) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("package", "blocked", "extra"),
    [("torch_impl", ("torch",), "peft-twins[torch]"), ("flax_impl", ("jax", "flax"), "peft-twins[jax]")],
)
def test_importing_a_twin_without_its_framework_names_the_extra_to_install(package, blocked, extra):
    result = _run(
        blocked,
        f"""
        try:
            import {package}
        except ImportError as exc:
            print("MESSAGE:", exc)
            print("CAUSE:", repr(exc.__cause__))
        else:
            raise SystemExit("imported without its framework")
        """,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout.split("MESSAGE:", 1)[1]
    assert f"pip install '{extra}'" in message
    assert "No module named" in message  # the original cause stays visible


def test_interchange_reads_and_writes_bf16_files_with_neither_framework(tmp_path):
    result = _run(
        ("torch", "jax", "flax"),
        f"""
        import ml_dtypes, numpy as np
        from safetensors.numpy import load_file, save_file
        import twinformat
        from twinformat.format import read_safetensors_header
        from twinformat import peft_format, recorded

        path = {str(tmp_path / "bf16.safetensors")!r}
        array = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
        save_file({{"fc.weight": array}}, path)
        header, _ = read_safetensors_header(path)
        assert header["fc.weight"]["dtype"] == "BF16", header
        assert load_file(path)["fc.weight"].dtype == ml_dtypes.bfloat16
        assert not any(m.split(".")[0] in ("torch", "jax", "flax") for m in sys.modules)
        print("ok")
        """,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_ml_dtypes_is_a_declared_dependency_of_the_base_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    assert any(dep.replace("-", "_").startswith("ml_dtypes") for dep in project["dependencies"])
    assert {"torch", "jax", "test"} <= set(project["optional-dependencies"])
