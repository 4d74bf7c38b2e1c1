"""Faults for the chaos and soak scenarios: what each request asks of the mock, and verdicts.

No I/O: the plan of a run is a function of its seed, and a verdict is a
function of the bytes the client received, so both are tested with plain
data (``tests/test_bench.py``).

Theory of operation
===================

1. **One plan per request.** :func:`make_plans` draws, from a seeded
   :class:`random.Random`, each request's API kind (chat, messages or
   responses), whether it streams, its length in tokens, one upstream fault
   and whether the client leaves early. The fault goes to the mock in the
   request body's ``"mock_script"`` object, which the gateway forwards like
   any other field (:func:`trio_gateway.testing.mock_upstream.script_from_request`).
2. **Where a fault lands is known.** The mock's answer to a plan is
   rendered here, without I/O, so each plan knows the byte at which the
   upstream answer became complete (:class:`Layout`): the end of the data
   line of the kind's end event (Chat: the chunk with a ``finish_reason``;
   Messages: ``message_stop``; Responses: ``response.completed``), or the
   whole JSON body. A cut before that byte, or garbage in an event up to
   the end event, is *harmful*: the answer must not reach the client as
   complete. A fault after it is harmless: the client may see the answer
   complete, or an error, but never a cut.
3. **Offsets aim at the edges.** A uniform offset would rarely land in the
   short end event, where the subtle cases are, so cut offsets are uniform
   over the body 40 % of the time, inside the end event 40 %, and within 2
   bytes of the completion byte 20 %; garbage hits the end event half the
   time.
4. **Verdicts from the client's bytes** (:func:`classify`): ``complete``
   (the kind's end event, no error event; a 2xx JSON answer), ``error`` (the
   kind's error event; a non-2xx answer), ``cut`` (neither: the body or the
   connection ended without either), ``left`` (the client closed first, on
   purpose), ``refused`` (the connection was refused: it never reached the
   gateway). Chat is complete with ``data: [DONE]``, or with a chunk whose
   ``finish_reason`` is set followed only by usage chunks. As in the SSE
   spec, a block without ``data`` is no event: it counts for neither end
   nor error, but is flagged (``garbage`` if it was named, ``fragment`` if
   it was a piece of a cut line, such as ``eve``).
"""

from __future__ import annotations

import enum
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Literal

import orjson

from trio_gateway.testing.mock_upstream import (
    REQUEST_FIELD,
    Script,
    StreamKind,
    render_json,
    render_stream,
)

__all__ = [
    "FAULTS",
    "Answer",
    "Layout",
    "Outcome",
    "Plan",
    "Result",
    "Verdict",
    "breakdown",
    "classify",
    "layout",
    "make_plans",
    "request_body",
    "summarize_results",
]

KINDS: tuple[StreamKind, ...] = ("chat", "messages", "responses")
_END_EVENTS: dict[str, frozenset[str]] = {
    "messages": frozenset({"message_stop"}),
    "responses": frozenset({"response.completed", "response.incomplete", "response.failed"}),
}
_BLOCK_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_END = re.compile(rb"\r\n|\n|\r")

FAULTS: tuple[tuple[str, int], ...] = (
    ("none", 18),
    ("eof-chunked", 12),  # a clean end mid-answer: the terminating chunk
    ("eof-length", 8),  # a content-length that ends mid-answer
    ("eof-close", 8),  # a body delimited by the close, closed mid-answer
    ("truncate", 8),  # FIN mid-answer: no terminating chunk, or short of the content-length
    ("reset", 10),  # RST mid-answer
    ("garbage-junk", 8),  # one event's data replaced by bytes that are not JSON
    ("garbage-cut", 10),  # one event's data cut in half, then junk
    ("stall", 6),  # the upstream goes silent mid-answer
    ("before-head", 4),  # reset, FIN or stall before the response head
)
"""Each fault's label and weight in the mix."""

