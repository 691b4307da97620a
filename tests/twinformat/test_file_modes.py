"""Files the user asks for (converted checkpoints, ``report.json``, plots) get the mode the user's
umask gives a new file, not the ``0o600`` of the temporary file the atomic writer fills first."""

from __future__ import annotations

import os
import stat

import pytest

from twinformat.format import atomic_write


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_an_atomically_written_file_has_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "out.bin", lambda tmp: open(tmp, "wb").close())
        atomic_write(tmp_path / "out.bin", lambda tmp: open(tmp, "wb").close())  # replacing one too
        assert os.umask(umask) == umask  # the writer left the umask as it found it
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == mode
    assert os.listdir(tmp_path) == ["out.bin"]
