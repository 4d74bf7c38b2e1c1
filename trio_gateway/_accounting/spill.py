"""The spill files: where usage records wait when the database cannot take them.

Blocking file I/O, no Trio and no database driver. The usage store
(:class:`~trio_gateway._accounting.usage_store.UsageStore`) decides when to
spill and when to import; this module knows the files, and how several
processes share them safely.

The rules:

1. **The names.** A database's spill files share a start, its *base*
   ``<b>`` (a SQLite file's path; for PostgreSQL a name in ``spill_dir``):

   - ``<b>.spill.<pid>.jsonl``: the spill file of process ``<pid>``, one
     :func:`~trio_gateway._accounting.usage_rows.spill_line` per record;
   - ``<b>.spill.<pid>.jsonl.importing.<token>``: a spill file claimed for
     import (``<token>`` is random, so no claim ever overwrites another);
   - ``<b>.spill.jsonl.rejected``: lines that could not be imported, kept for
     a person (one file for the database: lines are appended whole);
   - ``<b>.spill.jsonl`` and ``<b>.spill.jsonl.importing``, the names of the
     versions that had one spill file per database, are still imported.

2. **One process appends to a spill file**: its own, named after its pid,
   so the processes that share a database never append to the same file.
   :func:`append` is called from the store's event loop. Appends are not
   fsynced: they survive a crash of the gateway, not of the machine.

3. **A claim is a lock, then a rename.** Whoever imports a file first takes
   an exclusive ``flock`` on it (without waiting: a file that is locked is
   skipped this time), checks that the name still leads to the file it
   opened, and renames it to a new ``.importing.<token>`` name, keeping the
   lock for the whole import. So two importers never import the same file:
   only one can hold the lock, and the loser either fails to lock or finds
   the name gone. An appender holds the same lock while it writes, and
   checks the name the same way, so a claim never takes a file in the middle
   of an append, and a line is never written into a file after it has been
   claimed (the appender sees the rename and opens a new file).

4. **Which files a pass imports** (:func:`candidates`): every
   ``.importing`` file it can lock (one a crashed or failed import left: the
   kernel drops the lock of a process that dies), then the spill files of
   this process, of processes that are no longer running, and the old
   single name. A live process's spill file is left to it.

5. **Import is claim, then insert, then delete.** :class:`ImportPass`
   inserts a claimed file's records in chunks through the insert it is
   given (on the database thread), then deletes the file and drops the lock.
   A line cut short by a crash, a line that is not a record, or a row the
   database refuses goes to ``.rejected``; any other error drops the lock
   and leaves the file for the next pass, whose import then counts the
   lines already inserted as duplicates.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, NamedTuple

from trio_gateway._accounting.usage_rows import Row, row_from_spill_line, spill_line

__all__ = [
    "Claim",
    "FileResult",
    "ImportPass",
    "Step",
    "append",
    "candidates",
    "claim",
    "encode",
    "legacy_path",
    "rejected_path",
    "spill_path",
]

_APPEND_TRIES: Final = 200  # ~0.2 s of waiting for a claim's rename, at most
_TOKEN_BYTES: Final = 6


def spill_path(base: Path, pid: int) -> Path:
    """The spill file of process ``pid``: ``<base>.spill.<pid>.jsonl``."""
    return base.with_name(f"{base.name}.spill.{pid}.jsonl")


def legacy_path(base: Path) -> Path:
    """The single spill file of earlier versions: ``<base>.spill.jsonl``."""
    return base.with_name(f"{base.name}.spill.jsonl")


def rejected_path(base: Path) -> Path:
    """Where lines that could not be imported are kept: ``<base>.spill.jsonl.rejected``."""
    return base.with_name(f"{base.name}.spill.jsonl.rejected")


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


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not renamed, not replaced)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def append(path: Path, lines: bytes) -> None:
    """Append ``lines`` (from :func:`encode`) to the spill file ``path``, under its lock.

    Blocking: one small append, and at most ~0.2 s of waiting if a claim is
    renaming the file at that moment (rule 3). OSError if it cannot.
    """
    for _ in range(_APPEND_TRIES):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if _same_file(fd, path):
                    time.sleep(0.001)  # being claimed: the rename follows at once
                continue  # renamed already: the next open makes a new file
            if _same_file(fd, path):
                _write_all(fd, lines)
                return
        finally:
            os.close(fd)  # drops the lock
    raise OSError(errno.EWOULDBLOCK, f"{path} stayed locked by another process")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on this machine); this process counts as not running."""
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OverflowError:
        return False
    return True


def candidates(base: Path) -> list[tuple[Path, bool]]:
    """The files a pass tries to import (rule 4), oldest kind first: (path, already claimed)."""
    pattern = re.compile(
        re.escape(base.name) + r"\.spill\.(?:(\d{1,10})\.)?jsonl(\.importing(?:\.[0-9a-f]+)?)?"
    )
    importing: list[tuple[Path, bool]] = []
    spilled: list[tuple[Path, bool]] = []
    try:
        names = sorted(os.listdir(base.parent))
    except FileNotFoundError:
        return []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        path = base.with_name(name)
        if match[2]:
            importing.append((path, True))
        elif match[1] is None or not _alive(int(match[1])):
            spilled.append((path, False))
    return importing + spilled