_CUTS = {
    "eof-chunked": {"fault": "eof", "framing": "chunked"},
    "eof-length": {"fault": "eof", "framing": "length"},
    "eof-close": {"fault": "eof", "framing": "close"},
    "truncate": {"fault": "truncate"},
    "reset": {"fault": "reset"},
    "stall": {"fault": "stall"},
}


@dataclass(frozen=True, slots=True)
class Layout:
    """Where things are in the mock's answer to one (kind, streamed, tokens)."""

    size: int
    """Body bytes."""
    complete_at: int
    """Body bytes after which the answer is complete (the end event's data line is in)."""
    events: int
    """SSE events (the leading comment not counted); 1 for JSON."""
    end_event: int
    """The index of the end event (0 for JSON)."""
    end_start: int
    """Where the end event starts in the body."""


@lru_cache(maxsize=512)
def layout(kind: StreamKind, tokens: int, model: str, *, streamed: bool) -> Layout:
    """The :class:`Layout` of the mock's answer for ``model`` (the upstream model it echoes)."""
    script = Script(tokens=tokens)
    if not streamed:
        size = len(render_json(kind, script, model))
        return Layout(size, size, 1, 0, 0)
    writes = render_stream(kind, script, model)
    comment = 1 if script.comment is not None else 0
    starts = [0]
    for write in writes:
        starts.append(starts[-1] + len(write))
    events = writes[comment:]
    blocks = [_parse_block(event) for event in events]
    for end in range(len(blocks)):
        if _complete(kind, blocks[: end + 1]):
            break
    else:
        raise AssertionError(f"the mock's {kind} stream never completes")
    start = starts[comment + end]
    data_line_end = start + len(events[end].rstrip(b"\r\n"))
    return Layout(starts[-1], data_line_end, len(events), end, start)


@dataclass(frozen=True, slots=True)
class Plan:
    """One request of a chaos or soak run."""

    index: int
    kind: StreamKind
    streamed: bool
    tokens: int
    fault: str
    """The fault's label in :data:`FAULTS`."""
    script: Mapping[str, object]
    """The ``mock_script`` object sent in the request body."""
    harmful: bool
    """The upstream answer is cut or corrupted before it was complete."""
    leave_after: int | None
    """Body bytes after which the client leaves; -1: right after sending the request."""


def make_plans(
    seed: int,
    count: int,
    *,
    model: str,
    tokens: tuple[int, int] = (3, 40),
    pace: float = 0.0,
    streamed_share: float = 0.75,
    leave_share: float = 0.1,
    faults: Sequence[tuple[str, int]] = FAULTS,
) -> list[Plan]:
    """``count`` plans drawn from ``seed`` (the same seed, the same plans)."""
    rng = random.Random(seed)
    labels = [label for label, _ in faults]
    weights = [weight for _, weight in faults]
    plans = []
    for index in range(count):
        kind = rng.choice(KINDS)
        streamed = rng.random() < streamed_share
        length = rng.randint(*tokens)
        where = layout(kind, length, model, streamed=streamed)
        fault = rng.choices(labels, weights)[0]
        script: dict[str, object] = {"tokens": length}
        if pace:
            script["pace"] = pace
        harmful = _add_fault(rng, fault, where, streamed, script)
        leave_after = None
        if rng.random() < leave_share:
            leave_after = -1 if rng.random() < 0.2 else rng.randrange(where.size + 1)
        plans.append(Plan(index, kind, streamed, length, fault, script, harmful, leave_after))
    return plans


def _add_fault(
    rng: random.Random, fault: str, where: Layout, streamed: bool, script: dict[str, object]
) -> bool:
    """Put ``fault`` into ``script``; return whether it is harmful."""
    if fault == "none":
        return False
    if fault == "before-head":
        script |= {"fault": rng.choice(["reset", "truncate", "stall"]), "fault_at": -1}
        return True
    if fault.startswith("garbage-"):
        script["garble"] = fault.removeprefix("garbage-")
        if not streamed:
            script["garble_event"] = 0
            return True
        event = where.end_event if rng.random() < 0.5 else rng.randrange(where.events)
        script["garble_event"] = event
        return event <= where.end_event
    script |= _CUTS[fault]
    draw = rng.random()
    if not streamed:
        at = rng.randrange(where.size) if draw < 0.8 else where.size - rng.randint(0, 1)
    elif draw < 0.4:
        at = rng.randrange(where.size)
    elif draw < 0.8:
        at = rng.randint(where.end_start, where.size)
    else:
        at = max(0, where.complete_at + rng.randint(-2, 2))
    script["fault_at"] = at
    return at < where.complete_at


