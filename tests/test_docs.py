"""The docs cite tests by name; every cited test exists, so the docs cannot drift silently."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
# `tests/test_x.py::test_name`, or `test_x.py::test_name`, then any `::test_other`
# that follows in the same paragraph (or table row) and means the same file.
CITATION = re.compile(r"(?:tests/)?(test_\w+)\.py::(\w+)|::(test_\w+)")


def citations(text: str) -> list[tuple[str, str]]:
    found = []
    current = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("|"):
            current = None
        for match in CITATION.finditer(line):
            if match[1]:
                current = match[1]
                found.append((current, match[2]))
            elif current is not None:
                found.append((current, match[3]))
    return found


def test_every_test_the_docs_cite_exists():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    count = 0
    for document in documents:
        for module, name in citations(document.read_text()):
            count += 1
            source = ROOT / "tests" / f"{module}.py"
            if not source.exists() or not re.search(
                rf"^(async )?def {name}\(", source.read_text(), re.MULTILINE
            ):
                missing.append(f"{document.name}: {module}.py::{name}")
    assert count > 100, "the citation pattern stopped matching"
    assert missing == []