@dataclass
class Claim:
    """A file this process imports: its name now, and the open file that holds its lock."""

    path: Path
    fd: int

    def release(self) -> None:
        """Drop the lock (the file stays, for the next pass)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


def claim(path: Path, *, claimed: bool) -> Claim | None:
    """Claim ``path`` for import (rule 3); None if someone else has it, or it is gone.

    ``claimed``: the file already has an ``.importing`` name (left by an
    import that stopped), so it is only locked, not renamed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _same_file(fd, path):
            os.close(fd)
            return None
        if not claimed:
            target = path.with_name(f"{path.name}.importing.{secrets.token_hex(_TOKEN_BYTES)}")
            os.rename(path, target)
            path = target
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return Claim(path, fd)


class FileResult(NamedTuple):
    """One imported (and deleted) file, and what became of its lines."""

    path: Path
    inserted: int
    duplicates: int
    rejected: int


class Step(NamedTuple):
    """What one :meth:`ImportPass.step` did."""

    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0  # counted when the file is done and its rejected lines are kept
    finished: FileResult | None = None  # a file was imported to its end and deleted
    more: bool = False  # the pass may have more to do


class _FileImport:
    """One claimed file, read a chunk at a time."""

    def __init__(self, claimed: Claim, *, chunk: int) -> None:
        self.claim = claimed
        self.chunk = chunk
        self.file: BinaryIO = open(claimed.fd, "rb", closefd=False)  # noqa: SIM115  # closed in close()
        self.kept: list[bytes] = []  # lines for .rejected, written when the file is done
        self.inserted = self.duplicates = 0

    def read_chunk(self) -> tuple[list[tuple[Row, bytes]], bool]:
        """Up to ``chunk`` records (row, line), and whether the file has ended."""
        pending: list[tuple[Row, bytes]] = []
        while len(pending) < self.chunk:
            raw = self.file.readline()
            if not raw:
                return pending, True
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            try:
                pending.append((row_from_spill_line(line), line))
            except (ValueError, KeyError):
                self.kept.append(line)
        return pending, False

    def close(self) -> None:
        self.file.close()
        self.claim.release()


class ImportPass:
    """One pass over a database's spill files: claim each in turn, import it in chunks.

    Blocking; every method runs on the store's database thread. ``insert``
    writes rows in one transaction and returns how many were new;
    ``refused`` are its errors that mean "this row will never go in". A
    chunk (``chunk`` records) that is refused is retried row by row, so one
    bad row costs only itself.
    """

    def __init__(self, base: Path, *, chunk: int, refused: tuple[type[Exception], ...]) -> None:
        self.base = base
        self.chunk = chunk
        self.refused = refused
        self._todo: list[tuple[Path, bool]] | None = None  # found at the first step
        self._current: _FileImport | None = None

    def step(self, insert: Callable[[Sequence[Row]], int]) -> Step:
        """Import the next chunk: one transaction, or one per row of a refused chunk.

        An error other than ``refused`` drops the file's lock, leaves the file
        for a later pass, and propagates.
        """
        while self._current is None:
            if self._todo is None:
                self._todo = candidates(self.base)
            if not self._todo:
                return Step()
            path, claimed = self._todo.pop(0)
            found = claim(path, claimed=claimed)
            if found is not None:
                self._current = _FileImport(found, chunk=self.chunk)
        current = self._current
        try:
            return self._step(current, insert)
        except BaseException:
            self.abandon()
            raise

    def _step(self, current: _FileImport, insert: Callable[[Sequence[Row]], int]) -> Step:
        pending, ended = current.read_chunk()
        inserted = duplicates = 0
        if pending:
            try:
                inserted = insert([row for row, _ in pending])
                duplicates = len(pending) - inserted
            except self.refused:  # one bad row spoils its chunk: insert one by one
                for row, line in pending:
                    try:
                        new = insert([row])
                    except self.refused:
                        current.kept.append(line)
                        continue
                    inserted += new
                    duplicates += 1 - new
        current.inserted += inserted
        current.duplicates += duplicates
        if not ended:
            return Step(inserted, duplicates, more=True)
        if current.kept:
            with rejected_path(self.base).open("ab") as out:
                out.write(b"".join(line + b"\n" for line in current.kept))
        current.claim.path.unlink()  # before the lock is dropped: no one else can take it
        current.close()
        self._current = None
        result = FileResult(
            current.claim.path, current.inserted, current.duplicates, len(current.kept)
        )
        return Step(inserted, duplicates, result.rejected, finished=result, more=True)

    def abandon(self) -> None:
        """Drop the file being imported (it stays for a later pass). Never raises."""
        if self._current is not None:
            with contextlib.suppress(OSError):
                self._current.close()
            self._current = None
