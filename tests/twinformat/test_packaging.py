"""The wheel installs exactly the four top-level packages (and nothing named ``interchange``, a
popular PyPI project that 0.1's shared package collided with)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_exactly_four_top_level_packages(tmp_path):
    # Built from a copy of what the wheel is made of, so the build leaves nothing in the checkout
    # (setuptools writes build/ and *.egg-info/ beside the sources).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("twinformat", "torch_impl", "flax_impl", "converters"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("peft_twins-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        top = {n.split("/")[0] for n in names} - {dist_info}
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    assert top == {"twinformat", "torch_impl", "flax_impl", "converters"}
    import twinformat

    assert f"\nVersion: {twinformat.__version__}\n" in metadata
    assert dist_info == f"peft_twins-{twinformat.__version__}.dist-info"