def request_body(plan: Plan, model: str) -> bytes:
    """The JSON body of ``plan``'s request for the public ``model``."""
    body: dict[str, object] = {"model": model, "stream": plan.streamed}
    if plan.kind == "responses":
        body["input"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    if plan.kind == "messages":
        body["max_tokens"] = 1024
    body[REQUEST_FIELD] = dict(plan.script)
    return orjson.dumps(body)


# --- Verdicts --------------------------------------------------------------------------------


class Outcome(enum.StrEnum):
    """How one answer reached the client."""

    COMPLETE = "complete"
    ERROR = "error"
    CUT = "cut"
    LEFT = "left"
    REFUSED = "refused"


Ended = Literal["end", "closed", "reset", "left", "refused", "timeout", "pending"]


@dataclass(slots=True)
class Answer:
    """What the client received for one request. Filled in as it goes."""

    status: int = 0
    content_type: str = ""
    request_id: str | None = None
    received: bytearray = field(default_factory=bytearray)
    """Every byte received, the response head included."""
    body: bytearray = field(default_factory=bytearray)
    ended: Ended = "pending"
    """``end``: the body ended as its framing says; ``closed``/``reset``: the
    connection ended first; ``left``: the client closed first; ``refused``: no
    connection; ``timeout``: the client gave up waiting."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The class of one answer, and what else was wrong with it."""

    outcome: Outcome
    garbage: bool = False
    """A data field that must be JSON (or a JSON body) was not, or a named event had none."""
    fragment: bool = False
    """A block with neither ``event:`` nor ``data:`` (a piece of a cut line) was passed on."""
    error_code: str | None = None
    """The error event's or error body's code (its type where it has no code)."""
    after_error: bool = False
    """Events came after the error event."""


@dataclass(frozen=True, slots=True)
class _Block:
    name: str | None
    data: str | None
    payload: Any
    """The data parsed as JSON, or None when it is not (``[DONE]`` included)."""


def _parse_block(raw: bytes) -> _Block:
    name = None
    data: list[str] = []
    for line in _LINE_END.split(raw):
        if not line or line.startswith(b":"):
            continue
        field_name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if field_name == b"event":
            name = value.decode("utf-8", "replace")
        elif field_name == b"data":
            data.append(value.decode("utf-8", "replace"))
    text = "\n".join(data) if data else None
    payload = None
    if text is not None and text != "[DONE]":
        try:
            payload = orjson.loads(text)
        except orjson.JSONDecodeError:
            payload = None
    return _Block(name, text, payload)


def _blocks(body: bytes) -> list[_Block]:
    """The events of ``body``, comments left out; an unterminated last block is not one."""
    parts = _BLOCK_END.split(body)[:-1]
    blocks = []
    for part in parts:
        lines = [line for line in _LINE_END.split(part) if line and not line.startswith(b":")]
        if lines:
            blocks.append(_parse_block(part))
    return blocks


def _is_error(kind: str, block: _Block) -> bool:
    payload = block.payload if isinstance(block.payload, dict) else {}
    if kind == "chat":
        return "error" in payload
    return block.name == "error" or payload.get("type") == "error"


def _chat_finish(payload: Any) -> bool:
    choices = payload.get("choices") if isinstance(payload, dict) else None
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") is not None for c in choices
    )


def _chat_usage_only(payload: Any) -> bool:
    """A chunk that carries usage and no content."""
    if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
        return False
    choices = payload.get("choices") or []
    for choice in choices if isinstance(choices, list) else [None]:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            return False
        if any(delta.get(name) for name in ("content", "refusal", "reasoning", "tool_calls")):
            return False
    return True


