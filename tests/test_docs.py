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


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after ``heading``, as stripped cells."""
    after = text.split(heading, 1)[1]
    rows: list[list[str]] = []
    for line in after.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header row


def test_the_documented_error_types_are_exactly_the_codes():
    from trio_gateway._core.kinds import FailureType

    rows = table_rows((ROOT / "docs" / "operations.md").read_text(), "### Error types")
    documented = [row[0].strip("`") for row in rows]
    assert sorted(documented) == sorted(failure.value for failure in FailureType)


def test_the_module_map_matches_the_tree():
    package = ROOT / "trio_gateway"
    modules = {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    rows = table_rows((ROOT / "docs" / "architecture.md").read_text(), "## Module map")
    mapped = {name.strip("`") for row in rows for name in re.findall(r"`([\w/]+\.py)`", row[0])}
    assert len(modules) > 30, "the walk found the package"
    assert sorted(modules - mapped) == [], "modules the map does not show"
    assert sorted(mapped - modules) == [], "the map shows modules that do not exist"
