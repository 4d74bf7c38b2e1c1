"""Property tests of the sans-IO SSE codec (:mod:`trio_gateway.sse`).

Budget (:func:`tests.helpers.fuzz_settings`, applied per test):

* ``TRIO_GATEWAY_FUZZ`` unset: 200 examples per property; the whole module
  runs in a few seconds.
* ``TRIO_GATEWAY_FUZZ=long``: 20 000 examples per property, and
  :func:`test_fuzz_random_bytes` runs 100x longer.

The oracle for "what should come out" is :func:`reference_decode`, a short
whole-input model of the documented rules (regex line split, then one pass).
It shares no code with the incremental decoder, so a chunking or state bug in
the decoder shows up as a difference.
"""

from __future__ import annotations

import itertools
import random
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.helpers import FUZZ_LONG, fuzz_seed, fuzz_settings
from trio_gateway.sse import (
    DEFAULT_MAX_EVENT_BYTES,
    SSEDecoder,
    SSEEvent,
    SSEEventTooLarge,
    encode_event,
)

PROFILE = fuzz_settings(200, 20_000)

BOM = b"\xef\xbb\xbf"
LINE_ENDS = [b"\n", b"\r\n", b"\r"]


# -- helpers -----------------------------------------------------------------


def decode(
    chunks: Iterable[bytes], *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> list[SSEEvent]:
    decoder = SSEDecoder(max_event_bytes=max_event_bytes)
    items: list[SSEEvent] = []
    for chunk in chunks:
        items += decoder.feed(chunk)
    return items + decoder.close()


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


def fields(item: SSEEvent) -> tuple[object, ...]:
    return (item.event, item.data, item.id, item.retry, item.comment)


def assert_same_up_to_split_crlf(whole: Sequence[SSEEvent], chunked: Sequence[SSEEvent]) -> None:
    """Chunked items equal whole-input items, except that ``raw`` of a comment
    or of an event ended by its blank line lacks the LF of a CRLF split across
    chunks after that item's last CR (the item was returned at the CR)."""
    assert [fields(i) for i in chunked] == [fields(i) for i in whole]
    for w, c in zip(whole, chunked, strict=True):
        if w.raw != c.raw:
            assert w.raw == c.raw + b"\n"
            assert c.comment is not None or c.raw.endswith((b"\n\r", b"\r\r")), c


_REF_LINE = re.compile(rb"\r\n|\r|\n")


def _ref_lines(data: bytes) -> list[tuple[bytes, bytes]]:
    """(content, raw) of each line of ``data`` (leading BOM already removed);
    the last may lack its line end."""
    lines: list[tuple[bytes, bytes]] = []
    pos = 0
    for m in _REF_LINE.finditer(data):
        lines.append((data[pos : m.start()], data[pos : m.end()]))
        pos = m.end()
    if pos < len(data):
        lines.append((data[pos:], data[pos:]))
    return lines


def reference_decode(data: bytes, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> list[SSEEvent]:
    """Whole-input model of the documented rules; raises SSEEventTooLarge."""
    data = data.removeprefix(BOM)
    out: list[SSEEvent] = []
    last_comment: list[SSEEvent] = []  # a final comment without line end goes last
    block: list[bytes] = []
    data_lines: list[str] | None = None
    event: str | None = None
    id_: str | None = None
    retry: int | None = None
    lines = _ref_lines(data)
    for n, (content, raw) in enumerate(lines):
        if content.startswith(b":"):
            if len(content) > max_event_bytes:
                raise SSEEventTooLarge("comment")
            text = content[1:].removeprefix(b" ").decode("utf-8", "replace")
            unterminated = n == len(lines) - 1 and raw == content
            (last_comment if unterminated else out).append(SSEEvent(comment=text, raw=raw))
            continue
        block.append(raw)
        if content == b"":
            if len(block) > 1:
                out.append(_ref_event(block, data_lines, event, id_, retry))
            block, data_lines, event, id_, retry = [], None, None, None, None
            continue
        if sum(map(len, block)) > max_event_bytes:
            raise SSEEventTooLarge("event")
        name, colon, value = content.partition(b":")
        if colon:
            value = value.removeprefix(b" ")
        text = value.decode("utf-8", "replace")
        if name == b"data":
            data_lines = [*(data_lines or []), text]
        elif name == b"event":
            event = text
        elif name == b"id" and b"\x00" not in value:
            id_ = text
        elif name == b"retry" and re.fullmatch(rb"[0-9]+", value):
            digits = value.lstrip(b"0") or b"0"
            max_digits = sys.get_int_max_str_digits()
            if max_digits == 0 or len(digits) <= max_digits:
                retry = int(digits)
    if block:
        out.append(_ref_event(block, data_lines, event, id_, retry))
    return out + last_comment


def _ref_event(
    block: list[bytes],
    data_lines: list[str] | None,
    event: str | None,
    id_: str | None,
    retry: int | None,
) -> SSEEvent:
    data = None if data_lines is None else "\n".join(data_lines)
    return SSEEvent(event=event, data=data, id=id_, retry=retry, raw=b"".join(block))


def replay_exception_cr_comment_lf(data: bytes) -> bool:
    """The documented case (a) where replaying joined ``raw`` cannot work: a
    block whose last field line ends in a lone CR, then comment lines, then
    the blank line as a lone LF."""
    if data.startswith(BOM):
        data = data[len(BOM) :]
    state = "none"  # "cr": last field line ended in CR; "cr+comment": comments followed
    for content, raw in _ref_lines(data):
        if content == b"":
            if state == "cr+comment" and raw == b"\n":
                return True
            state = "none"
        elif content.startswith(b":"):
            if state in ("cr", "cr+comment"):
                state = "cr+comment"
        else:
            state = "cr" if raw.endswith(b"\r") else "field"
    return False


def assert_replays(data: bytes, items: Sequence[SSEEvent]) -> None:
    """The raw contract, with its two documented exceptions."""
    joined = b"".join(item.raw for item in items)
    prefix = BOM if joined.startswith(BOM) else b""  # exception (b)
    if not replay_exception_cr_comment_lf(data):  # exception (a)
        assert decode([prefix + joined]) == list(items)
    for item in items:  # every item's own raw always replays alone
        alone = BOM + item.raw if item.raw.startswith(BOM) else item.raw
        assert decode([alone]) == [item]


# -- strategies --------------------------------------------------------------

_SPECIAL = ["😀", "é", "€", "\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\ufeff", "\x00", ":", " "]
_text = st.text(
    alphabet=st.characters(exclude_characters="\r\n", codec="utf-8") | st.sampled_from(_SPECIAL),
    max_size=12,
)
_junk = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_value = st.one_of(
    _text.map(str.encode),
    _junk,
    st.sampled_from([b"", b"1", b"007", b"1a", "\u0661".encode(), b"-1", b"a\x00b"]),
)
_name = st.one_of(
    st.sampled_from([b"data", b"data", b"data", b"event", b"id", b"retry", b"foo", b"Data"]),
    _junk.filter(lambda b: b != b"" and b":" not in b and not b.startswith(BOM)),
)
_line_end = st.sampled_from(LINE_ENDS)


@st.composite
def field_line(draw: st.DrawFn) -> bytes:
    name = draw(_name)
    form = draw(st.sampled_from(["bare", "colon", "colon-space"]))
    if form == "bare":
        return name
    return name + (b": " if form == "colon-space" else b":") + draw(_value)


@st.composite
def comment_line(draw: st.DrawFn) -> bytes:
    return b":" + draw(_value)


@st.composite
def sse_lines(
    draw: st.DrawFn, *, comments_in_events: bool, stray_blank_lines: bool
) -> list[tuple[str, bytes]]:
    """A stream as (kind, raw line) pairs, kind in field/comment/blank; every
    line has its line end except perhaps the very last."""
    lines: list[tuple[str, bytes]] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["event", "event", "comment", "blank"]))
        if kind == "comment":
            lines.append(("comment", draw(comment_line()) + draw(_line_end)))
        elif kind == "blank":
            if stray_blank_lines:
                lines.append(("blank", draw(_line_end)))
        else:
            for _ in range(draw(st.integers(1, 4))):
                if comments_in_events and draw(st.booleans()):
                    lines.append(("comment", draw(comment_line()) + draw(_line_end)))
                lines.append(("field", draw(field_line()) + draw(_line_end)))
            lines.append(("blank", draw(_line_end)))
    if draw(st.booleans()):  # a final block without its blank line
        for _ in range(draw(st.integers(1, 3))):
            lines.append(("field", draw(field_line()) + draw(_line_end)))
            if comments_in_events and draw(st.booleans()):
                lines.append(("comment", draw(comment_line()) + draw(_line_end)))
    for i in range(1, len(lines)):
        # A lone-LF blank line right after a line ending in CR would be read
        # as the second half of a CRLF, not as a blank line: make it CRLF.
        if lines[i] == ("blank", b"\n") and lines[i - 1][1].endswith(b"\r"):
            lines[i] = ("blank", b"\r\n")
    cut_last_line_end = draw(st.booleans())
    if lines and cut_last_line_end:  # the last line without its line end
        kind, raw = lines[-1]
        if kind != "blank":
            lines[-1] = (kind, _REF_LINE.sub(b"", raw))
    return lines