def _complete(kind: str, blocks: Sequence[_Block]) -> bool:
    """Whether ``blocks`` hold the kind's end event (errors aside)."""
    if kind != "chat":
        return any(block.name in _END_EVENTS[kind] for block in blocks)
    if any(block.data == "[DONE]" for block in blocks):
        return True
    finished = [i for i, block in enumerate(blocks) if _chat_finish(block.payload)]
    return bool(finished) and all(
        _chat_usage_only(block.payload) for block in blocks[finished[0] + 1 :]
    )


def _error_code(kind: str, payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict):
        for name in ("code", "type"):
            if isinstance(error.get(name), str):
                return str(error[name])
    code = payload.get("code")
    return code if isinstance(code, str) else None


def classify(kind: str, answer: Answer) -> Verdict:
    """The verdict on ``answer`` to a request of ``kind``. Pure."""
    if answer.ended == "refused":
        return Verdict(Outcome.REFUSED)
    if answer.ended == "left":
        return Verdict(Outcome.LEFT)
    if answer.status == 0:
        return Verdict(Outcome.CUT)
    body = bytes(answer.body)
    if answer.status == 200 and answer.content_type.startswith("text/event-stream"):
        blocks = _blocks(body)
        fragment = any(block.name is None and block.data is None for block in blocks)
        garbage = any(
            (block.data is not None and block.data != "[DONE]" and block.payload is None)
            or (block.name is not None and block.data is None)
            for block in blocks
        )
        # As the SSE spec says, a block without data dispatches no event.
        events = [block for block in blocks if block.data is not None]
        errors = [i for i, block in enumerate(events) if _is_error(kind, block)]
        if errors:
            code = _error_code(kind, events[errors[0]].payload)
            after = errors[0] < len(events) - 1
            return Verdict(Outcome.ERROR, garbage, fragment, code, after)
        outcome = Outcome.COMPLETE if _complete(kind, events) else Outcome.CUT
        return Verdict(outcome, garbage, fragment)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    garbage = not isinstance(payload, dict)
    if answer.ended != "end":
        return Verdict(Outcome.CUT, garbage)
    if answer.status >= 300 or (not garbage and "error" in payload):
        return Verdict(Outcome.ERROR, garbage, error_code=_error_code(kind, payload))
    return Verdict(Outcome.CUT if garbage else Outcome.COMPLETE, garbage)


@dataclass(frozen=True, slots=True)
class Result:
    """One request's plan, verdict and the few facts the figures need (no body kept).

    Only a bad answer (:func:`flaws`) keeps ``evidence``: the start and the end
    of the bytes the client received, to show what went wrong.
    """

    plan: Plan
    verdict: Verdict
    status: int
    request_id: str | None
    leaked: bool
    """The upstream model's name was somewhere in the bytes the client received."""
    ended: str
    started: float
    finished: float
    evidence: str | None = None


_EVIDENCE_HEAD = 200  # bytes of the head kept as evidence
_EVIDENCE_TAIL = 800  # bytes of the end kept as evidence


def flaws(plan: Plan, verdict: Verdict, leaked: bool) -> list[str]:
    """What is wrong with an answer, by the targets: empty for a good one."""
    found = []
    if verdict.outcome is Outcome.CUT:
        found.append("cut")
    if plan.harmful and verdict.outcome is Outcome.COMPLETE:
        found.append("passed_as_complete")
    if leaked:
        found.append("model_leak")
    if verdict.garbage:
        found.append("garbage")
    if verdict.fragment:
        found.append("fragment")
    if plan.fault == "none" and verdict.outcome is Outcome.ERROR:
        found.append("error_on_healthy")
    return found


