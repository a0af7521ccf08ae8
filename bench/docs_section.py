"""The generated sections of docs/benchmarks.md: each benchmark owns one, between markers."""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(name: str, title: str, body: str) -> None:
    """Replace the section `name` of the page with body; add it under `title` if missing."""
    section = f"<!-- {name}:begin -->\n{body}\n<!-- {name}:end -->"
    marked = re.compile(rf"<!-- {name}:begin -->.*<!-- {name}:end -->", re.S)
    text = PAGE.read_text()
    text = marked.sub(lambda _: section, text) if marked.search(text) else \
        f"{text.rstrip()}\n\n## {title}\n\n{section}\n"
    PAGE.write_text(text)
