"""Every ```python block of README.md and of the documentation (docs/**/*.md) runs as pasted.

Each block runs in its own fresh Python process, in an empty temporary folder (the files it
writes land there), with the repository importable and nothing downloaded (Hugging Face offline).
A block is self-contained, except for what a reader's own program would already have and the
README should not repeat: that goes in an HTML comment right before the block,

    <!-- setup: what it stands for
    python code
    -->

whose code runs first, in the same process. Several setup comments before one block run it once
each (the DDP and the FSDP2 variants of one snippet). Nothing else is added to a block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)]
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
# fences MyST highlights as Python that are not the plain ```python this file runs
_HIDDEN_PYTHON = re.compile(
    r"^```[ \t]*(\{(code-block|code|sourcecode)\}[ \t]*(py|python3?|ipython3?|pycon)|py|python3|ipython3?|pycon"
    r"|python[ \t]+\S.*)[ \t]*$",
    re.M,
)


@dataclass(frozen=True)
class Snippet:
    page: str
    line: int
    section: str
    code: str
    setup: str
    variant: int = 0

    @property
    def id(self) -> str:
        name = re.sub(r"[^A-Za-z0-9]+", "-", self.section).strip("-")[:40]
        return f"{self.page}:{self.line}-{name}" + (f"-setup{self.variant}" if self.variant else "")


def snippets(text: str, page: str = "") -> list[Snippet]:
    """The python blocks of ``text``, one per setup comment before it (or one with no setup)."""
    out = []
    for match in _BLOCK.finditer(text):
        before = text[: match.start()]
        line = before.count("\n") + 1
        prose = re.sub(r"^```.*?^```$", "", before, flags=re.S | re.M)  # a code comment is no heading
        section = next((h for h in reversed(re.findall(r"^#+ (.*)$", prose, re.M))), "")
        setups = _setups_right_before(before)
        out.extend(
            Snippet(page, line, section, match.group(1), setup, variant if len(setups) > 1 else 0)
            for variant, setup in enumerate(setups or [""], start=1)
        )
    return out


def _setups_right_before(before: str) -> list[str]:
    """The code of the setup comments that end right before a block (only blank lines between)."""
    setups: list[str] = []
    rest = before.rstrip()
    while rest.endswith("-->"):
        start = rest.rfind("<!-- setup:")
        if start < 0 or "-->" in rest[start:-3]:
            break
        _, _, code = rest[start:-3].partition("\n")
        setups.insert(0, code)
        rest = rest[:start].rstrip()
    return setups


def test_setup_comments_are_found_only_right_before_their_block():
    text = "<!-- setup: a\nx = 1\n-->\n<!-- setup: b\nx = 2\n-->\n```python\nprint(x)\n```\n\n```python\npass\n```\n"

    found = snippets(text)

    assert [(s.setup, s.code) for s in found] == [
        ("x = 1\n", "print(x)\n"),
        ("x = 2\n", "print(x)\n"),
        ("", "pass\n"),
    ]


ALL = [s for page in PAGES for s in snippets(page.read_text(), str(page.relative_to(ROOT)))]


def test_the_pages_have_the_snippets_this_test_runs():
    found = {(s.page, s.section) for s in ALL}

    assert {
        ("README.md", "PyTorch: a drop-in for `speechbrain.nnet.adapters`"),
        ("README.md", "Flax NNX: the twin"),
        ("docs/guides/speechbrain.md", "For SpeechBrain users: `torch_impl`"),
        ("docs/guides/peft.md", "Adapter directories: `save_pretrained` and `from_pretrained`"),
        ("docs/guides/jax.md", "A training step"),
        ("docs/guides/converting.md", "Converting checkpoints"),
        ("docs/guides/speech_and_language.md", "Speech encoders: wav2vec2, HuBERT, WavLM, Whisper's encoder"),
        ("docs/guides/multiple_devices.md", "PyTorch: DDP and FSDP2"),
        ("docs/guides/multiple_devices.md", "JAX: meshes"),
        ("docs/guides/multiple_devices.md", "Checkpoints split over several files"),
        ("docs/development.md", "How the code is organised"),
    } <= found
    assert len(ALL) >= 14


def test_the_readme_stays_a_front_page_whose_links_lead_somewhere():
    text = README.read_text()
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)  # relative links, anchors dropped

    assert len(text.splitlines()) <= 200, "the README is the front page: move the detail into docs/"
    assert "docs/index.md" in links
    assert [link for link in links if not (ROOT / link).exists()] == []


def test_python_shown_under_another_fence_is_recognised():
    fences = "```py\n```{code-block} python\n```python title\n```python\n```text\n```pycon\n"
    assert [m.group(0) for m in _HIDDEN_PYTHON.finditer(fences)] == [
        "```py",
        "```{code-block} python",
        "```python title",
        "```pycon",
    ]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_python_block_hides_behind_another_fence(page):

    hidden = [m.group(0) for m in _HIDDEN_PYTHON.finditer(page.read_text())]

    assert not hidden, f"{page.name}: write ```python (it runs) or ```text (it does not), not {hidden}"


@pytest.mark.parametrize("snippet", ALL, ids=[s.id for s in ALL])
def test_snippet_runs_as_pasted(snippet, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "JAX_PLATFORMS": "cpu",
        "DOCS_PORT": str(29500 + (os.getpid() + snippet.line) % 400),
    }
    env.pop("XLA_FLAGS", None)  # a block that needs several devices says so in its setup
    script = snippet.setup + "\n" + snippet.code
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 0, (
        f"{snippet.page} line {snippet.line} ({snippet.section}):\n{result.stderr[-3000:]}"
    )
