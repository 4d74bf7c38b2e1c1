"""Hostile input on the request path (properties and a fuzz target) and from the upstream.

Request side: whatever a client sends (method, path, headers, body), the
gateway answers with a complete, well-formed response: a 2xx, or a 4xx in the
endpoint's error shape; never a 5xx while the upstream is healthy, never an
exception, never an upstream call for a refused request, never a key in the
output. After each hostile request the same gateway still serves a good one.

Budget: as in ``test_sse_properties.py``. ``TRIO_GATEWAY_FUZZ`` unset: 150
examples per property and 300 fuzz rounds; ``TRIO_GATEWAY_FUZZ=long``: 100x
more, with a random fuzz seed (``TRIO_GATEWAY_FUZZ_SEED`` replays one).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import (
    CLIENT_KEY,
    FUZZ_LONG,
    PUBLIC_MODEL,
    UPSTREAM_KEY,
    AsgiCall,
    FakeResponse,
    FakeUpstream,
    fuzz_seed,
    fuzz_settings,
    make_config,
    make_gateway,
    sse,
)
from trio_gateway._proxy.app import Gateway

PROFILE = fuzz_settings(150, 15_000)

ENDPOINTS = [
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/audio/transcriptions",
    "/v1/models",
    "/healthz",
    "/metrics",
]
BOUNDARY = "fuzz-boundary"
GOOD_AUTH = [
    (b"authorization", f"Bearer {CLIENT_KEY}".encode()),
    (b"x-api-key", CLIENT_KEY.encode()),
]
MAX_BODY = 64 * 1024


def upstream_answer(request: httpx.Request) -> FakeResponse:
    """A healthy upstream: an event stream when one was asked for, JSON otherwise."""
    if request.headers.get("accept") == "text/event-stream":
        chunk = {"id": "gen-1", "model": "vendor/model:free", "choices": []}
        return FakeResponse(body=sse(chunk, "[DONE]"))
    if request.url.path.endswith("/audio/transcriptions"):
        return FakeResponse(body=[b"hello"], content_type="text/plain")
    answer = {"id": "gen-1", "model": "vendor/model:free", "usage": {"prompt_tokens": 1}}
    return FakeResponse(body=[orjson.dumps(answer)], content_type="application/json")


# --- strategies ----------------------------------------------------------------------------

# Integers within what JSON libraries (orjson included) serialise as integers.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
models = st.one_of(
    st.just(PUBLIC_MODEL),
    st.sampled_from(["../../admin", f"{PUBLIC_MODEL}\r\nx-injected: 1", "vendor/model:free", ""]),
    st.text(max_size=40),
    json_values,
)
json_objects = st.fixed_dictionaries(
    {},
    optional={
        "model": models,
        "stream": st.one_of(st.booleans(), json_values),
        "stream_options": json_values,
        "messages": json_values,
        "input": json_values,
        "max_tokens": json_values,
    },
)
json_bodies = st.one_of(
    json_objects.map(orjson.dumps),
    json_values.map(lambda value: orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)),
)


def form(model: bytes, extra: bytes) -> bytes:
    b = BOUNDARY.encode()
    return (
        b"--" + b + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + model + b"\r\n"
        b"--"
        + b
        + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        + extra
        + b"\r\n--"
        + b
        + b"--\r\n"
    )


bodies = st.one_of(
    json_bodies,
    st.binary(max_size=300),
    st.builds(form, st.sampled_from([PUBLIC_MODEL.encode(), b"nope", b""]), st.binary(max_size=40)),
    st.builds(lambda body, cut: body[:cut], json_bodies, st.integers(0, 40)),  # truncated
    st.just(b"{" * 5000),  # deep nesting
    st.just(b'{"model": "' + b"m" * (MAX_BODY + 10) + b'"}'),  # over the size limit
)
content_types = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"application/json; charset=utf-8",
            b"APPLICATION/JSON",
            b"text/plain",
            f"multipart/form-data; boundary={BOUNDARY}".encode(),
            b"multipart/form-data",
            b"",
        ]
    ),
    st.binary(max_size=40),
    st.binary(max_size=20).map(lambda tail: b"multipart/form-data; boundary=" + tail),
)
auth_headers = st.one_of(
    st.sampled_from(GOOD_AUTH).map(lambda header: [header]),
    st.sampled_from(
        [
            [],
            [(b"authorization", b"Bearer wrong")],
            [(b"authorization", b"Bearer")],
            [(b"authorization", b"Basic dXNlcjpwYXNz")],
            [(b"authorization", f"bearer  {CLIENT_KEY}  ".encode())],
            [(b"x-api-key", b"")],
            [(b"authorization", b"Bearer \xff\xfe"), (b"x-api-key", CLIENT_KEY.encode())],
        ]
    ),
    st.lists(st.tuples(st.sampled_from([b"authorization", b"x-api-key"]), st.binary(max_size=30))),
)
other_headers = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from(
                [b"anthropic-version", b"anthropic-beta", b"openai-beta", b"content-length"]
            ),
            st.binary(min_size=1, max_size=20),
        ),
        st.binary(max_size=40),
    ),
    max_size=5,
)


@dataclass
class Hostile:
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunk_size: int


@st.composite
def requests(draw: st.DrawFn) -> Hostile:
    """Mostly the right method on a real endpoint, so the checks past routing get exercised."""
    path = draw(st.sampled_from(ENDPOINTS))
    if draw(st.integers(0, 9)) == 0:
        path = draw(st.sampled_from([path + "/", path.upper(), path + "/../admin"]) | st.text())
    method = "GET" if path in ("/v1/models", "/healthz", "/metrics") else "POST"
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8))
    if draw(st.booleans()):  # well dressed: the right content type and a good key
        form_type = f"multipart/form-data; boundary={BOUNDARY}".encode()
        content_type = form_type if path.endswith("transcriptions") else b"application/json"
        headers = [(b"content-type", content_type), draw(st.sampled_from(GOOD_AUTH))]
    else:
        headers = [(b"content-type", draw(content_types)), *draw(auth_headers)]
    headers += draw(other_headers)
    return Hostile(method, path, headers, draw(bodies), draw(st.sampled_from([1, 7, 1 << 20])))


# --- the property --------------------------------------------------------------------------


def assert_error_shape(path: str, body: Any) -> None:
    if path == "/v1/messages":
        assert body["type"] == "error"
        assert set(body["error"]) == {"type", "message"}
    else:
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "code", "param"}
    assert isinstance(body["error"]["message"], str)
    assert len(body["error"]["message"]) < 400  # client input is echoed bounded


async def play(gateway: Gateway, upstream: FakeUpstream, hostile: Hostile) -> None:
    """Send ``hostile``, check the answer, then check a good request still works."""
    call = AsgiCall(
        method=hostile.method,
        path=hostile.path,
        headers=hostile.headers,
        body=hostile.body,
        body_chunk_size=hostile.chunk_size,
        disconnect_when_done=True,
    )
    calls_before = len(upstream.requests)
    with trio.fail_after(60):
        await call.run(gateway)
    assert call.status is not None
    assert 200 <= call.status < 500, f"{call.status}: {call.text[:300]!r}"
    assert call.ended, "the answer is complete"
    assert b"x-request-id" in call.response_headers
    text = call.text
    assert UPSTREAM_KEY.encode() not in text
    assert CLIENT_KEY.encode() not in text
    text.decode("utf-8")  # every answer here is UTF-8 (JSON, an event stream, metrics)
    if call.status >= 400:
        assert call.response_headers[b"content-length"] == str(len(text)).encode()
        assert_error_shape(hostile.path, orjson.loads(text))
        assert len(upstream.requests) == calls_before, "a refused request went upstream"
    for request in upstream.requests[calls_before:]:
        raw = b"".join(name + b": " + value for name, value in request.headers.raw)
        assert CLIENT_KEY.encode() not in raw + request.content
        assert request.url.path.startswith("/api/v1/")
        assert ".." not in request.url.path
    good = AsgiCall.json({"model": PUBLIC_MODEL, "messages": []})
    with trio.fail_after(60):
        await good.run(gateway)
    assert good.status == 200, "the gateway still serves after a hostile request"


def play_in_trio(hostile: Hostile) -> None:
    gateway, upstream = make_gateway(upstream_answer, max_body_bytes=MAX_BODY)
    trio.run(play, gateway, upstream, hostile, clock=trio.testing.MockClock(autojump_threshold=0))


@PROFILE
@given(requests())
def test_any_request_gets_a_well_formed_answer_and_no_5xx(hostile: Hostile) -> None:
    play_in_trio(hostile)


@PROFILE
@given(
    st.sampled_from(ENDPOINTS[:4]),
    st.sampled_from(GOOD_AUTH),
    json_objects,
    st.sampled_from([b"application/json", b"application/json; charset=UTF-8"]),
)
def test_json_bodies_on_the_json_endpoints(
    path: str, auth: tuple[bytes, bytes], payload: dict[str, Any], content_type: bytes
) -> None:
    """Denser on the likely mistakes: right endpoint and key, a JSON object of any shape."""
    headers = [(b"content-type", content_type), auth]
    play_in_trio(Hostile("POST", path, headers, orjson.dumps(payload), 1 << 20))


# --- the fuzz target -----------------------------------------------------------------------

SEEDS = [
    ("/v1/chat/completions", b'{"model":"kilo/free-model","messages":[],"stream":true}'),
    ("/v1/messages", b'{"model":"kilo/free-model","max_tokens":5,"messages":[],"stream":true}'),
    ("/v1/responses", b'{"model":"kilo/free-model","input":"hi"}'),
    ("/v1/embeddings", b'{"model":"kilo/free-model","input":"hi"}'),
    ("/v1/audio/transcriptions", form(PUBLIC_MODEL.encode(), b"RIFF....WAVE")),
]
INTERESTING = [b"\r\n", b"\x00", b'"', b"\\u0000", b"\xff", b"{", b"}", b"[", b"--", b"\xc3"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A few byte-level mutations: flips, cuts, duplications, interesting insertions."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        position = rng.randint(0, len(out))
        choice = rng.randrange(5)
        if choice == 0 and out:
            out[min(position, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif choice == 1:
            del out[position : position + rng.randint(1, 8)]
        elif choice == 2:
            out[position:position] = rng.choice(INTERESTING)
        elif choice == 3:
            out[position:position] = out[position : position + rng.randint(1, 16)] * 2
        else:
            out = out[:position]
    return bytes(out)


@pytest.mark.slow
def test_fuzz_the_request_path() -> None:
    """Mutated valid requests (body bytes and the content type), many per gateway."""
    seed = fuzz_seed(20_261_124)
    rng = random.Random(seed)
    rounds = 30_000 if FUZZ_LONG else 300

    async def run() -> None:
        gateway, upstream = make_gateway(upstream_answer, max_body_bytes=MAX_BODY)
        for n in range(rounds):
            path, body = rng.choice(SEEDS)
            content_type = (
                f"multipart/form-data; boundary={BOUNDARY}"
                if path.endswith("transcriptions")
                else "application/json"
            ).encode()
            if rng.random() < 0.2:
                content_type = mutate(rng, content_type)
            headers = [(b"content-type", content_type), rng.choice(GOOD_AUTH)]
            hostile = Hostile("POST", path, headers, mutate(rng, body), rng.choice([1, 5, 1 << 20]))
            try:
                await play(gateway, upstream, hostile)
            except Exception as exc:
                raise AssertionError(f"seed={seed} round={n} request={hostile!r}") from exc

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))


def test_one_gateway_survives_every_seed_mutated_in_turn() -> None:
    """The fuzz target's own check: unmutated seeds all succeed, so mutations are the cause."""

    async def run() -> None:
        config = make_config(max_body_bytes=MAX_BODY)
        upstream = FakeUpstream(upstream_answer)
        gateway = Gateway(config, transport=upstream)
        for path, body in SEEDS:
            content_type = (
                f"multipart/form-data; boundary={BOUNDARY}"
                if path.endswith("transcriptions")
                else "application/json"
            ).encode()
            call = AsgiCall(
                path=path, body=body, headers=[(b"content-type", content_type), GOOD_AUTH[0]]
            )
            await call.run(gateway)
            assert call.status == 200, (path, call.text)
        assert len(upstream.requests) == len(SEEDS)

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))


