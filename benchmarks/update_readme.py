"""Copy the benchmark tables that the scripts wrote (``benchmarks/results/*.md``) into README.md.

Each ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` block of the README is replaced by
the file ``benchmarks/results/NAME.md``, so the README shows exactly what the scripts printed.

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n).*?(<!-- /results:(?P=name) -->)", re.S)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()

    def fill(match: re.Match[str]) -> str:
        source = ROOT / "benchmarks" / "results" / f"{match['name']}.md"
        if not source.is_file():
            raise FileNotFoundError(f"README block {match['name']!r} has no results file {source}")
        body = source.read_text().strip().replace("\n## ", "\n#### ").replace("\n### ", "\n##### ")
        body = re.sub(r"^## ", "#### ", body)
        return f"{match.group(1)}{body}\n{match.group(3)}"

    new, count = BLOCK.subn(fill, text)
    readme.write_text(new)
    print(f"updated {count} result blocks in {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
