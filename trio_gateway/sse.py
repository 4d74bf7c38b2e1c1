"""A sans-IO Server-Sent Events codec: bytes in, events out, and back.

This module does no I/O and imports no async library. Feed it whatever bytes
arrived, in whatever pieces they arrived, and it hands back every item that
those bytes completed::

    decoder = SSEDecoder()
    items = decoder.feed(chunk)   # any bytes, split anywhere
    items += decoder.close()      # end of stream

Theory of operation
===================

Parsing follows the WHATWG HTML "server-sent events" interpretation rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream).

1. Lines are found in *bytes*, never in text. The only line ends are LF, CRLF
   and a lone CR; those bytes never occur inside a multi-byte UTF-8 sequence,
   so a character split across two chunks is simply part of a line that is
   not complete yet. Only complete field values are decoded, with the
   replacement behaviour of the spec's "UTF-8 decode" (U+FFFD per maximal
   invalid subpart), so invalid input is replaced, never raised on. Chunks
   without a line end are appended to the pending line, not rescanned, so
   a long line costs time linear in its length however it is chunked.
2. A line that ends in CR is complete as soon as the CR arrives. If the next
   chunk then starts with LF, that LF finishes the CRLF: it joins the ``raw``
   of that line if the line is in the still-open block, and is dropped if
   the line was a comment or a blank line (whose item was already returned).
3. A line starting with ``:`` is a comment. It comes out at once as its own
   item (``comment`` set), in stream order, even in the middle of an event.
   (At :meth:`SSEDecoder.close`, a final comment lacking its line end comes
   out after the open block, so that rule 6 holds.)
4. Any other line is a field, ``name:value`` with one optional space after the
   colon removed, or ``name`` alone with an empty value. ``data`` values
   join with LF; ``id`` is kept unless it contains NUL; ``retry`` only when it
   is all ASCII digits; unknown names are ignored but stay in ``raw``.
5. A blank line ends a block. A block with at least one field line comes out
   as an :class:`SSEEvent`; blank lines that end no block produce nothing.
6. ``raw`` holds the exact bytes of each item as they came in, terminators
   included. Replaying ``b"".join(item.raw for item in items)`` through a
   fresh decoder gives the same items, except in two cases that exact bytes
   cannot avoid: (a) a comment between a field line ended by a lone CR and
   a blank line ended by LF: taking the comment out of the block makes that
   CR and LF one CRLF in the event's ``raw``; (b) replayed bytes that begin
   with a UTF-8 BOM (a BOM not stripped as the stream's leading BOM): a
   fresh decoder strips it, so replay behind one extra BOM.

Deviations from the spec, on purpose
====================================

* **The last event is not lost.** The spec discards a block that the stream
  ends before its blank line. A gateway must not drop the final event an
  upstream sent (often the one carrying usage), so :meth:`SSEDecoder.close`
  delivers it.
* **Blocks without data still come out.** The spec dispatches nothing when the
  data buffer is empty (a block of only ``id:`` or ``event:``). A proxy must
  forward what upstream sent, so such a block is an item with ``data=None``.
* **Fields are per item.** The spec's last-event-ID buffer persists across
  events; here ``id`` is the id field of this block only (None if it had
  none), which is what a proxy needs to forward it.
* **Event names are kept as sent.** ``event`` is None without an ``event``
  field; an empty name stays ``""`` rather than becoming ``"message"``.
* **Size is bounded.** A block (its field lines with their line ends, not
  the blank line) or a comment (without its line end) that grows past
  ``max_event_bytes`` raises :class:`SSEEventTooLarge`, so an upstream that
  never sends a blank line cannot exhaust memory. Items completed by the
  same :meth:`SSEDecoder.feed` call are lost with the exception.
* **Absurd retry values are ignored.** A ``retry`` of more digits than
  ``int()`` converts (``sys.get_int_max_str_digits()``) is ignored.
"""

from __future__ import annotations

import contextlib
import re
from typing import NamedTuple

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "SSEDecoder",
    "SSEError",
    "SSEEvent",
    "SSEEventTooLarge",
    "encode_event",
]

DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D
_COLON = 0x3A
_SPACE = 0x20
# Line ends of the spec: CRLF, lone CR, lone LF. Nothing else ends a line.
_LINE_END = re.compile(rb"\r\n?|\n")
_TEXT_LINE_END = re.compile(r"\r\n?|\n")


class SSEError(ValueError):
    """Base class of the errors this codec raises."""


class SSEEventTooLarge(SSEError):
    """An event (or comment) grew past the decoder's ``max_event_bytes``."""


class SSEEvent(NamedTuple):
    """One item of an event stream: an event block, or a comment line.

    ``data`` is None when the block had no data field; ``comment`` is set only
    for a comment line, which has no other field. ``raw`` is the item's exact
    bytes on the wire, terminator included. Immutable. A named tuple rather
    than a frozen dataclass: one is made per event on the gateway's hot path,
    and it is made about three times faster.
    """

    event: str | None = None
    data: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None
    raw: bytes = b""