# --- a hostile upstream --------------------------------------------------------------------

LIMIT = 64 * 1024
CHUNK = 4096
ENDLESS = {
    "one-line-never-ending": b"data: " + b"x" * (CHUNK - 6),
    "data-lines-never-a-blank-line": b"data: x\n" * (CHUNK // 8),
    "a-comment-never-ending": b":" + b"c" * (CHUNK - 1),
    "a-field-name-never-ending": b"f" * CHUNK,
    "crlf-data-lines": b"data: y\r\n" * (CHUNK // 9),
}
STREAM_PATHS = {
    "chat": "/v1/chat/completions",
    "messages": "/v1/messages",
    "responses": "/v1/responses",
}


@pytest.mark.parametrize("shape", ENDLESS)
@pytest.mark.parametrize("kind", STREAM_PATHS)
async def test_endless_upstream_event_is_cut_at_the_limit_with_an_error_event(
    kind: str, shape: str, autojump_clock: trio.testing.MockClock
):
    """An upstream that never finishes an event: bounded reading, then the kind's error."""
    body = [ENDLESS[shape]] * 100_000  # 400 MB if it were all read
    gateway, upstream = make_gateway(FakeResponse(body=body), max_event_bytes=LIMIT)
    payload = {"model": PUBLIC_MODEL, "stream": True, "messages": [], "input": "hi"}
    call = await AsgiCall.json(payload, path=STREAM_PATHS[kind]).run(gateway)
    assert call.status == 200
    assert call.ended
    pulled = upstream.bodies[0].chunks_yielded * CHUNK
    assert pulled <= LIMIT + 2 * CHUNK, f"read {pulled} bytes for a {LIMIT}-byte limit"
    assert upstream.bodies[0].closed_at is not None
    last = call.events[-1]
    error = orjson.loads(last.data or "")
    if kind == "chat":
        assert error["error"]["type"] == "rewrite_error"
    else:
        assert last.event == "error"
        assert error["type"] == "error"
    assert len(call.text) < LIMIT, "the runaway event itself never reaches the client"