def evidence(received: bytes | bytearray) -> str:
    """The start and end of ``received``, as text, for a report."""
    if len(received) <= _EVIDENCE_HEAD + _EVIDENCE_TAIL:
        return bytes(received).decode("utf-8", "replace")
    head = bytes(received[:_EVIDENCE_HEAD]).decode("utf-8", "replace")
    tail = bytes(received[-_EVIDENCE_TAIL:]).decode("utf-8", "replace")
    return f"{head}\n[... {len(received) - _EVIDENCE_HEAD - _EVIDENCE_TAIL} bytes ...]\n{tail}"


def examples(results: Iterable[Result], per_flaw: int = 3) -> dict[str, list[dict[str, object]]]:
    """Up to ``per_flaw`` bad answers of each flaw: the plan, how it ended, the evidence."""
    found: dict[str, list[dict[str, object]]] = {}
    for r in results:
        for flaw in flaws(r.plan, r.verdict, r.leaked):
            shown = found.setdefault(flaw, [])
            if len(shown) < per_flaw:
                plan = {k: v for k, v in asdict(r.plan).items() if k != "index"}
                shown.append(
                    {"plan": plan, "ended": r.ended, "status": r.status, "bytes": r.evidence}
                )
    return found


def summarize_results(results: Iterable[Result]) -> dict[str, float | None]:
    """The figures of a run: outcomes, the targets' counts, and how many of what."""
    results = list(results)
    outcomes = Counter(r.verdict.outcome for r in results)
    stayed = [r for r in results if r.verdict.outcome is not Outcome.LEFT]
    return {
        "requests": len(results),
        "complete": outcomes[Outcome.COMPLETE],
        "error": outcomes[Outcome.ERROR],
        "cut": outcomes[Outcome.CUT],
        "left": outcomes[Outcome.LEFT],
        "refused": outcomes[Outcome.REFUSED],
        "harmful_faults": sum(1 for r in stayed if r.plan.harmful),
        "passed_as_complete": sum(
            1 for r in stayed if r.plan.harmful and r.verdict.outcome is Outcome.COMPLETE
        ),
        "errors_on_healthy": sum(
            1 for r in stayed if r.plan.fault == "none" and r.verdict.outcome is Outcome.ERROR
        ),
        "garbage_forwarded": sum(1 for r in results if r.verdict.garbage),
        "fragments_forwarded": sum(1 for r in results if r.verdict.fragment),
        "events_after_error": sum(1 for r in results if r.verdict.after_error),
        "model_leaks": sum(1 for r in results if r.leaked),
        "gateway_500s": sum(1 for r in results if r.status == 500),
        "timeouts": sum(1 for r in results if r.ended == "timeout"),
    }


BREAKDOWN_COLUMNS = (
    "requests",
    "harmful",
    "complete",
    "error",
    "cut",
    "left",
    "passed_as_complete",
    "garbage_forwarded",
    "fragments_forwarded",
    "model_leaks",
)


def breakdown(results: Iterable[Result]) -> dict[str, dict[str, int]]:
    """Per fault label (and per kind and streaming): the counts of :data:`BREAKDOWN_COLUMNS`."""
    rows: dict[str, Counter[str]] = {}
    for r in results:
        shape = f"{r.plan.kind}{'' if r.plan.streamed else ' json'}"
        for key in (f"fault {r.plan.fault}", f"kind {shape}"):
            row = rows.setdefault(key, Counter())
            row["requests"] += 1
            row["harmful"] += r.plan.harmful
            row[r.verdict.outcome.value] += 1
            row["passed_as_complete"] += r.plan.harmful and r.verdict.outcome is Outcome.COMPLETE
            row["garbage_forwarded"] += r.verdict.garbage
            row["fragments_forwarded"] += r.verdict.fragment
            row["model_leaks"] += r.leaked
    return {key: {c: rows[key][c] for c in BREAKDOWN_COLUMNS} for key in sorted(rows)}


def error_codes(results: Iterable[Result]) -> dict[str, int]:
    """How often each error code reached clients."""
    codes = Counter(
        r.verdict.error_code or "(none)" for r in results if r.verdict.outcome is Outcome.ERROR
    )
    return dict(codes.most_common())
