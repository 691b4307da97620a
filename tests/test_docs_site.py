"""The documentation site builds without a warning and its pages render: three screenshots.

The site is the one ``.ci/run`` builds before the test suite (``sphinx-build -W --keep-going -n``,
into ``docs/_build/html``), named by ``DOCS_HTML``; without it (the test command on a developer's
machine) the first test to need the site builds it once, with the same flags, into the run's
temporary folder, shared by the pytest-xdist workers. Then headless Chromium opens the home page, one guide
and one API page and saves a screenshot of each (kept beside the site, in ``_screenshots/``): each
page must carry its title and its code blocks in the HTML, and its screenshot must not be blank.

Skipped only when Chromium is not installed (``.ci/run`` installs it, so CI never skips).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next(filter(None, (shutil.which(name) for name in ("chromium", "chromium-browser"))), None)
# (page, its <h1>, at least this many code blocks)
PAGES = [
    ("index.html", "peft-twins", 1),
    ("guides/jax.html", "For JAX and TPU users: flax_impl", 1),
    ("api/converters.html", "converters", 1),
]
SPHINX = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html"]


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    given = os.environ.get("DOCS_HTML")
    if given:
        html = Path(given).resolve()
        assert (html / "index.html").is_file(), f"DOCS_HTML={given} holds no built site"
        return html
    # One build for all pytest-xdist workers of this run: they share the run's base temporary
    # folder; the first to take the lock builds, the others wait and reuse it.
    run_dir = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        run_dir = run_dir.parent
    shared = run_dir / "docs-site"
    shared.mkdir(exist_ok=True)
    html = shared / "html"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "built").exists():
            result = subprocess.run(
                [*SPHINX, str(ROOT / "docs"), str(html)], capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, (
                f"sphinx-build -W -n failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
            )
            (shared / "built").touch()
    return html


class _Page(HTMLParser):
    """The page's <title>, the text of its first <h1> and its number of <pre> blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.title = self.h1 = ""
        self.pre = 0
        self._in: str | None = None
        self._h1_done = False

    def handle_starttag(self, tag, attrs):
        if tag == "pre":
            self.pre += 1
        if (tag == "title" and not self.title) or (tag == "h1" and not self._h1_done):
            self._in = tag  # the first of each: later <title>s belong to the theme's inline SVG icons

    def handle_endtag(self, tag):
        if tag == self._in:
            self._h1_done = self._h1_done or tag == "h1"
            self._in = None

    def handle_data(self, data):
        if self._in == "title":
            self.title += data
        elif self._in == "h1":
            self.h1 += data


def _png_colours(png: bytes, limit: int = 2) -> int:
    """How many distinct pixel values a PNG holds (counting stops at ``limit``).

    Reads 8-bit RGB/RGBA PNGs, as Chromium writes them, without an image library.
    """
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    channels = {2: 3, 6: 4}
    while pos < len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, depth, colour = int.from_bytes(data[:4], "big"), data[8], data[9]
            assert depth == 8 and colour in channels, (
                f"unexpected PNG format (depth {depth}, colour {colour})"
            )
            bpp = channels[colour]
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * bpp + 1
    seen: set[bytes] = set()
    previous = bytearray(stride - 1)
    for row in range(len(raw) // stride):
        filter_type, line = raw[row * stride], bytearray(raw[row * stride + 1 : (row + 1) * stride])
        for i in range(len(line)):  # undo PNG's per-row filter
            left = line[i - bpp] if i >= bpp else 0
            up, upleft = previous[i], previous[i - bpp] if i >= bpp else 0
            if filter_type == 1:
                line[i] = (line[i] + left) & 0xFF
            elif filter_type == 2:
                line[i] = (line[i] + up) & 0xFF
            elif filter_type == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif filter_type == 4:
                p = left + up - upleft
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else upleft)) & 0xFF
        seen.update(bytes(line[i : i + bpp]) for i in range(0, len(line), bpp * 7))
        if len(seen) >= limit:
            return len(seen)
        previous = line
    return len(seen)


def test_png_colours_tells_a_blank_image_from_a_drawn_one():
    def png(rows: list[bytes]) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

        header = (
            (len(rows[0]) // 3).to_bytes(4, "big") + len(rows).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
        )
        body = zlib.compress(b"".join(b"\x00" + row for row in rows))
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")

    white = bytes([255] * 3 * 8)

    assert _png_colours(png([white] * 4)) == 1
    assert _png_colours(png([white, bytes([0] * 3 * 8), white])) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize(("page", "heading", "min_code_blocks"), PAGES, ids=[p[0] for p in PAGES])
def test_page_renders_its_title_and_code_blocks(site, page, heading, min_code_blocks, tmp_path):
    html_file = site / page
    parsed = _Page()
    parsed.feed(html_file.read_text())
    shots = site.parent / "_screenshots"
    shots.mkdir(exist_ok=True)
    png = shots / (page.replace("/", "_").removesuffix(".html") + ".png")

    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--hide-scrollbars",
            "--window-size=1280,1000",
            f"--screenshot={png}",
            html_file.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert parsed.h1.replace("¶", "").strip() == heading
    assert parsed.title.startswith(heading) and "peft-twins" in parsed.title
    assert parsed.pre >= min_code_blocks, f"{page}: {parsed.pre} code blocks"
    assert result.returncode == 0 and png.is_file(), f"chromium failed:\n{result.stderr[-2000:]}"
    assert _png_colours(png.read_bytes()) > 1, f"{png} is a single colour: the page did not render"
