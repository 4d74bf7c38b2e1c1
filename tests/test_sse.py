"""Example-based tests of the sans-IO SSE codec (:mod:`trio_gateway.sse`).

Rules for this module, after h11's tests:

* Every stream that matters is fed three ways: whole, one byte at a time, and
  split in two at every offset; all must give the same items.
* Expected items are written out in full (``SSEEvent(...)`` including
  ``raw``), not recomputed with the code under test.
* Where we deviate from the WHATWG parsing rules on purpose, the test name
  says so and the expected value is the documented deviation.

The example streams in ``tests/data`` are copies of the shared reference
examples, so these tests do not depend on anything outside the repository.
The hypothesis properties live in ``test_sse_properties.py``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from trio_gateway.sse import (
    DEFAULT_MAX_EVENT_BYTES,
    SSEDecoder,
    SSEError,
    SSEEvent,
    SSEEventTooLarge,
    encode_event,
)

DATA_DIR = Path(__file__).parent / "data"
EXAMPLES = ["chat.sse", "messages.sse", "responses.sse"]
BOM = b"\xef\xbb\xbf"


# -- helpers -----------------------------------------------------------------


def decode(
    chunks: Iterable[bytes], *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> list[SSEEvent]:
    """Feed ``chunks`` in order to a fresh decoder, then close it."""
    decoder = SSEDecoder(max_event_bytes=max_event_bytes)
    items: list[SSEEvent] = []
    for chunk in chunks:
        items += decoder.feed(chunk)
    return items + decoder.close()


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def replay(items: Sequence[SSEEvent]) -> list[SSEEvent]:
    return decode([b"".join(item.raw for item in items)])


def same_items_up_to_split_crlf(whole: Sequence[SSEEvent], chunked: Sequence[SSEEvent]) -> bool:
    """``chunked`` equals ``whole``, except that a comment or an event whose
    last line end was a CRLF split across two chunks lacks that LF in ``raw``
    (the item was returned at the CR, before the LF arrived)."""
    if len(whole) != len(chunked):
        return False
    for w, c in zip(whole, chunked, strict=True):
        if (w.event, w.data, w.id, w.retry, w.comment) != (
            c.event,
            c.data,
            c.id,
            c.retry,
            c.comment,
        ):
            return False
        if w.raw == c.raw:
            continue
        ends_blank = c.raw.endswith((b"\n\r", b"\r\r"))
        if not (w.raw == c.raw + b"\n" and (c.comment is not None or ends_blank)):
            return False
    return True


def decode_every_way(data: bytes) -> list[SSEEvent]:
    """Decode ``data`` whole, byte by byte and split at every offset; return
    the items after asserting that all ways agree."""
    whole = decode([data])
    by_byte = decode(bytewise(data))
    if b"\r\n" in data:
        assert same_items_up_to_split_crlf(whole, by_byte)
    else:
        assert by_byte == whole
    for cut in range(len(data) + 1):
        chunked = decode([data[:cut], data[cut:]])
        if cut > 0 and data[cut - 1 : cut + 1] == b"\r\n":
            assert same_items_up_to_split_crlf(whole, chunked), cut
        else:
            assert chunked == whole, cut
    return whole


def ev(
    raw: bytes,
    *,
    data: str | None = None,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> SSEEvent:
    return SSEEvent(event=event, data=data, id=id, retry=retry, raw=raw)


def cm(comment: str, raw: bytes) -> SSEEvent:
    return SSEEvent(comment=comment, raw=raw)


def example(name: str) -> bytes:
    return (DATA_DIR / name).read_bytes()


# -- the example streams -----------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_stream_whole_bytewise_and_every_split_agree(name: str) -> None:
    data = example(name)
    whole = decode([data])
    assert decode(bytewise(data)) == whole
    for cut in range(len(data) + 1):
        assert decode([data[:cut], data[cut:]]) == whole, cut
    # The examples are LF-only and end in a blank line: raw covers every byte
    # except blank lines that end no block (chat.sse has one after its comment).
    expected_raw = data.replace(b"PROCESSING\n\n", b"PROCESSING\n")
    assert b"".join(item.raw for item in whole) == expected_raw
    assert replay(whole) == whole


# A chunk that is one whole ``data:`` event, with nothing pending, takes the
# decoder's shortcut; each case below puts such a chunk where the shortcut must
# not change the items: after a partial line, a CR, an open block or a BOM.
WHOLE_EVENT = b'data: {"a":1}\n\n'


@pytest.mark.parametrize(
    "chunks",
    [
        [WHOLE_EVENT, WHOLE_EVENT],
        [b"data: {", WHOLE_EVENT],  # the chunk ends a pending line
        [b"data: x\r", b"\n" + WHOLE_EVENT[:-1], b"\n"],
        [b"data: x\r", WHOLE_EVENT],  # the LF a CR waits for is not there
        [b"event: e\n", WHOLE_EVENT],  # an open block takes the data line
        [b"id: 7\n\n", WHOLE_EVENT],
        [BOM, WHOLE_EVENT],  # still at the start of the stream
        [WHOLE_EVENT, BOM + WHOLE_EVENT],  # a BOM past the start is a field name
        [b"data: \n\n", b"data:\n\n", b"data: \xff\n\n"],
        [b"data: a\r\n\r\n", WHOLE_EVENT.replace(b"1", b"\r")],
        [b": c\n\n", WHOLE_EVENT, b"data: a\ndata: b\n\n"],
    ],
)
def test_a_whole_event_chunk_gives_the_items_of_any_other_split(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    expected = decode([data])  # one buffer: a stream's first chunk never takes the shortcut
    assert decode(chunks) == expected
    if b"\r" not in data:  # bytewise, a CR LF split apart keeps only the CR in raw
        assert decode(bytewise(data)) == expected


@pytest.mark.parametrize("size", [999, 1000, 1001])
def test_a_whole_event_chunk_meets_the_size_limit_as_lines_do(size: int) -> None:
    # A block of one data line counts its LF: the line may be max - 1 bytes.
    # The first chunk is a comment: the stream's first chunk never takes the shortcut.
    first, chunk = b": start\n\n", b"data: " + b"x" * (size - 6) + b"\n\n"
    if size >= 1000:
        with pytest.raises(SSEEventTooLarge, match="grew past 1000 bytes"):
            decode([first, chunk], max_event_bytes=1000)
        with pytest.raises(SSEEventTooLarge, match="grew past 1000 bytes"):
            decode(bytewise(first + chunk), max_event_bytes=1000)
    else:
        items = decode([first, chunk], max_event_bytes=1000)
        assert items[1:] == [SSEEvent(data="x" * 993, raw=chunk)]


def test_example_chat_fields() -> None:
    items = decode([example("chat.sse")])
    assert items[0] == cm("OPENROUTER PROCESSING", b": OPENROUTER PROCESSING\n")
    events = items[1:]
    assert len(events) == 9
    assert all(e.event is None and e.id is None and e.retry is None for e in events)
    assert events[-1] == ev(b"data: [DONE]\n\n", data="[DONE]")
    chunks = [json.loads(e.data or "") for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == "Hello world, this is"
    assert chunks[-1]["usage"]["total_tokens"] == 342
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_example_messages_event_names() -> None:
    items = decode([example("messages.sse")])
    names = [item.event for item in items]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    for item in items:
        assert item.comment is None
        assert json.loads(item.data or "")["type"] == item.event
    assert items[2] == ev(
        b'event: ping\ndata: {"type":"ping"}\n\n', event="ping", data='{"type":"ping"}'
    )


def test_example_responses_event_names() -> None:
    items = decode([example("responses.sse")])
    assert [item.event for item in items] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.completed",
    ]
    payloads = [json.loads(item.data or "") for item in items]
    assert [p["sequence_number"] for p in payloads] == list(range(11))
    assert all(p["type"] == item.event for p, item in zip(payloads, items, strict=True))
    assert payloads[-1]["response"]["usage"]["total_tokens"] == 47


# -- line ends ---------------------------------------------------------------


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_each_line_end(nl: bytes) -> None:
    lines = [
        b": hi",
        b"event: e",
        b"data: a",
        b"data: b",
        b"id: 1",
        b"retry: 5",
        b"",
        b"data: c",
        b"",
    ]
    data = nl.join(lines) + nl
    assert decode_every_way(data) == [
        cm("hi", b": hi" + nl),
        ev(nl.join(lines[1:7]) + nl, event="e", data="a\nb", id="1", retry=5),
        ev(b"data: c" + nl + nl, data="c"),
    ]


def test_mixed_line_ends() -> None:
    data = b"data: a\r\ndata: b\rdata: c\n\r\n: x\r\r\ndata: d\n\r"
    assert decode_every_way(data) == [
        ev(b"data: a\r\ndata: b\rdata: c\n\r\n", data="a\nb\nc"),
        cm("x", b": x\r"),
        ev(b"data: d\n\r", data="d"),
    ]


def test_lone_cr_then_lf_in_one_chunk_is_one_line_end() -> None:
    # In one chunk CR LF is a single line end, never a line end plus a blank line.
    assert decode([b"data: a\r\ndata: b\r\n\r\n"]) == [
        ev(b"data: a\r\ndata: b\r\n\r\n", data="a\nb")
    ]


def test_cr_cr_is_two_line_ends() -> None:
    assert decode([b"data: a\r\rdata: b\r\r"]) == [
        ev(b"data: a\r\r", data="a"),
        ev(b"data: b\r\r", data="b"),
    ]


def test_crlf_split_after_blank_line_event_comes_at_the_cr() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\n\r") == [ev(b"data: x\r\n\r", data="x")]
    # The LF that completes the CRLF is dropped: it starts no blank line.
    assert decoder.feed(b"\ndata: y\r\n\r\n") == [ev(b"data: y\r\n\r\n", data="y")]
    assert decoder.close() == []


def test_crlf_split_after_field_line_lf_joins_raw() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    # The LF finishes "data: x\r\n"; the next LF is the blank line.
    assert decoder.feed(b"\n\n") == [ev(b"data: x\r\n\n", data="x")]
    assert decoder.close() == []
    assert decode([b"data: x\r\n\n"]) == [ev(b"data: x\r\n\n", data="x")]


def test_crlf_split_after_comment_lf_is_dropped() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": c\r") == [cm("c", b": c\r")]
    assert decoder.feed(b"\ndata: y\n\n") == [ev(b"data: y\n\n", data="y")]


def test_crlf_split_after_comment_inside_event_lf_is_dropped() -> None:
    # The CR ended the comment, not the block's line: the LF joins no raw.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n: c\r") == [cm("c", b": c\r")]
    assert decoder.feed(b"\n\n") == [ev(b"data: x\n\n", data="x")]
    assert decode([b"data: x\n: c\r\n\n"]) == [cm("c", b": c\r\n"), ev(b"data: x\n\n", data="x")]


def test_lf_only_chunk_after_cr_chunk() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"\n") == []  # completes the CRLF, nothing else
    assert decoder.feed(b"\n") == [ev(b"data: x\r\n\n", data="x")]  # a real blank line
    assert decoder.close() == []


def test_empty_chunk_between_cr_and_lf_keeps_the_pairing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\r") == [ev(b"data: x\r\r", data="x")]
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: y\n") == []
    assert decoder.close() == [ev(b"data: y\n", data="y")]


def test_cr_chunk_then_non_lf_chunk() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"data: y\r") == []
    assert decoder.feed(b"\r") == [ev(b"data: x\rdata: y\r\r", data="x\ny")]


def test_lf_is_only_dropped_at_the_start_of_the_next_chunk() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"data: y\n") == []
    assert decoder.feed(b"\n") == [ev(b"data: x\rdata: y\n\n", data="x\ny")]


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
@pytest.mark.parametrize(
    "char",
    ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e"],
    ids=["LS", "PS", "NEL", "FF", "VT", "FS", "GS", "RS"],
)
def test_only_cr_and_lf_end_lines(char: str, nl: bytes) -> None:
    value = f"a{char}b".encode()
    event = nl.join([b"event: " + value, b"data: " + value, b"id: " + value, b"", b""])
    comment = b": " + value + nl
    text = value.decode()
    assert decode_every_way(event + comment) == [
        ev(event, event=text, data=text, id=text),
        cm(text, comment),
    ]


# -- UTF-8 -------------------------------------------------------------------


@pytest.mark.parametrize("char", ["é", "€", "😀"], ids=["2-byte", "3-byte", "4-byte"])
def test_utf8_character_split_at_every_byte(char: str) -> None:
    data = f"event: {char}\ndata: {char}{char}\n\n: {char}\n".encode()
    expected = [
        ev(f"event: {char}\ndata: {char}{char}\n\n".encode(), event=char, data=char * 2),
        cm(char, f": {char}\n".encode()),
    ]
    assert decode_every_way(data) == expected
    encoded = char.encode()
    start = data.index(encoded)
    for i in range(1, len(encoded)):  # every split inside the first character
        cut = start + i
        assert decode([data[:cut], data[cut:]]) == expected
    # Three pieces, both cuts inside the same 4-byte character.
    if len(encoded) == 4:
        assert (
            decode([data[: start + 1], data[start + 1 : start + 3], data[start + 3 :]]) == expected
        )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"\x80", "\ufffd"),  # lone continuation byte
        (b"a\xe2\x82", "a\ufffd"),  # truncated 3-byte sequence at line end
        (b"\xf0\x9f\x98", "\ufffd"),  # truncated emoji at line end
        (b"\xe2\x82(", "\ufffd("),  # truncated sequence before ASCII
        (b"\xc0\xaf", "\ufffd\ufffd"),  # overlong "/"
        (b"\xe0\x80\xaf", "\ufffd\ufffd\ufffd"),  # overlong, 3 bytes
        (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd"),  # UTF-16 surrogate encoded
        (b"\xf4\x90\x80\x80", "\ufffd\ufffd\ufffd\ufffd"),  # above U+10FFFF
        (b"\xff", "\ufffd"),
        (b"x\xfey\xffz", "x\ufffdy\ufffdz"),
    ],
    ids=[
        "lone-cont",
        "trunc3",
        "trunc4",
        "trunc-ascii",
        "overlong2",
        "overlong3",
        "surrogate",
        "too-big",
        "ff",
        "fe-ff",
    ],
)
def test_invalid_utf8_becomes_replacement_per_maximal_subpart(value: bytes, expected: str) -> None:
    assert value.decode("utf-8", "replace") == expected  # the table agrees with Python
    data = b"event: " + value + b"\ndata: " + value + b"\nid: " + value + b"\n\n:" + value + b"\n"
    items = decode_every_way(data)
    assert [(i.event, i.data, i.id, i.comment) for i in items] == [
        (expected, expected, expected, None),
        (None, None, None, expected),
    ]


# -- BOM ---------------------------------------------------------------------


def test_leading_bom_is_stripped() -> None:
    assert decode_every_way(BOM + b"data: x\n\n") == [ev(b"data: x\n\n", data="x")]


def test_leading_bom_split_over_three_chunks() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef") == []
    assert decoder.feed(b"\xbb") == []
    assert decoder.feed(b"\xbf") == []
    assert decoder.feed(b"data: x\n\n") == [ev(b"data: x\n\n", data="x")]


def test_leading_bom_before_a_comment() -> None:
    assert decode_every_way(BOM + b": c\n") == [cm("c", b": c\n")]


def test_second_bom_is_part_of_the_field_name() -> None:
    # Only one BOM is stripped; the second makes the name "\ufeffdata", an
    # unknown field, so the block has no data.
    assert decode_every_way(BOM + BOM + b"data: x\n\n") == [ev(BOM + b"data: x\n\n")]


def test_bom_not_at_stream_start_is_data() -> None:
    data = b"data: " + BOM + b"x\n\n" + BOM + b"data: y\n\n"
    assert decode_every_way(data) == [
        ev(b"data: " + BOM + b"x\n\n", data="\ufeffx"),
        ev(BOM + b"data: y\n\n"),
    ]


@pytest.mark.parametrize("partial", [b"\xef", b"\xef\xbb"])
def test_stream_of_only_a_partial_bom(partial: bytes) -> None:
    # Not a BOM: a field line of invalid UTF-8 with no line end, which close()
    # delivers as a block without data.
    assert decode_every_way(partial) == [ev(partial)]


def test_partial_bom_then_other_bytes() -> None:
    assert decode_every_way(b"\xef\xbbdata: x\n\n") == [ev(b"\xef\xbbdata: x\n\n")]


def test_stream_of_only_a_bom() -> None:
    assert decode_every_way(BOM) == []


# -- field parsing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"data:x", "x"),
        (b"data: x", "x"),
        (b"data:  x", " x"),
        (b"data:\tx", "\tx"),
        (b"data: x ", "x "),
        (b"data", ""),
        (b"data:", ""),
        (b"data: ", ""),
        (b"data:  ", " "),
        (b"data: a:b", "a:b"),
        (b"data::", ":"),
    ],
)
def test_one_optional_space_after_colon(line: bytes, expected: str) -> None:
    assert decode_every_way(line + b"\n\n") == [ev(line + b"\n\n", data=expected)]


def test_data_lines_join_with_lf() -> None:
    data = b"data: a\ndata:\ndata\ndata: b\n\n"
    assert decode_every_way(data) == [ev(data, data="a\n\n\nb")]


def test_empty_data_lines() -> None:
    assert decode_every_way(b"data:\ndata:\n\n") == [ev(b"data:\ndata:\n\n", data="\n")]
    assert decode_every_way(b"data:\n\n") == [ev(b"data:\n\n", data="")]


def test_id_with_nul_is_ignored() -> None:
    assert decode_every_way(b"id: a\x00b\ndata: x\n\n") == [
        ev(b"id: a\x00b\ndata: x\n\n", data="x")
    ]
    # Ignored means the earlier id of the block stays.
    assert decode_every_way(b"id: 1\nid: \x00\n\n") == [ev(b"id: 1\nid: \x00\n\n", id="1")]


def test_id_later_wins_and_empty_id_is_kept() -> None:
    assert decode_every_way(b"id: 1\nid: 2\n\n") == [ev(b"id: 1\nid: 2\n\n", id="2")]
    assert decode_every_way(b"id\n\n") == [ev(b"id\n\n", id="")]


def test_id_is_per_item_not_persistent() -> None:
    # Deviation: the spec's last-event-ID buffer would carry "1" over.
    data = b"id: 1\ndata: a\n\ndata: b\n\n"
    assert decode_every_way(data) == [
        ev(b"id: 1\ndata: a\n\n", id="1", data="a"),
        ev(b"data: b\n\n", data="b"),
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"10", 10),
        (b"0", 0),
        (b"007", 7),
        (b"1" * 30, int("1" * 30)),
        (b"0" * 5000 + b"7", 7),
        (b"9" * 5000, None),  # more digits than int() converts: ignored, not raised
        (b"1a", None),
        (b"-1", None),
        (b"+1", None),
        (b"1.5", None),
        (b" 10", None),  # "retry:  10" keeps one space
        (b"10 ", None),
        (b"", None),
        ("١٢".encode(), None),  # Arabic-Indic digits are not ASCII digits
        ("\uff11".encode(), None),  # fullwidth digit
        (b"0x10", None),
    ],
)
def test_retry_only_all_ascii_digits(value: bytes, expected: int | None) -> None:
    data = b"retry: " + value + b"\ndata: x\n\n"
    assert decode_every_way(data) == [ev(data, data="x", retry=expected)]


def test_invalid_retry_keeps_earlier_retry() -> None:
    data = b"retry: 5\nretry: x\n\n"
    assert decode_every_way(data) == [ev(data, retry=5)]


def test_unknown_fields_are_ignored_but_kept_in_raw() -> None:
    data = b"foo: bar\ndata: x\nData: y\ndata : z\nbaz\n\n"
    assert decode_every_way(data) == [ev(data, data="x")]


def test_event_name_kept_as_sent() -> None:
    assert decode_every_way(b"event: a b\ndata\n\n") == [
        ev(b"event: a b\ndata\n\n", event="a b", data="")
    ]
    assert decode_every_way(b"event: a\nevent: b\ndata\n\n") == [
        ev(b"event: a\nevent: b\ndata\n\n", event="b", data="")
    ]


@pytest.mark.parametrize("line", [b"event:", b"event: ", b"event"])
def test_empty_event_name_stays_empty(line: bytes) -> None:
    # Deviation: the spec would dispatch it as "message".
    data = line + b"\ndata: x\n\n"
    assert decode_every_way(data) == [ev(data, event="", data="x")]


# -- blocks without data -----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"id: 7\n\n", ev(b"id: 7\n\n", id="7")),
        (b"event: ping\n\n", ev(b"event: ping\n\n", event="ping")),
        (b"retry: 3\n\n", ev(b"retry: 3\n\n", retry=3)),
        (b"foo\n\n", ev(b"foo\n\n")),
        (b"foo: bar\n\n", ev(b"foo: bar\n\n")),
    ],
    ids=["id", "event", "retry", "unknown-bare", "unknown"],
)
def test_block_without_data_has_data_none(data: bytes, expected: SSEEvent) -> None:
    # Deviation: the spec dispatches nothing for these.
    assert decode_every_way(data) == [expected]


def test_blank_lines_that_end_no_block_produce_nothing() -> None:
    assert decode_every_way(b"\n\r\n\r\n\n") == []
    assert decode_every_way(b"\n\ndata: x\n\n\n\n") == [ev(b"data: x\n\n", data="x")]


# -- comments ----------------------------------------------------------------


def test_comments_in_stream_order_even_inside_an_event() -> None:
    data = b": a\ndata: x\n: b\ndata: y\n\n: c\n"
    assert decode_every_way(data) == [
        cm("a", b": a\n"),
        cm("b", b": b\n"),  # inside the event: comes out before it
        ev(b"data: x\ndata: y\n\n", data="x\ny"),
        cm("c", b": c\n"),
    ]


def test_comment_returned_at_once() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n: keepalive\n") == [cm("keepalive", b": keepalive\n")]
    assert decoder.feed(b"\n") == [ev(b"data: x\n\n", data="x")]


@pytest.mark.parametrize(
    ("line", "expected"),
    [(b":", ""), (b": ", ""), (b":x", "x"), (b": x", "x"), (b":  x", " x"), (b"::", ":")],
)
def test_comment_text(line: bytes, expected: str) -> None:
    assert decode_every_way(line + b"\n") == [cm(expected, line + b"\n")]


# -- close() -----------------------------------------------------------------


def test_close_delivers_final_event_without_blank_line() -> None:
    # Deviation: the spec discards a block the stream ends before its blank line.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n") == []
    assert decoder.close() == [ev(b"data: x\n", data="x")]


def test_close_delivers_final_line_without_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\ndata: y") == []
    assert decoder.close() == [ev(b"data: x\ndata: y", data="x\ny")]
    assert decode_every_way(b"data: x\ndata: y") == [ev(b"data: x\ndata: y", data="x\ny")]


def test_close_delivers_final_comment_without_line_end() -> None:
    assert decode_every_way(b"data: x\n\n: bye") == [
        ev(b"data: x\n\n", data="x"),
        cm("bye", b": bye"),
    ]


def test_close_puts_open_block_before_unterminated_comment() -> None:
    # The comment's raw has no line end; only this order replays to the same items.
    items = decode_every_way(b"data: x\n: c")
    assert items == [ev(b"data: x\n", data="x"), cm("c", b": c")]
    assert replay(items) == items


def test_close_after_cr_ended_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.close() == [ev(b"data: x\r", data="x")]


@pytest.mark.parametrize("data", [b"", b"data: x\n\n", b": c\n", b"\n\n\n", BOM])
def test_close_on_empty_or_ended_stream_returns_nothing(data: bytes) -> None:
    decoder = SSEDecoder()
    decoder.feed(data)
    assert decoder.close() == []
    assert decoder.close() == []  # closing twice is harmless


@pytest.mark.parametrize("chunk", [b"", b"data: x\n\n"])
def test_feed_after_close_raises(chunk: bytes) -> None:
    decoder = SSEDecoder()
    decoder.close()
    with pytest.raises(SSEError, match=r"feed\(\) after close\(\)"):
        decoder.feed(chunk)


# -- max_event_bytes ---------------------------------------------------------


def test_default_limit() -> None:
    assert DEFAULT_MAX_EVENT_BYTES == 16 * 1024 * 1024


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(limit: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SSEDecoder(max_event_bytes=limit)


def test_endless_line_raises_as_soon_as_it_passes_the_limit() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    assert decoder.feed(b"data: ") == []
    fed = 6
    while fed + 100 <= 1000:
        assert decoder.feed(b"x" * 100) == []
        fed += 100
    assert fed == 906
    assert decoder.feed(b"x" * 94) == []  # exactly 1000 bytes pending
    with pytest.raises(SSEEventTooLarge, match="grew past 1000 bytes without ending"):
        decoder.feed(b"x")


class CountingDecoder(SSEDecoder):
    """Counts the bytes the decoder scans for line ends (white-box)."""

    __slots__ = ("scanned",)

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        super().__init__(max_event_bytes)
        self.scanned = 0

    def _scan(self, buffer: bytes, items: list[SSEEvent]) -> int:
        self.scanned += len(buffer)
        return super()._scan(buffer, items)


@pytest.mark.parametrize("data", [b"data: ", b": "], ids=["field", "comment"])
def test_long_line_in_many_chunks_is_scanned_once(data: bytes) -> None:
    # Rescanning the pending line on every chunk would make a line of L bytes
    # in chunks of c bytes cost L*L/c: about 40 s of CPU (blocking the event
    # loop) for a 16 MiB line in 1500-byte chunks, before the limit triggers.
    decoder = CountingDecoder()
    piece = b"x" * 1500
    decoder.feed(data)
    for _ in range(1000):
        assert decoder.feed(piece) == []
    items = decoder.feed(b"\n\n")
    assert len(items) == 1
    assert len(items[0].raw) == len(data) + 1_500_000 + (1 if data == b": " else 2)
    assert decoder.scanned < 2 * 1_500_000


def test_endless_comment_raises() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    decoder.feed(b":" + b"x" * 999)
    with pytest.raises(SSEEventTooLarge, match="comment is over 1000 bytes"):
        decoder.feed(b"x")


def test_many_lines_without_blank_line_raise() -> None:
    line = b"data: x\n"  # 8 bytes, line end included
    decoder = SSEDecoder(max_event_bytes=80)
    for _ in range(10):
        assert decoder.feed(line) == []
    with pytest.raises(SSEEventTooLarge):
        decoder.feed(line)


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_event_at_the_limit_passes_and_one_byte_more_raises(nl: bytes) -> None:
    # The limit counts the field lines with their line ends, not the blank line.
    block = b"event: e" + nl + b"data: " + b"x" * 50 + nl
    data = block + nl + b"data: y" + nl + nl
    limit = len(block)
    expected = [
        ev(block + nl, event="e", data="x" * 50),
        ev(b"data: y" + nl + nl, data="y"),
    ]
    assert decode([data], max_event_bytes=limit) == expected
    assert same_items_up_to_split_crlf(expected, decode(bytewise(data), max_event_bytes=limit))
    with pytest.raises(SSEEventTooLarge):
        decode([data], max_event_bytes=limit - 1)
    with pytest.raises(SSEEventTooLarge):
        decode(bytewise(data), max_event_bytes=limit - 1)


def test_limit_is_per_event_not_per_stream() -> None:
    data = b"data: 0123456789\n\n" * 100
    assert len(decode(bytewise(data), max_event_bytes=17)) == 100


def test_comment_at_the_limit_passes_and_one_byte_more_raises() -> None:
    # A comment counts without its line end.
    comment = b": " + b"x" * 98  # 100 bytes
    assert decode([comment + b"\n"], max_event_bytes=100) == [cm("x" * 98, comment + b"\n")]
    assert decode(bytewise(comment + b"\r\n"), max_event_bytes=100) == [
        cm("x" * 98, comment + b"\r")
    ]
    with pytest.raises(SSEEventTooLarge, match="comment is over 99 bytes"):
        decode([comment + b"\n"], max_event_bytes=99)
    with pytest.raises(SSEEventTooLarge):
        decode(bytewise(comment + b"\n"), max_event_bytes=99)


def test_huge_comment_raises() -> None:
    data = b": " + b"x" * 100_000 + b"\n"
    with pytest.raises(SSEEventTooLarge, match="comment"):
        decode([data], max_event_bytes=65_536)
    with pytest.raises(SSEEventTooLarge, match="comment"):
        decode([data[i : i + 4096] for i in range(0, len(data), 4096)], max_event_bytes=65_536)


def test_comment_inside_event_does_not_count_toward_the_event() -> None:
    # Whole or chunked, the pending comment is measured alone.
    data = b"data: x\n: abcd\n\n"
    expected = [cm("abcd", b": abcd\n"), ev(b"data: x\n\n", data="x")]
    assert decode([data], max_event_bytes=10) == expected
    assert decode([b"data: x\n: abcd", b"\n\n"], max_event_bytes=10) == expected
    assert decode(bytewise(data), max_event_bytes=10) == expected


def test_split_crlf_counts_like_whole_crlf() -> None:
    # "data: x\r\n" is 9 bytes whether or not the CRLF is split.
    expected = [ev(b"data: x\r\n\n", data="x")]
    assert decode([b"data: x\r\n\n"], max_event_bytes=9) == expected
    assert decode([b"data: x\r", b"\n\n"], max_event_bytes=9) == expected
    with pytest.raises(SSEEventTooLarge):
        decode([b"data: x\r\n\n"], max_event_bytes=8)
    decoder = SSEDecoder(max_event_bytes=8)
    assert decoder.feed(b"data: x\r") == []
    with pytest.raises(SSEEventTooLarge):
        decoder.feed(b"\n")


def test_limit_error_is_an_sse_error_and_a_value_error() -> None:
    decoder = SSEDecoder(max_event_bytes=10)
    with pytest.raises(SSEEventTooLarge) as info:
        decoder.feed(b"data: " + b"x" * 20)
    assert isinstance(info.value, SSEError)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == "an SSE event grew past 10 bytes without ending"


# -- raw ---------------------------------------------------------------------


def test_raw_is_the_exact_bytes_with_terminators() -> None:
    data = b": c1\r\nevent: e\rdata: a\r\nfoo\n\r\n:c2\rid: 9\r\n\r\n"
    assert decode_every_way(data) == [
        cm("c1", b": c1\r\n"),
        ev(b"event: e\rdata: a\r\nfoo\n\r\n", event="e", data="a"),
        cm("c2", b":c2\r"),
        ev(b"id: 9\r\n\r\n", id="9"),
    ]


@pytest.mark.parametrize(
    "data",
    [
        example("chat.sse"),
        b": a\r\ndata: x\r: b\rdata: y\r\r\n",
        b"data: x\n: c",
        b"event: e\r\nretry: 1\r\n\r\n: x\ndata: unterminated",
        b"\n\n\ndata: 1\n\n\n\r\r\ndata: 2\r\n\r\n",
    ],
)
def test_replaying_raw_gives_the_same_items(data: bytes) -> None:
    items = decode([data])
    assert replay(items) == items
    assert replay(decode(bytewise(data))) == decode(bytewise(data))


def test_replay_exception_comment_between_cr_line_and_lf_blank_line() -> None:
    # Documented limit of the raw contract: taking the comment out of the block
    # puts the field line's CR next to the blank line's LF, which a fresh
    # decoder reads as one CRLF. Each item's own raw still replays alone.
    items = decode([b"data: x\r: c\r\n\ndata: y\n\n"])
    assert items == [
        cm("c", b": c\r\n"),
        ev(b"data: x\r\n", data="x"),
        ev(b"data: y\n\n", data="y"),
    ]
    assert replay(items) == [cm("c", b": c\r\n"), ev(b"data: x\r\ndata: y\n\n", data="x\ny")]
    for item in items:
        assert decode([item.raw]) == [item]


def test_replay_exception_raw_starting_with_bom() -> None:
    # Documented limit of the raw contract: a fresh decoder strips a BOM that
    # starts the replayed bytes; one extra BOM in front restores the items.
    items = decode([BOM + BOM + b"data: x\n\n"])
    assert items == [ev(BOM + b"data: x\n\n")]
    assert replay(items) == [ev(b"data: x\n\n", data="x")]
    assert decode([BOM + items[0].raw]) == items


# -- the WHATWG spec's own examples ------------------------------------------
# https://html.spec.whatwg.org/multipage/server-sent-events.html


def test_spec_example_stock_ticker() -> None:
    data = b"data: YHOO\ndata: +2\ndata: 10\n\n"
    assert decode_every_way(data) == [ev(data, data="YHOO\n+2\n10")]


def test_spec_example_four_blocks() -> None:
    data = (
        b": test stream\n"
        b"\n"
        b"data: first event\n"
        b"id: 1\n"
        b"\n"
        b"data:second event\n"
        b"id\n"
        b"\n"
        b"data:  third event\n"
    )
    decoder = SSEDecoder()
    assert decoder.feed(data) == [
        cm("test stream", b": test stream\n"),
        ev(b"data: first event\nid: 1\n\n", data="first event", id="1"),
        ev(b"data:second event\nid\n\n", data="second event", id=""),
    ]
    # The spec fires nothing for the last block; our close() delivers it.
    assert decoder.close() == [ev(b"data:  third event\n", data=" third event")]
    assert len(decode_every_way(data)) == 4


def test_spec_example_empty_data_and_newline_data() -> None:
    data = b"data\n\ndata\ndata\n\ndata:"
    decoder = SSEDecoder()
    # The spec's two events ...
    assert decoder.feed(data) == [
        ev(b"data\n\n", data=""),
        ev(b"data\ndata\n\n", data="\n"),
    ]
    # ... and the last block, which the spec discards, from close().
    assert decoder.close() == [ev(b"data:", data="")]
    assert len(decode_every_way(data)) == 3


def test_spec_example_space_after_colon_is_optional() -> None:
    data = b"data:test\n\ndata: test\n\n"
    first, second = decode_every_way(data)
    assert first == ev(b"data:test\n\n", data="test")
    assert second == ev(b"data: test\n\n", data="test")
    assert (first.data, first.event) == (second.data, second.event)


# -- encode_event ------------------------------------------------------------


def test_encode_data() -> None:
    assert encode_event(data="x") == b"data: x\n\n"
    assert encode_event(data="") == b"data: \n\n"
    assert decode([b"data: \n\n"]) == [ev(b"data: \n\n", data="")]


def test_encode_multi_line_data() -> None:
    wire = encode_event(data="a\nb\n")
    assert wire == b"data: a\ndata: b\ndata: \n\n"
    assert decode([wire]) == [ev(wire, data="a\nb\n")]


def test_encode_normalises_cr_and_crlf_in_data() -> None:
    wire = encode_event(data="a\rb\r\nc\n\rd")
    assert wire == b"data: a\ndata: b\ndata: c\ndata: \ndata: d\n\n"
    assert decode([wire]) == [ev(wire, data="a\nb\nc\n\nd")]


def test_encode_keeps_other_separators_in_data() -> None:
    text = "a\u2028b\x85c\x0cd"
    assert encode_event(data=text) == f"data: {text}\n\n".encode()


def test_encode_comment_only() -> None:
    assert encode_event(comment="hi") == b": hi\n"
    assert encode_event(comment="") == b":\n"
    assert encode_event(comment=" x") == b":  x\n"
    assert decode([b":  x\n"]) == [cm(" x", b":  x\n")]


def test_encode_comment_plus_fields() -> None:
    wire = encode_event(comment="c", event="e", id="1", retry=5, data="x")
    assert wire == b": c\nevent: e\nid: 1\nretry: 5\ndata: x\n\n"
    assert decode([wire]) == [
        cm("c", b": c\n"),
        ev(b"event: e\nid: 1\nretry: 5\ndata: x\n\n", event="e", id="1", retry=5, data="x"),
    ]


def test_encode_fields_without_data() -> None:
    assert encode_event(event="ping") == b"event: ping\n\n"
    assert encode_event(id="") == b"id: \n\n"
    assert encode_event(retry=0) == b"retry: 0\n\n"
    assert decode([b"id: \n\n"]) == [ev(b"id: \n\n", id="")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"event": "a\nb"}, "event name cannot contain a line break"),
        ({"event": "a\r"}, "event name cannot contain a line break"),
        ({"id": "1\r\n"}, "id cannot contain a line break"),
        ({"id": "a\x00b"}, "id cannot contain NUL"),
        ({"comment": "x\ny"}, "comment cannot contain a line break"),
        ({"comment": "\r"}, "comment cannot contain a line break"),
        ({"retry": -1}, "retry must not be negative"),
        ({}, "needs at least one field or a comment"),
        ({"data": None, "comment": None}, "needs at least one field or a comment"),
    ],
)
def test_encode_refuses(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_event(**kwargs)


# -- garbage -----------------------------------------------------------------


def _garbage(rng: random.Random, size: int) -> bytes:
    alphabet = b"\r\n: dataeventidretry0123\x00\xef\xbb\xbf\xff\x80" + bytes(range(256))
    return bytes(rng.choice(alphabet) for _ in range(size))


def _random_chunks(rng: random.Random, data: bytes) -> list[bytes]:
    chunks: list[bytes] = []
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 64)
        chunks.append(data[pos : pos + step])
        pos += step
    return chunks


@pytest.mark.parametrize("name", EXAMPLES)
def test_valid_stream_then_trailing_garbage(name: str) -> None:
    valid = example(name)
    expected = decode([valid])
    rng = random.Random(name)
    for size in [1, 2, 3, 10, 100, 1000, 5000]:
        garbage = _garbage(rng, size)
        for chunks in ([valid + garbage], _random_chunks(rng, valid + garbage)):
            items = decode(chunks)  # never raises below the limit
            assert items[: len(expected)] == expected
            assert replay(items)[: len(expected)] == expected


def test_garbage_past_the_limit_raises_only_the_limit_error() -> None:
    rng = random.Random(0)
    valid = example("chat.sse")
    expected = decode([valid])
    limit = max(len(item.raw) for item in expected)
    no_line_end = bytes(b for b in _garbage(rng, 4 * limit) if b not in b"\r\n")
    assert len(no_line_end) > limit
    decoder = SSEDecoder(max_event_bytes=limit)
    items: list[SSEEvent] = []

    def feed_all() -> None:
        for chunk in _random_chunks(rng, valid + no_line_end):
            items.extend(decoder.feed(chunk))

    with pytest.raises(SSEEventTooLarge):
        feed_all()
    assert items == expected  # everything before the garbage came out intact