@st.composite
def sse_stream(draw: st.DrawFn) -> bytes:
    """Realistic-ish streams, sometimes with arbitrary bytes mixed in."""
    body = b"".join(
        raw for _, raw in draw(sse_lines(comments_in_events=True, stray_blank_lines=True))
    )
    if draw(st.integers(0, 4)) == 0:
        body = BOM + body
    if draw(st.integers(0, 4)) == 0:
        junk = draw(st.binary(max_size=40))
        at = draw(st.integers(0, len(body)))
        body = body[:at] + junk + body[at:]
    return body


@st.composite
def stream_and_chunks(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(sse_stream())
    if draw(st.integers(0, 5)) == 0:
        return data, [data[i : i + 1] for i in range(len(data))]
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    # Favour the cut that matters most: between a CR and an LF.
    crlf = [m.start() + 1 for m in re.finditer(rb"\r\n", data)]
    if crlf:
        cuts += draw(st.lists(st.sampled_from(crlf), max_size=3))
    return data, split_at(data, cuts)


@st.composite
def stream_cut_after_blank_lines(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A stream cut after every LF LF: chunks of whole blocks, as providers flush them.

    Most of them take the decoder's shortcut for a chunk that is one whole
    ``data:`` event with nothing pending.
    """
    data = draw(sse_stream())
    return data, split_at(data, [m.end() for m in re.finditer(rb"\n\n", data)])


# -- properties of the decoder ------------------------------------------------


@PROFILE
@given(stream_cut_after_blank_lines())
def test_chunks_of_whole_blocks_give_the_same_items(case: tuple[bytes, list[bytes]]) -> None:
    data, chunks = case
    assert b"".join(chunks) == data
    assert_same_up_to_split_crlf(reference_decode(data), decode(chunks))


@PROFILE
@given(stream_and_chunks())
def test_any_chunking_gives_the_same_items(case: tuple[bytes, list[bytes]]) -> None:
    data, chunks = case
    assert b"".join(chunks) == data
    whole = decode([data])
    assert whole == reference_decode(data)
    assert_same_up_to_split_crlf(whole, decode(chunks))


@PROFILE
@given(stream_and_chunks())
def test_replaying_raw_gives_the_same_items(case: tuple[bytes, list[bytes]]) -> None:
    data, chunks = case
    # Chunked items differ from whole ones only by LFs dropped at item ends,
    # which never change how the joined raw parses.
    for pieces in ([data], chunks, [data[i : i + 1] for i in range(len(data))]):
        assert_replays(data, decode(pieces))


@st.composite
def plain_stream_and_cuts(draw: st.DrawFn) -> tuple[list[tuple[str, bytes]], bytes, list[int]]:
    lines = draw(sse_lines(comments_in_events=False, stray_blank_lines=False))
    bom = BOM if draw(st.booleans()) else b""
    data = bom + b"".join(raw for _, raw in lines)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=10))
    crlf = [m.start() + 1 for m in re.finditer(rb"\r\n", data)]
    if crlf:
        cuts += draw(st.lists(st.sampled_from(crlf), max_size=4))
    return lines, data, sorted({c for c in cuts if 0 < c < len(data)})


@PROFILE
@given(plain_stream_and_cuts())
def test_raw_is_the_input(case: tuple[list[tuple[str, bytes]], bytes, list[int]]) -> None:
    """Inputs: standalone comment lines and event blocks (field lines then one
    blank line), all three line ends, maybe a leading BOM, maybe a final block
    without its blank line and a last line without its line end. No comment
    inside a block and no blank line that ends no block: the two things whose
    bytes no item's raw holds (or holds out of order).

    Then the joined raw is the input minus its leading BOM; when chunked, also
    minus each LF of a CRLF that ends a comment or a blank line and starts a
    chunk (the item was already returned at the CR)."""
    lines, data, cuts = case
    body = data.removeprefix(BOM)
    assert b"".join(item.raw for item in decode([data])) == body

    offset = len(data) - len(body)
    dropped: set[int] = set()
    for kind, raw in lines:
        lf_at = offset + len(raw) - 1
        if kind != "field" and raw.endswith(b"\r\n") and lf_at in cuts:
            dropped.add(lf_at - (len(data) - len(body)))
        offset += len(raw)
    expected = bytes(b for i, b in enumerate(body) if i not in dropped)
    chunked = decode(split_at(data, cuts))
    assert b"".join(item.raw for item in chunked) == expected


def boundary_limits(data: bytes) -> list[int]:
    """Limits next to the sizes that matter: each line with and without its
    line end, and each running block size, minus one, exact and plus one."""
    sizes: set[int] = set()
    block = 0
    for content, raw in _ref_lines(data.removeprefix(BOM)):
        block = 0 if content == b"" else block + len(raw)
        sizes |= {len(content), len(raw), block}
    return sorted({n + d for n in sizes for d in (-1, 0, 1) if n + d >= 1} or {1})


@PROFILE
@given(stream_and_chunks(), st.integers(1, 200))
def test_size_limit_is_chunking_independent(
    case: tuple[bytes, list[bytes]], random_limit: int
) -> None:
    data, chunks = case
    for limit in [random_limit, *boundary_limits(data)]:
        try:
            expected = reference_decode(data, limit)
        except SSEEventTooLarge:
            expected = None
        for pieces in ([data], chunks):
            decoder = SSEDecoder(max_event_bytes=limit)
            got: list[SSEEvent] = []
            try:
                for piece in pieces:
                    got += decoder.feed(piece)
                got += decoder.close()
            except SSEEventTooLarge:
                assert expected is None, f"raised below the limit {limit}"
                continue
            assert expected is not None, f"did not raise past the limit {limit}"
            assert_same_up_to_split_crlf(expected, got)


# -- encode_event round trips ---------------------------------------------------

_one_line = st.text(
    alphabet=st.characters(exclude_characters="\r\n", codec="utf-8") | st.sampled_from(_SPECIAL)
)


# Data with many line breaks of all three kinds among any other characters.
_multi_line = st.lists(_one_line | st.sampled_from(["\r", "\n", "\r\n"]), max_size=6).map("".join)


@PROFILE
@given(
    data=st.none() | _multi_line,
    event=st.none() | _one_line,
    id=st.none() | _one_line.filter(lambda s: "\x00" not in s),
    retry=st.none() | st.integers(min_value=0),
    comment=st.none() | _one_line,
    chunk=st.integers(1, 64),
)
def test_encode_then_decode_round_trips(
    data: str | None,
    event: str | None,
    id: str | None,
    retry: int | None,
    comment: str | None,
    chunk: int,
) -> None:
    assume(any(v is not None for v in (data, event, id, retry, comment)))
    wire = encode_event(data=data, event=event, id=id, retry=retry, comment=comment)
    expected: list[tuple[object, ...]] = []
    if comment is not None:
        expected.append((None, None, None, None, comment))
    if (data, event, id, retry) != (None, None, None, None):
        text = None if data is None else re.sub(r"\r\n?", "\n", data)
        expected.append((event, text, id, retry, None))
    for pieces in ([wire], [wire[i : i + chunk] for i in range(0, len(wire), chunk)]):
        items = decode(pieces)
        assert [fields(i) for i in items] == expected
        assert b"".join(i.raw for i in items) == wire
        assert all(i.raw.endswith(b"\n") for i in items)


_BAD = {
    "event": st.sampled_from(["\r", "\n", "a\r\nb", "x\n"]),
    "id": st.sampled_from(["\r", "\n", "a\x00b", "\x00"]),
    "comment": st.sampled_from(["\r", "\n", "a\nb", "\r\n"]),
    "retry": st.integers(max_value=-1),
}


@PROFILE
@given(
    data=st.none() | st.text(),
    event=st.none() | _one_line,
    id=st.none() | _one_line.filter(lambda s: "\x00" not in s),
    retry=st.none() | st.integers(min_value=0),
    comment=st.none() | _one_line,
    bad=st.none() | st.sampled_from(sorted(_BAD)),
    draw=st.data(),
)
def test_encode_refuses_exactly_what_it_cannot_encode(
    data: str | None,
    event: str | None,
    id: str | None,
    retry: int | None,
    comment: str | None,
    bad: str | None,
    draw: st.DataObject,
) -> None:
    kwargs: dict[str, Any] = {"data": data, "event": event, "id": id, "retry": retry}
    kwargs["comment"] = comment
    if bad is not None:  # exactly one invalid value among valid ones
        kwargs[bad] = draw.draw(_BAD[bad], label=bad)
    if bad is None and all(v is None for v in kwargs.values()):
        with pytest.raises(ValueError, match="at least one field"):
            encode_event(**kwargs)
    elif bad is not None:
        with pytest.raises(ValueError, match=bad.replace("event", "event name")):
            encode_event(**kwargs)
    else:
        wire = encode_event(**kwargs)
        assert b"".join(i.raw for i in decode([wire])) == wire


@PROFILE
@given(st.lists(st.tuples(st.none() | _one_line, _one_line), min_size=1, max_size=8))
def test_encoded_events_concatenate(pairs: list[tuple[str | None, str]]) -> None:
    wire = b"".join(encode_event(event=e, data=d) for e, d in pairs)
    assert [(i.event, i.data) for i in decode([wire])] == pairs
    assert [(i.event, i.data) for i in decode([wire[i : i + 1] for i in range(len(wire))])] == pairs


# -- random bytes ----------------------------------------------------------------

_TOKENS = [
    b"\n",
    b"\n",
    b"\r",
    b"\r",
    b"\r\n",
    b":",
    b":",
    b" ",
    b"data",
    b"data",
    b"event",
    b"id",
    b"retry",
    b"0",
    b"7",
    b"\x00",
    BOM,
    "😀".encode(),
    "\u2028".encode(),
    b"\xe2\x82",
    b"\xff",
]


def _random_stream(rng: random.Random) -> bytes:
    parts: list[bytes] = []
    for _ in range(rng.randint(0, 120)):
        if rng.random() < 0.2:
            parts.append(bytes([rng.randrange(256)]))
        else:
            parts.append(rng.choice(_TOKENS))
    return b"".join(parts)


def _random_chunks(rng: random.Random, data: bytes) -> list[bytes]:
    mode = rng.randrange(3)
    if mode == 0:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = [rng.randint(0, len(data)) for _ in range(rng.randint(0, 20))]
    if mode == 1:  # every CR|LF boundary
        cuts += [m.start() + 1 for m in re.finditer(rb"\r\n", data)]
    return split_at(data, cuts)


@pytest.mark.slow
def test_fuzz_random_bytes() -> None:
    """Random byte soup, rich in CR, LF and colons, under random chunkings and
    random limits: the decoder agrees with the reference model, every chunking
    agrees with the whole input, raw replays, and nothing but
    SSEEventTooLarge is ever raised (and only past the limit)."""
    seed = fuzz_seed(20_240_611)
    rng = random.Random(seed)
    rounds = 150_000 if FUZZ_LONG else 1_500
    for n in range(rounds):
        data = _random_stream(rng)
        limit = rng.choice([DEFAULT_MAX_EVENT_BYTES, rng.randint(1, 64)])
        try:
            try:
                expected: list[SSEEvent] | None = reference_decode(data, limit)
            except SSEEventTooLarge:
                expected = None
            for chunks in ([data], _random_chunks(rng, data), _random_chunks(rng, data)):
                try:
                    got = decode(chunks, max_event_bytes=limit)
                except SSEEventTooLarge:
                    assert expected is None, "raised below the limit"
                    continue
                assert expected is not None, "did not raise past the limit"
                if chunks == [data]:
                    assert got == expected
                else:
                    assert_same_up_to_split_crlf(expected, got)
                assert_replays(data, got)
        except AssertionError as exc:
            raise AssertionError(f"seed={seed} round={n} data={data!r} limit={limit}") from exc
