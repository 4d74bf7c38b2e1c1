"""The spill file: where usage records wait when the database cannot take them.

Blocking file I/O, no Trio and no sqlite3. The usage store
(:class:`~trio_gateway._accounting.usage_store.UsageStore`) decides when to
spill and when to import; this module knows the files.

The rules:

1. **Three files beside the database** ``<db>``: ``<db>.spill.jsonl``, the
   spill file, one :func:`~trio_gateway._accounting.usage_rows.spill_line`
   per record; ``<db>.spill.jsonl.importing``, a spill file being imported;
   and ``<db>.spill.jsonl.rejected``, lines that could not be imported, kept
   for a person. A ``:memory:`` database has none.
2. **One process appends, on the event loop.** :func:`append` is called
   only from the store's Trio thread, so no append is half done when
   :func:`claim` renames the file. Appends are not fsynced: they survive a
   crash of the gateway, not of the machine. The spill file belongs to one
   gateway process (one process per database).
3. **Import is claim, then insert, then delete.** :func:`claim` renames the
   spill file to ``.importing`` (or finds one an earlier run left), and
   :func:`import_file` inserts its records in chunks through the insert it
   is given (on the database thread), then deletes it. A line cut short by
   a crash, or a row the database refuses, goes to ``.rejected``; any other
   error leaves the file for the next start, whose import then counts the
   lines already inserted as duplicates.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from trio_gateway._accounting.usage_rows import Row, row_from_spill_line, spill_line

__all__ = [
    "append",
    "claim",
    "encode",
    "import_file",
    "importing_path",
    "rejected_path",
    "spill_path",
]

SUFFIX: Final = ".spill.jsonl"


def spill_path(database: str | os.PathLike[str]) -> Path | None:
    """The spill file of ``database``; None for a database in memory."""
    if str(database) in (":memory:", ""):
        return None
    return Path(f"{database}{SUFFIX}")


def importing_path(spill: Path) -> Path:
    """The name a spill file has while it is imported."""
    return spill.with_name(spill.name + ".importing")


def rejected_path(spill: Path) -> Path:
    """Where lines that could not be imported are kept."""
    return spill.with_name(spill.name + ".rejected")


def encode(rows: Sequence[Row]) -> bytes:
    """The spill lines of ``rows``.

    A row JSON cannot hold (an int too large, say) becomes its repr, so a
    person can still read it; its import will reject it.
    """
    lines = []
    for row in rows:
        try:
            lines.append(spill_line(row))
        except TypeError:
            lines.append(repr(row).encode("utf-8", "replace") + b"\n")
    return b"".join(lines)


def append(spill: Path, lines: bytes) -> None:
    """Append ``lines`` (from :func:`encode`) to the spill file. OSError if it cannot.

    Blocking: one small append. Call it from the event loop only (rule 2).
    """
    with spill.open("ab") as file:
        file.write(lines)


def claim(spill: Path) -> bool:
    """Make :func:`importing_path` the file to import; False if there is nothing to import.

    Runs on the event loop, the only thread that appends to the spill file, so
    no append can be half done when the file is renamed.
    """
    importing = importing_path(spill)
    if importing.exists():  # left by a run that stopped before it finished importing
        return True
    try:
        os.replace(spill, importing)
    except FileNotFoundError:
        return False
    return True


def import_file(
    path: Path,
    rejected: Path,
    insert: Callable[[Sequence[Row]], int],
    *,
    chunk: int,
    refused: tuple[type[Exception], ...],
) -> tuple[int, int, int]:
    """Insert every record in the file ``path``, then delete the file. Blocking.

    ``insert`` writes rows in one transaction and returns how many were new;
    ``refused`` are its errors that mean "this row will never go in". Rows go
    in ``chunk`` at a time; a refused chunk is retried row by row, so one bad
    row costs only itself. Returns (inserted, duplicates, rejected). A line
    that is not a record, or a refused row, is appended to ``rejected``. Any
    other error propagates and leaves the file.
    """
    inserted = duplicates = 0
    kept: list[bytes] = []
    pending: list[tuple[Row, bytes]] = []

    def insert_pending() -> None:
        nonlocal inserted, duplicates
        try:
            new = insert([row for row, _ in pending])
            inserted += new
            duplicates += len(pending) - new
        except refused:  # one bad row spoils its chunk: insert one by one
            for row, line in pending:
                try:
                    new = insert([row])
                except refused:
                    kept.append(line)
                    continue
                inserted += new
                duplicates += 1 - new
        pending.clear()

    with path.open("rb") as file:
        for raw in file:
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            try:
                pending.append((row_from_spill_line(line), line))
            except (ValueError, KeyError):
                kept.append(line)
                continue
            if len(pending) >= chunk:
                insert_pending()
    if pending:
        insert_pending()
    if kept:
        with rejected.open("ab") as out:
            out.write(b"".join(line + b"\n" for line in kept))
    path.unlink()
    return inserted, duplicates, len(kept)