# What SSEEvent(...) calls, without its Python-level __new__: for the hot path.
_new_event = tuple.__new__


def _decode(value: bytes) -> str:
    return value.decode("utf-8", "replace")


class SSEDecoder:
    """Incremental decoder: any chunking of the same bytes gives the same items.

    Not thread-safe; one decoder per stream. After :meth:`close`, or after it
    has raised :class:`SSEEventTooLarge`, it must not be fed again.
    """

    __slots__ = (
        "_at_start",
        "_block_parts",
        "_block_size",
        "_closed",
        "_data",
        "_event",
        "_has_fields",
        "_id",
        "_lf_joins_block",
        "_max_event_bytes",
        "_partial",
        "_retry",
        "_skip_lf",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be at least 1")
        self._max_event_bytes = max_event_bytes
        self._at_start = True  # a leading BOM may still arrive
        self._skip_lf = False  # the previous chunk ended in CR
        self._lf_joins_block = False  # ... and that CR ended a line of the open block
        self._closed = False
        self._partial = bytearray()  # bytes of a line whose end has not arrived
        self._reset_block()

    def _reset_block(self) -> None:
        self._block_parts: list[bytes] = []  # raw lines of the open block
        self._block_size = 0
        self._has_fields = False
        self._data: list[str] | None = None
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume ``chunk`` and return the items it completed, in stream order.

        Raises :class:`SSEEventTooLarge` if the open item passes the limit.
        """
        if self._closed:
            raise SSEError("feed() after close()")
        if not chunk:
            return []
        if (
            chunk.startswith(b"data: ")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.endswith(b"\n\n")
            and not (self._partial or self._has_fields or self._skip_lf or self._at_start)
            and len(chunk) - 2 < self._max_event_bytes
            and _CR not in chunk
        ):
            # The usual chunk, one whole ``data:`` event and nothing pending:
            # the item the rules below give, without scanning for it.
            return [_new_event(SSEEvent, (None, _decode(chunk[6:-2]), None, None, None, chunk))]
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if self._lf_joins_block:
                    # Keep the LF in the raw of the line it ends, as if the CRLF
                    # had come in one chunk; else ``raw`` would replay as a
                    # CRLF that swallows a following blank line.
                    self._block_parts[-1] += b"\n"
                    self._block_size += 1
                    if self._block_size > self._max_event_bytes:
                        raise SSEEventTooLarge(
                            f"an SSE event grew past {self._max_event_bytes} bytes without ending"
                        )
                if not chunk:
                    return []
        if self._partial and not self._at_start and _LF not in chunk and _CR not in chunk:
            # The pending line goes on: append, do not rescan, so that a long
            # line arriving in many chunks costs linear, not quadratic, time.
            self._partial += chunk
            self._check_pending()
            return []
        buffer = b"".join((self._partial, chunk)) if self._partial else chunk
        if self._at_start:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._partial = bytearray(buffer)  # could still become a BOM
                return []
            self._at_start = False
            if buffer.startswith(_BOM):
                buffer = buffer[len(_BOM) :]
        items: list[SSEEvent] = []
        pos = self._scan(buffer, items)
        if pos == len(buffer):  # the usual chunk: whole lines, nothing pending
            if self._partial:
                self._partial = bytearray()
            return items  # each line was checked against the limit as it was read
        self._partial = bytearray(buffer[pos:])
        self._check_pending()
        return items

    def _check_pending(self) -> None:
        """Raise if the line whose end has not arrived takes an item past the limit."""
        partial = self._partial
        if partial[:1] == b":":  # a comment stands alone: the open block does not count
            if len(partial) > self._max_event_bytes:
                raise SSEEventTooLarge(f"an SSE comment is over {self._max_event_bytes} bytes")
        elif self._block_size + len(partial) > self._max_event_bytes:
            raise SSEEventTooLarge(
                f"an SSE event grew past {self._max_event_bytes} bytes without ending"
            )

    def close(self) -> list[SSEEvent]:
        """End of stream: return a final item that lacked its blank line, if any.

        Deviation from the spec, which discards it: see the module docstring.
        A final comment that lacks its line end comes out after the open block,
        not before it: its ``raw`` has no line end, so only that order replays.
        """
        if self._closed:
            return []
        self._closed = True
        items: list[SSEEvent] = []
        last_comment: list[SSEEvent] = []
        if self._partial:
            line = bytes(self._partial)
            self._partial = bytearray()
            self._line(line, line, last_comment)
        if self._has_fields:
            self._dispatch(items)
        return items + last_comment

    def _scan(self, buffer: bytes, items: list[SSEEvent]) -> int:
        """Handle every complete line of ``buffer``; return where the rest starts."""
        pos = 0
        if _CR not in buffer:
            # The common case: LF-only line ends, found without a regex.
            find = buffer.find
            while True:
                if not self._has_fields and (blank := find(b"\n\n", pos)) >= 0:
                    # A whole block starts here: the usual one (a data line, maybe
                    # after an event line) is decoded at once, not line by line.
                    item = self._simple_block(buffer, pos, blank)
                    if item is not None:
                        items.append(item)
                        pos = blank + 2
                        if pos == len(buffer):  # the usual chunk: one whole event
                            return pos
                        continue
                end = find(b"\n", pos)
                if end < 0:
                    return pos
                self._line(buffer[pos:end], buffer[pos : end + 1], items)
                pos = end + 1
        last = 0
        for match in _LINE_END.finditer(buffer):
            start, end = match.span()
            self._line(buffer[pos:start], buffer[pos:end], items)
            last, pos = pos, end
        if pos and buffer[pos - 1] == _CR and pos == len(buffer):
            self._skip_lf = True  # an LF at the start of the next chunk ends this CR
            # Unless that last line was a comment or a blank line (both done with).
            self._lf_joins_block = self._has_fields and buffer[last] != _COLON
        return pos

    def _simple_block(self, buffer: bytes, start: int, blank: int) -> SSEEvent | None:
        """The item of ``buffer[start:blank]`` if it is one ``data: `` line, maybe after one
        ``event: `` line, within the size limit; else None, and the caller reads it line by
        line. The same item the line-by-line rules give: only a shortcut for the usual case.
        """
        block = buffer[start:blank]
        if len(block) >= self._max_event_bytes:  # field lines with their LFs: len + 1
            return None
        event = None
        newline = block.find(b"\n")
        if newline >= 0:
            head, block = block[:newline], block[newline + 1 :]
            if not head.startswith(b"event: ") or b"\n" in block:
                return None
            event = _decode(head[7:])
        if not block.startswith(b"data: "):
            return None
        return SSEEvent(event=event, data=_decode(block[6:]), raw=buffer[start : blank + 2])

    def _line(self, line: bytes, raw: bytes, items: list[SSEEvent]) -> None:
        if not line:
            if self._has_fields:
                self._block_parts.append(raw)
                self._dispatch(items)
            return
        if line[0] == _COLON:
            if len(line) > self._max_event_bytes:
                raise SSEEventTooLarge(f"an SSE comment is over {self._max_event_bytes} bytes")
            text = line[2:] if len(line) > 1 and line[1] == _SPACE else line[1:]
            items.append(SSEEvent(comment=_decode(text), raw=raw))
            return
        self._has_fields = True
        self._block_parts.append(raw)
        self._block_size += len(raw)
        if self._block_size > self._max_event_bytes:
            raise SSEEventTooLarge(
                f"an SSE event grew past {self._max_event_bytes} bytes without ending"
            )
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            start = colon + 2 if colon + 1 < len(line) and line[colon + 1] == _SPACE else colon + 1
            value = line[start:]
        if name == b"data":
            if self._data is None:
                self._data = [_decode(value)]
            else:
                self._data.append(_decode(value))
        elif name == b"event":
            self._event = _decode(value)
        elif name == b"id":
            if b"\0" not in value:
                self._id = _decode(value)
        elif name == b"retry" and value.isdigit():  # bytes.isdigit(): ASCII digits only
            # int() refuses more than sys.get_int_max_str_digits() digits; such a
            # retry (longer than the universe is old) is ignored, never raised on.
            with contextlib.suppress(ValueError):
                self._retry = int(value.lstrip(b"0") or b"0")

    def _dispatch(self, items: list[SSEEvent]) -> None:
        parts = self._block_parts
        items.append(
            SSEEvent(
                event=self._event,
                data=None if self._data is None else "\n".join(self._data),
                id=self._id,
                retry=self._retry,
                raw=parts[0] if len(parts) == 1 else b"".join(parts),
            )
        )
        self._reset_block()


def _check_single_line(name: str, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise ValueError(f"an SSE {name} cannot contain a line break: {value!r}")


def encode_event(
    *,
    data: str | None = None,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
    comment: str | None = None,
) -> bytes:
    """Return the wire bytes of one item, ending in LF line ends.

    With fields, the result ends with the blank line that dispatches it; a
    comment alone is one ``:`` line. Multi-line ``data`` becomes one ``data:``
    line per line (CR and CRLF inside data are line breaks too, since SSE
    cannot carry them). Raises ValueError for a line break in ``event``,
    ``id`` or ``comment``, a NUL in ``id``, a negative ``retry``, or nothing
    to encode.
    """
    out: list[str] = []
    if comment is not None:
        _check_single_line("comment", comment)
        out.append(f": {comment}\n" if comment else ":\n")
    fields = len(out)
    if event is not None:
        _check_single_line("event name", event)
        out.append(f"event: {event}\n")
    if id is not None:
        _check_single_line("id", id)
        if "\0" in id:
            raise ValueError("an SSE id cannot contain NUL (clients ignore it)")
        out.append(f"id: {id}\n")
    if retry is not None:
        if retry < 0:
            raise ValueError("an SSE retry must not be negative")
        out.append(f"retry: {retry}\n")
    if data is not None:
        out.extend(f"data: {line}\n" for line in _TEXT_LINE_END.split(data))
    if len(out) > fields:
        out.append("\n")
    elif not out:
        raise ValueError("encode_event() needs at least one field or a comment")
    return "".join(out).encode()
