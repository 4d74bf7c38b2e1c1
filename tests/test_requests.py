"""The request side of the app, and its whole (non-streamed) answers, in memory.

Every check the gateway makes before it talks upstream, the request it then
builds, and how a JSON (or non-JSON, or failed) upstream answer reaches the
client. Each test would fail without the behaviour it names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import MutableMapping
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing

from tests.helpers import (
    CLIENT_KEY,
    PUBLIC_MODEL,
    STALL,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    AsgiCall,
    FakeResponse,
    FakeUpstream,
    make_config,
    make_gateway,
    sse,
)
from trio_gateway._proxy.app import Gateway

BASE_URL = "https://upstream.invalid/api/v1"
AUTH = (b"authorization", f"Bearer {CLIENT_KEY}".encode())
JSON_CT = (b"content-type", b"application/json")

# A JSON request that each kind accepts.
JSON_KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {"model": PUBLIC_MODEL, "messages": []}),
    "messages": ("/v1/messages", {"model": PUBLIC_MODEL, "max_tokens": 5, "messages": []}),
    "responses": ("/v1/responses", {"model": PUBLIC_MODEL, "input": "hi"}),
    "embeddings": ("/v1/embeddings", {"model": PUBLIC_MODEL, "input": "hi"}),
}

CHAT_ANSWER: dict[str, Any] = {
    "id": "gen-1",
    "object": "chat.completion",
    "model": UPSTREAM_MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {
        "prompt_tokens": 3,
        "completion_tokens": 1,
        "total_tokens": 4,
        "cost": 0.001,
        "is_byok": False,
        "cost_details": {"upstream_inference_cost": 0.001},
    },
}
MESSAGES_ANSWER: dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": UPSTREAM_MODEL,
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 3, "output_tokens": 1, "cost": 0.001, "is_byok": False},
}
RESPONSES_ANSWER: dict[str, Any] = {
    "id": "resp_1",
    "object": "response",
    "status": "completed",
    "model": UPSTREAM_MODEL,
    "output": [],
    "usage": {
        "input_tokens": 3,
        "output_tokens": 1,
        "total_tokens": 4,
        "cost": 0.001,
        "cost_details": {"upstream_inference_cost": 0.001},
    },
}
JSON_ANSWERS = {
    "chat": ("/v1/chat/completions", CHAT_ANSWER),
    "messages": ("/v1/messages", MESSAGES_ANSWER),
    "responses": ("/v1/responses", RESPONSES_ANSWER),
}

# A multipart body whose audio bytes hold CRLFs, "--", and a near-delimiter.
BOUNDARY = "----trio-gateway-test-7d4a"
AUDIO = (
    b"RIFF\x00\x01\x02\xff\xfe\r\n--\r\n\r\n--"
    + BOUNDARY[:-1].encode()
    + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nevil\r\n\x00\x80--'
)


def form_body(model: str, audio: bytes = AUDIO, boundary: str = BOUNDARY) -> bytes:
    b = boundary.encode()
    return (
        b"--" + b + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n"
        b"--" + b + b"\r\n"
        b'Content-Disposition: form-data; name="model"\r\n\r\n' + model.encode() + b"\r\n"
        b"--" + b + b"\r\n"
        b'Content-Disposition: form-data; name="language"\r\n\r\nen\r\n'
        b"--" + b + b"--\r\n"
    )


def form_call(body: bytes, boundary: str = BOUNDARY, **kwargs: Any) -> AsgiCall:
    headers = [
        (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
        AUTH,
        *kwargs.pop("headers", []),
    ]
    return AsgiCall(path="/v1/audio/transcriptions", body=body, headers=headers, **kwargs)


def json_answer(payload: Any, status: int = 200, **kwargs: Any) -> FakeResponse:
    return FakeResponse(
        body=[orjson.dumps(payload)], status=status, content_type="application/json", **kwargs
    )


def ok_gateway(**config: Any) -> tuple[Gateway, FakeUpstream]:
    return make_gateway(json_answer(CHAT_ANSWER), **config)


def openai_error(call: AsgiCall) -> dict[str, Any]:
    body = call.json_body()
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "code", "param"}
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def anthropic_error(call: AsgiCall) -> dict[str, Any]:
    body = call.json_body()
    assert set(body) == {"type", "error"}
    assert body["type"] == "error"
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"type", "message"}
    assert error["message"]
    return error


def assert_json_answer(call: AsgiCall) -> None:
    """A complete JSON answer whose content-length matches what was sent."""
    assert call.ended
    assert call.response_headers[b"content-length"] == str(len(call.text)).encode()
    assert b"application/json" in call.response_headers[b"content-type"]


# --- routing, method, authentication -----------------------------------------------------


async def test_healthz_needs_no_key(autojump_clock: trio.testing.MockClock):
    gateway, upstream = ok_gateway()
    call = await AsgiCall(method="GET", path="/healthz").run(gateway)
    assert call.status == 200
    assert call.json_body() == {"status": "ok"}
    assert_json_answer(call)
    assert upstream.requests == []


async def test_models_lists_public_names_in_openai_shape(
    autojump_clock: trio.testing.MockClock,
):
    gateway, upstream = ok_gateway()
    call = await AsgiCall(method="GET", path="/v1/models", headers=[AUTH]).run(gateway)
    assert call.status == 200
    assert_json_answer(call)
    body = call.json_body()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [PUBLIC_MODEL]
    assert all(m["object"] == "model" for m in body["data"])
    assert UPSTREAM_MODEL.encode() not in call.text
    assert upstream.requests == []


@pytest.mark.parametrize(
    "headers", [[], [(b"authorization", b"Bearer wrong-key")]], ids=["missing", "wrong"]
)
async def test_models_needs_a_key(
    headers: list[tuple[bytes, bytes]], autojump_clock: trio.testing.MockClock
):
    gateway, _ = ok_gateway()
    call = await AsgiCall(method="GET", path="/v1/models", headers=headers).run(gateway)
    assert call.status == 401
    assert openai_error(call)["type"] == "authentication_error"
    assert PUBLIC_MODEL.encode() not in call.text


async def test_unknown_path_is_404_in_openai_shape(autojump_clock: trio.testing.MockClock):
    gateway, upstream = ok_gateway()
    for path in ("/v1/admin", "/v1/chat/completions/", "/", "/v1/../admin"):
        call = await AsgiCall.json({"model": PUBLIC_MODEL}, path=path).run(gateway)
        assert call.status == 404, path
        assert openai_error(call)["type"] == "not_found_error"
    assert upstream.requests == []


async def test_get_on_a_post_endpoint_is_405_with_allow(autojump_clock: trio.testing.MockClock):
    gateway, upstream = ok_gateway()
    call = await AsgiCall(method="GET", path="/v1/chat/completions", headers=[AUTH]).run(gateway)
    assert call.status == 405
    assert call.response_headers[b"allow"] == b"POST"
    assert openai_error(call)["type"] == "invalid_request_error"
    messages = await AsgiCall(method="GET", path="/v1/messages", headers=[AUTH]).run(gateway)
    assert messages.status == 405
    assert messages.response_headers[b"allow"] == b"POST"
    anthropic_error(messages)
    health = await AsgiCall(method="POST", path="/healthz").run(gateway)
    assert health.status == 405
    assert health.response_headers[b"allow"] == b"GET"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "key_header",
    [[], [(b"authorization", b"Bearer wrong-key")], [(b"x-api-key", b"wrong-key")]],
    ids=["missing", "wrong-bearer", "wrong-x-api-key"],
)
async def test_401_in_openai_shape_for_chat(
    key_header: list[tuple[bytes, bytes]], autojump_clock: trio.testing.MockClock
):
    gateway, upstream = ok_gateway()
    body = orjson.dumps(JSON_KINDS["chat"][1])
    call = await AsgiCall(body=body, headers=[JSON_CT, *key_header]).run(gateway)
    assert call.status == 401
    error = openai_error(call)
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "key_header",
    [[], [(b"authorization", b"Bearer wrong-key")], [(b"x-api-key", b"wrong-key")]],
    ids=["missing", "wrong-bearer", "wrong-x-api-key"],
)
async def test_401_in_anthropic_shape_for_messages(
    key_header: list[tuple[bytes, bytes]], autojump_clock: trio.testing.MockClock
):
    gateway, upstream = ok_gateway()
    body = orjson.dumps(JSON_KINDS["messages"][1])
    call = await AsgiCall(path="/v1/messages", body=body, headers=[JSON_CT, *key_header]).run(
        gateway
    )
    assert call.status == 401
    assert anthropic_error(call)["type"] == "authentication_error"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "key_header",
    [
        (b"authorization", f"Bearer {CLIENT_KEY}".encode()),
        (b"authorization", f"bearer {CLIENT_KEY}".encode()),
        (b"x-api-key", CLIENT_KEY.encode()),
    ],
    ids=["bearer", "bearer-lowercase", "x-api-key"],
)
async def test_client_key_accepted_in_either_header(
    key_header: tuple[bytes, bytes], autojump_clock: trio.testing.MockClock
):
    gateway, upstream = ok_gateway()
    body = orjson.dumps(JSON_KINDS["chat"][1])
    call = await AsgiCall(body=body, headers=[JSON_CT, key_header]).run(gateway)
    assert call.status == 200
    assert len(upstream.requests) == 1


def anonymous_gateway() -> tuple[Gateway, FakeUpstream]:
    config = dataclasses.replace(make_config(), keys=(), allow_anonymous=True)
    upstream = FakeUpstream(json_answer(CHAT_ANSWER))
    return Gateway(config, transport=upstream), upstream


async def test_allow_anonymous_lets_a_keyless_request_through(
    autojump_clock: trio.testing.MockClock,
):
    gateway, upstream = anonymous_gateway()
    body = orjson.dumps(JSON_KINDS["chat"][1])
    call = await AsgiCall(body=body, headers=[JSON_CT]).run(gateway)
    assert call.status == 200
    assert len(upstream.requests) == 1
    models = await AsgiCall(method="GET", path="/v1/models").run(gateway)
    assert models.status == 200


@pytest.mark.parametrize(
    "key_header",
    [
        (b"authorization", b"Bearer wrong-key"),
        (b"x-api-key", b"wrong-key"),
        (b"authorization", b"Basic dXNlcjpwYXNz"),
        (b"authorization", b"Bearer "),
    ],
    ids=["bearer", "x-api-key", "basic-scheme", "empty-bearer"],
)
async def test_allow_anonymous_still_refuses_a_wrong_key(
    key_header: tuple[bytes, bytes], autojump_clock: trio.testing.MockClock
):
    gateway, upstream = anonymous_gateway()
    body = orjson.dumps(JSON_KINDS["chat"][1])
    call = await AsgiCall(body=body, headers=[JSON_CT, key_header]).run(gateway)
    assert call.status == 401
    assert openai_error(call)["type"] == "authentication_error"
    assert upstream.requests == []


# --- request body checks -----------------------------------------------------------------


@pytest.mark.parametrize("kind", JSON_KINDS)
async def test_unknown_model_is_404_in_the_endpoint_shape(
    kind: str, autojump_clock: trio.testing.MockClock
):
    path, payload = JSON_KINDS[kind]
    gateway, upstream = ok_gateway()
    call = await AsgiCall.json({**payload, "model": "kilo/no-such-model"}, path=path).run(gateway)
    assert call.status == 404
    if kind == "messages":
        assert anthropic_error(call)["type"] == "not_found_error"
    else:
        error = openai_error(call)
        assert error["code"] == "model_not_found"
        assert error["type"] == "not_found_error"
    assert upstream.requests == []


async def test_upstream_model_name_is_not_a_public_name(autojump_clock: trio.testing.MockClock):
    gateway, upstream = ok_gateway()
    call = await AsgiCall.json({"model": UPSTREAM_MODEL, "messages": []}).run(gateway)
    assert call.status == 404
    assert upstream.requests == []


BAD_BODIES = {
    "not-json": b"{model: nope",
    "empty": b"",
    "array": b'[{"model": "kilo/free-model"}]',
    "string": b'"kilo/free-model"',
    "missing-model": b'{"messages": []}',
    "model-int": b'{"model": 5}',
    "model-null": b'{"model": null}',
    "model-empty": b'{"model": ""}',
    "model-list": b'{"model": ["kilo/free-model"]}',
    "model-object": b'{"model": {"id": "kilo/free-model"}}',
}


@pytest.mark.parametrize("name", BAD_BODIES)
@pytest.mark.parametrize("kind", ["chat", "messages"])
async def test_bad_body_is_400(kind: str, name: str, autojump_clock: trio.testing.MockClock):
    path = JSON_KINDS[kind][0]
    gateway, upstream = ok_gateway()
    call = await AsgiCall(path=path, body=BAD_BODIES[name], headers=[JSON_CT, AUTH]).run(gateway)
    assert call.status == 400
    if kind == "messages":
        assert anthropic_error(call)["type"] == "invalid_request_error"
    else:
        assert openai_error(call)["type"] == "invalid_request_error"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "content_type",
    [None, b"text/plain", b"application/x-www-form-urlencoded", b"application/jsonl"],
)
@pytest.mark.parametrize("kind", ["chat", "messages"])
async def test_wrong_content_type_is_415(
    kind: str, content_type: bytes | None, autojump_clock: trio.testing.MockClock
):
    path, payload = JSON_KINDS[kind]
    gateway, upstream = ok_gateway()
    headers = [AUTH] if content_type is None else [AUTH, (b"content-type", content_type)]
    call = await AsgiCall(path=path, body=orjson.dumps(payload), headers=headers).run(gateway)
    assert call.status == 415
    if kind == "messages":
        anthropic_error(call)
    else:
        openai_error(call)
    assert upstream.requests == []


@pytest.mark.parametrize(
    "content_type", [b"application/json; charset=utf-8", b"Application/JSON", b"application/json "]
)
async def test_json_content_type_parameters_and_case_accepted(
    content_type: bytes, autojump_clock: trio.testing.MockClock
):
    gateway, upstream = ok_gateway()
    body = orjson.dumps(JSON_KINDS["chat"][1])
    call = await AsgiCall(body=body, headers=[AUTH, (b"content-type", content_type)]).run(gateway)
    assert call.status == 200
    assert upstream.requests[0].headers["content-type"] == "application/json"


@pytest.mark.parametrize("kind", ["chat", "messages"])
async def test_body_over_limit_is_413_and_not_sent(
    kind: str, autojump_clock: trio.testing.MockClock
):
    path, payload = JSON_KINDS[kind]
    gateway, upstream = ok_gateway(max_body_bytes=1000)
    payload = {**payload, "padding": "x" * 5000}
    call = await AsgiCall.json(payload, path=path, body_chunk_size=100).run(gateway)
    assert call.status == 413
    if kind == "messages":
        assert anthropic_error(call)["type"] == "request_too_large"
    else:
        assert openai_error(call)["code"] == "body_too_large"
    assert upstream.requests == []


async def test_body_reading_stops_at_the_limit(autojump_clock: trio.testing.MockClock):
    """The gateway stops taking body chunks once past the limit; it never buffers the rest."""
    gateway, upstream = ok_gateway(max_body_bytes=1000)
    chunks_given = 0
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        nonlocal chunks_given
        chunks_given += 1
        if chunks_given > 1000:
            raise AssertionError("the gateway kept reading past the limit")
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    call = AsgiCall.json({}, body_chunk_size=100)
    await gateway(call.scope, receive, send)
    assert sent[0]["status"] == 413
    assert chunks_given == 11  # 1100 bytes: the first chunk that passes 1000
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("declared", "status", "reads"),
    [(b"1001", 413, 0), (b"99999999999999999999", 413, 0), (b"1000", 200, 1), (b"+5", 200, 1)],
)
async def test_declared_oversize_body_is_413_before_any_read(
    declared: bytes, status: int, reads: int, autojump_clock: trio.testing.MockClock
):
    gateway, upstream = ok_gateway(max_body_bytes=1000)
    body = orjson.dumps(JSON_KINDS["chat"][1])
    reads_done = 0

    async def receive() -> MutableMapping[str, Any]:
        nonlocal reads_done
        reads_done += 1
        if reads_done > 1:  # the disconnect watcher: the client stays
            await trio.sleep_forever()
        return {"type": "http.request", "body": body, "more_body": False}

    call = AsgiCall.json({}, headers=[(b"content-length", declared)])
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await gateway(call.scope, receive, send)
    assert sent[0]["status"] == status
    assert min(reads_done, 1) == reads, "refused on the declared length, before reading"
    assert len(upstream.requests) == (status == 200)


async def test_body_exactly_at_the_limit_is_accepted(autojump_clock: trio.testing.MockClock):
    payload: dict[str, Any] = {**JSON_KINDS["chat"][1], "pad": ""}
    size = len(orjson.dumps(payload))
    payload["pad"] = "x" * (1000 - size)
    assert len(orjson.dumps(payload)) == 1000
    gateway, upstream = ok_gateway(max_body_bytes=1000)
    call = await AsgiCall.json(payload, body_chunk_size=7).run(gateway)
    assert call.status == 200
    assert len(upstream.requests) == 1


async def test_client_leaving_mid_body_sends_nothing_upstream(
    autojump_clock: trio.testing.MockClock,
):
    gateway, upstream = ok_gateway()
    messages: list[MutableMapping[str, Any]] = [
        {"type": "http.request", "body": b'{"model": "kilo/', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> MutableMapping[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    await gateway(AsgiCall.json({}).scope, receive, send)
    assert upstream.requests == []


# --- the upstream request ----------------------------------------------------------------


@pytest.mark.parametrize("kind", JSON_KINDS)
async def test_upstream_gets_the_upstream_model_at_the_kind_url(
    kind: str, autojump_clock: trio.testing.MockClock
):
    path, payload = JSON_KINDS[kind]
    gateway, upstream = ok_gateway()
    payload = {**payload, "temperature": 0.5, "metadata": {"a": [1, 2, {"b": None}]}}
    call = await AsgiCall.json(payload, path=path).run(gateway)
    assert call.status == 200
    (request,) = upstream.requests
    assert request.method == "POST"
    assert str(request.url) == BASE_URL + path.removeprefix("/v1")
    sent = upstream.request_json
    assert sent == {**payload, "model": UPSTREAM_MODEL}
    assert request.headers["content-type"] == "application/json"


async def test_transcriptions_url(autojump_clock: trio.testing.MockClock):
    gateway, upstream = make_gateway(json_answer({"text": "hello"}))
    call = await form_call(form_body(PUBLIC_MODEL)).run(gateway)
    assert call.status == 200
    assert str(upstream.requests[0].url) == BASE_URL + "/audio/transcriptions"


@pytest.mark.parametrize(
    "stream_options",
    [None, {"include_usage": False}, {"include_usage": False, "other": 1}, "junk", []],
    ids=["absent", "false", "false-with-other", "string", "list"],
)
async def test_streamed_chat_forces_include_usage(
    stream_options: Any, autojump_clock: trio.testing.MockClock
):
    gateway, upstream = make_gateway(FakeResponse(body=sse({"model": UPSTREAM_MODEL}, "[DONE]")))
    payload: dict[str, Any] = {"model": PUBLIC_MODEL, "stream": True, "messages": []}
    if stream_options is not None:
        payload["stream_options"] = stream_options
    call = await AsgiCall.json(payload).run(gateway)
    assert call.status == 200
    sent = upstream.request_json
    assert sent["stream_options"]["include_usage"] is True
    if isinstance(stream_options, dict) and "other" in stream_options:
        assert sent["stream_options"]["other"] == 1
    assert upstream.requests[0].headers["accept"] == "text/event-stream"


@pytest.mark.parametrize("stream", [None, False, "true", 1], ids=["absent", "false", "str", "int"])
async def test_non_streamed_chat_gets_no_stream_options(
    stream: Any, autojump_clock: trio.testing.MockClock
):
    gateway, upstream = ok_gateway()
    payload: dict[str, Any] = {"model": PUBLIC_MODEL, "messages": []}
    if stream is not None:
        payload["stream"] = stream
    call = await AsgiCall.json(payload).run(gateway)
    assert call.status == 200
    assert "stream_options" not in upstream.request_json
    assert upstream.requests[0].headers["accept"] == "application/json"


@pytest.mark.parametrize("kind", ["messages", "responses"])
async def test_other_streamed_kinds_get_no_stream_options(
    kind: str, autojump_clock: trio.testing.MockClock
):
    path, payload = JSON_KINDS[kind]
    gateway, upstream = make_gateway(FakeResponse(body=[]))
    await AsgiCall.json({**payload, "stream": True}, path=path).run(gateway)
    assert "stream_options" not in upstream.request_json


CLIENT_HEADERS = [
    (b"x-api-key", CLIENT_KEY.encode()),
    (b"cookie", b"session=client-session"),
    (b"x-forwarded-for", b"10.1.2.3"),
    (b"x-real-ip", b"10.1.2.3"),
    (b"user-agent", b"client-agent/1.0"),
    (b"http-referer", b"https://client.example"),
    (b"x-title", b"client app"),
    (b"x-request-id", b"client-request-id"),
    (b"host", b"gateway.example"),
    (b"proxy-authorization", b"Basic Y2xpZW50"),
    (b"accept-encoding", b"gzip, br"),
    (b"anthropic-version", b"2023-06-01"),
    (b"anthropic-beta", b"tools-2024-04-04"),
    (b"openai-beta", b"assistants=v2"),
]
FORWARDED = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "tools-2024-04-04",
    "openai-beta": "assistants=v2",
}


def assert_no_client_headers(request: httpx.Request) -> None:
    names = {name.lower() for name in request.headers}
    for name in ("cookie", "x-forwarded-for", "x-real-ip", "http-referer", "x-title"):
        assert name not in names
    assert "proxy-authorization" not in names
    assert "x-request-id" not in names
    raw = b"\n".join(k + b": " + v for k, v in request.headers.raw)
    for secret in (CLIENT_KEY.encode(), b"client-session", b"10.1.2.3", b"client-agent"):
        assert secret not in raw
    assert request.headers["host"] == "upstream.invalid"
    assert request.headers["accept-encoding"] == "identity"
    assert request.headers["user-agent"].startswith("trio-gateway/")
    for name, value in FORWARDED.items():
        assert request.headers.get_list(name) == [value]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_cookie_the_upstream_sets_is_never_sent_back(
    stream: bool, autojump_clock: trio.testing.MockClock
):
    # The upstream pool is shared by every request: a cookie set while
    # answering one client must not travel with the next client's request.
    cookie = {"set-cookie": "__cf_bm=upstream-session; path=/; domain=upstream.invalid"}
    if stream:
        answer = FakeResponse(body=sse({"model": UPSTREAM_MODEL}, "[DONE]"), extra_headers=cookie)
    else:
        answer = json_answer(CHAT_ANSWER, extra_headers=cookie)
    gateway, upstream = make_gateway(answer)
    payload = {**JSON_KINDS["chat"][1], "stream": stream}
    for _ in range(2):
        call = await AsgiCall.json(payload).run(gateway)
        assert call.status == 200
    assert len(upstream.requests) == 2
    for request in upstream.requests:
        assert "cookie" not in request.headers
        assert b"upstream-session" not in b"".join(v for _, v in request.headers.raw)


async def test_upstream_gets_bearer_upstream_key_and_no_client_headers(
    autojump_clock: trio.testing.MockClock,
):
    gateway, upstream = ok_gateway()
    call = await AsgiCall.json(JSON_KINDS["chat"][1], headers=CLIENT_HEADERS).run(gateway)
    assert call.status == 200
    (request,) = upstream.requests
    assert request.headers.get_list("authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert "x-api-key" not in request.headers
    assert_no_client_headers(request)


async def test_upstream_gets_x_api_key_when_configured(autojump_clock: trio.testing.MockClock):
    gateway, upstream = make_gateway(json_answer(MESSAGES_ANSWER), auth="x-api-key")
    assert gateway.config.upstreams["vendor"].auth == "x-api-key"  # make_gateway passed it on
    call = await AsgiCall.json(
        JSON_KINDS["messages"][1], path="/v1/messages", headers=CLIENT_HEADERS
    ).run(gateway)
    assert call.status == 200
    (request,) = upstream.requests
    assert request.headers.get_list("x-api-key") == [UPSTREAM_KEY]
    assert "authorization" not in request.headers
    assert_no_client_headers(request)


async def test_transcriptions_headers_are_fresh_too(autojump_clock: trio.testing.MockClock):
    gateway, upstream = make_gateway(json_answer({"text": "hello"}))
    call = await form_call(form_body(PUBLIC_MODEL), headers=CLIENT_HEADERS).run(gateway)
    assert call.status == 200
    (request,) = upstream.requests
    assert request.headers.get_list("authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert_no_client_headers(request)


@pytest.mark.parametrize(
    "model",
    [
        "../../admin",
        "kilo/free-model/../../admin",
        "kilo/free-model\r\nx-injected: yes",
        "kilo/free-model\nHost: evil.example",
        f"{PUBLIC_MODEL}\r\n",
        f" {PUBLIC_MODEL}",
        PUBLIC_MODEL.upper(),
    ],
)
@pytest.mark.parametrize("kind", ["chat", "messages"])
async def test_hostile_model_names_are_data(
    kind: str, model: str, autojump_clock: trio.testing.MockClock
):
    path, payload = JSON_KINDS[kind]
    gateway, upstream = ok_gateway()
    call = await AsgiCall.json({**payload, "model": model}, path=path).run(gateway)
    assert call.status == 404
    assert upstream.requests == []
    assert set(call.response_headers) == {b"content-type", b"content-length", b"x-request-id"}
    assert all(b"\n" not in v and b"\r" not in v for v in call.response_headers.values())
    assert b"x-injected" not in b"".join(call.response_headers)


@pytest.mark.parametrize("model", ["../../admin", "kilo/free-model\r\nx-injected: yes"])
async def test_hostile_model_names_in_a_form_are_data(
    model: str, autojump_clock: trio.testing.MockClock
):
    gateway, upstream = make_gateway(json_answer({"text": "hello"}))
    call = await form_call(form_body(model)).run(gateway)
    assert call.status == 404
    assert openai_error(call)["code"] == "model_not_found"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "header",
    [
        (b"anthropic-version", b"2023-06-01\r\nx-injected: yes"),
        (b"anthropic-beta", b"tools\nHost: evil.example"),
        (b"openai-beta", b"assistants=v2\x00"),
        (b"anthropic-beta", "caf\u00e9".encode()),
    ],
    ids=["crlf", "lf", "nul", "non-ascii"],
)
@pytest.mark.parametrize("kind", ["chat", "messages"])
async def test_forwarded_header_with_a_line_break_is_400_and_never_sent(
    kind: str, header: tuple[bytes, bytes], autojump_clock: trio.testing.MockClock
):
    path, payload = JSON_KINDS[kind]
    gateway, upstream = ok_gateway()
    call = await AsgiCall.json(payload, path=path, headers=[header]).run(gateway)
    assert call.status == 400
    message = (
        anthropic_error(call)["message"] if kind == "messages" else openai_error(call)["message"]
    )
    assert header[0].decode() in message
    assert upstream.requests == []


# --- transcriptions (multipart) ----------------------------------------------------------


async def test_transcription_form_has_only_the_model_replaced(
    autojump_clock: trio.testing.MockClock,
):
    gateway, upstream = make_gateway(json_answer({"text": "hello"}))
    body = form_body(PUBLIC_MODEL)
    call = await form_call(body, body_chunk_size=13).run(gateway)
    assert call.status == 200
    assert call.json_body() == {"text": "hello"}
    (request,) = upstream.requests
    assert request.content == form_body(UPSTREAM_MODEL)
    assert AUDIO in request.content  # the file bytes, byte for byte
    assert request.headers["content-type"] == f"multipart/form-data; boundary={BOUNDARY}"
    assert request.headers["content-length"] == str(len(form_body(UPSTREAM_MODEL)))


async def test_transcription_form_with_quoted_boundary(autojump_clock: trio.testing.MockClock):
    gateway, upstream = make_gateway(json_answer({"text": "hello"}))
    body = form_body(PUBLIC_MODEL)
    content_type = f'multipart/form-data; boundary="{BOUNDARY}"'.encode()
    call = await AsgiCall(
        path="/v1/audio/transcriptions",
        body=body,
        headers=[(b"content-type", content_type), AUTH],
    ).run(gateway)
    assert call.status == 200
    assert upstream.requests[0].content == form_body(UPSTREAM_MODEL)


async def test_transcription_text_answer_passes_through(autojump_clock: trio.testing.MockClock):
    gateway, _ = make_gateway(
        FakeResponse(body=[b"hello ", b"world\n"], content_type="text/plain; charset=utf-8")
    )
    call = await form_call(form_body(PUBLIC_MODEL)).run(gateway)
    assert call.status == 200
    assert call.text == b"hello world\n"
    assert call.response_headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert call.response_headers[b"content-length"] == b"12"


async def test_transcription_unknown_model_is_404(autojump_clock: trio.testing.MockClock):
    gateway, upstream = make_gateway(json_answer({"text": "hello"}))
    call = await form_call(form_body("kilo/no-such-model")).run(gateway)
    assert call.status == 404
    assert openai_error(call)["code"] == "model_not_found"
    assert upstream.requests == []


def _without_model(body: bytes) -> bytes:
    start = body.index(b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="m')
    end = body.index(b"--" + BOUNDARY.encode(), start + 2)
    return body[:start] + body[end:]


MALFORMED_FORMS: dict[str, tuple[bytes, bytes]] = {
    "no-boundary-param": (form_body(PUBLIC_MODEL), b"multipart/form-data"),
    "boundary-not-in-body": (
        form_body(PUBLIC_MODEL),
        b"multipart/form-data; boundary=some-other-boundary",
    ),
    "unclosed-part": (
        form_body(PUBLIC_MODEL)[:150],
        f"multipart/form-data; boundary={BOUNDARY}".encode(),
    ),
    "no-blank-line": (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"'.encode(),
        f"multipart/form-data; boundary={BOUNDARY}".encode(),
    ),
    "bad-delimiter-line": (
        f"--{BOUNDARY}XX".encode() + form_body(PUBLIC_MODEL)[len(BOUNDARY) + 2 :],
        f"multipart/form-data; boundary={BOUNDARY}".encode(),
    ),
    "no-model-field": (
        _without_model(form_body(PUBLIC_MODEL)),
        f"multipart/form-data; boundary={BOUNDARY}".encode(),
    ),
    "empty": (b"", f"multipart/form-data; boundary={BOUNDARY}".encode()),
}


@pytest.mark.parametrize("name", MALFORMED_FORMS)
async def test_malformed_form_is_400(name: str, autojump_clock: trio.testing.MockClock):
    body, content_type = MALFORMED_FORMS[name]
    gateway, upstream = make_gateway(json_answer({"text": "hello"}))
    call = await AsgiCall(
        path="/v1/audio/transcriptions", body=body, headers=[(b"content-type", content_type), AUTH]
    ).run(gateway)
    assert call.status == 400
    assert openai_error(call)["type"] == "invalid_request_error"
    assert upstream.requests == []


@pytest.mark.parametrize("content_type", [b"application/octet-stream", b"application/json"])
async def test_transcription_with_wrong_content_type_is_415(
    content_type: bytes, autojump_clock: trio.testing.MockClock
):
    gateway, upstream = make_gateway(json_answer({"text": "hello"}))
    call = await AsgiCall(
        path="/v1/audio/transcriptions",
        body=form_body(PUBLIC_MODEL),
        headers=[(b"content-type", content_type), AUTH],
    ).run(gateway)
    assert call.status == 415
    assert openai_error(call)["type"] == "invalid_request_error"
    assert upstream.requests == []


async def test_transcription_form_over_limit_is_413(autojump_clock: trio.testing.MockClock):
    gateway, upstream = make_gateway(json_answer({"text": "hello"}), max_body_bytes=1000)
    body = form_body(PUBLIC_MODEL, audio=b"\x00" * 5000)
    call = await form_call(body, body_chunk_size=256).run(gateway)
    assert call.status == 413
    assert upstream.requests == []


@pytest.mark.parametrize("kind", ["transcriptions", "embeddings"])
async def test_event_stream_answer_for_a_kind_without_a_stream_policy(
    kind: str, autojump_clock: trio.testing.MockClock
):
    answer = FakeResponse(body=[b'data: {"type":"transcript.text.done","text":"hi"}\n\n'])
    gateway, upstream = make_gateway(answer)
    if kind == "transcriptions":
        call = form_call(form_body(PUBLIC_MODEL))
    else:
        path, payload = JSON_KINDS["embeddings"]
        call = AsgiCall.json(payload, path=path)
    await call.run(gateway)
    assert call.status == 200
    assert call.ended
    assert len(upstream.requests) == 1
    # Passed through as it came, whole events only.
    assert call.text == b'data: {"type":"transcript.text.done","text":"hi"}\n\n'


# --- whole answers -----------------------------------------------------------------------


async def test_embeddings_answer_model_is_public(autojump_clock: trio.testing.MockClock):
    answer = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
        "model": UPSTREAM_MODEL,
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    gateway, _ = make_gateway(json_answer(answer))
    path, payload = JSON_KINDS["embeddings"]
    call = await AsgiCall.json(payload, path=path).run(gateway)
    assert call.status == 200
    assert_json_answer(call)
    assert call.json_body() == {**answer, "model": PUBLIC_MODEL}
    assert UPSTREAM_MODEL.encode() not in call.text


@pytest.mark.parametrize("kind", JSON_ANSWERS)
async def test_json_answer_free_model_is_public_and_costless(
    kind: str, autojump_clock: trio.testing.MockClock
):
    path, answer = JSON_ANSWERS[kind]
    gateway, _ = make_gateway(json_answer(answer))
    call = await AsgiCall.json(JSON_KINDS[kind][1], path=path).run(gateway)
    assert call.status == 200
    assert_json_answer(call)
    body = call.json_body()
    assert body["model"] == PUBLIC_MODEL
    usage = with_strict_usage(kind, answer["usage"])
    for name in ("cost", "cost_details", "is_byok"):
        usage.pop(name, None)
    assert body["usage"] == usage
    assert {k: v for k, v in body.items() if k not in ("model", "usage")} == {
        k: v for k, v in answer.items() if k not in ("model", "usage")
    }
    for word in (b"cost", b"is_byok", UPSTREAM_MODEL.encode()):
        assert word not in call.text


@pytest.mark.parametrize("kind", JSON_ANSWERS)
async def test_json_answer_paid_model_keeps_cost(kind: str, autojump_clock: trio.testing.MockClock):
    path, answer = JSON_ANSWERS[kind]
    gateway, _ = make_gateway(json_answer(answer), free=False)
    call = await AsgiCall.json(JSON_KINDS[kind][1], path=path).run(gateway)
    assert call.status == 200
    assert_json_answer(call)
    usage = with_strict_usage(kind, answer["usage"])
    assert call.json_body() == {**answer, "model": PUBLIC_MODEL, "usage": usage}


def with_strict_usage(kind: str, usage: dict[str, Any]) -> dict[str, Any]:
    """``usage`` as a chat answer gets it, stream or JSON: ``cached_tokens`` defaults to 0."""
    usage = dict(usage)
    if kind == "chat":
        details = dict(usage.get("prompt_tokens_details") or {})
        if details.get("cached_tokens") is None:
            details["cached_tokens"] = 0
        usage["prompt_tokens_details"] = details
    return usage


async def test_json_answer_with_public_model_and_no_cost_is_byte_for_byte(
    autojump_clock: trio.testing.MockClock,
):
    raw = (
        b'{ "model" : "kilo/free-model", "x": 1.50,'
        b' "usage": {"total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}} }'
    )
    gateway, _ = make_gateway(FakeResponse(body=[raw], content_type="application/json"))
    call = await AsgiCall.json(JSON_KINDS["chat"][1]).run(gateway)
    assert call.text == raw
    assert_json_answer(call)


async def test_stream_request_answered_with_json_gets_json(
    autojump_clock: trio.testing.MockClock,
):
    gateway, _ = make_gateway(json_answer(CHAT_ANSWER))
    call = await AsgiCall.json({**JSON_KINDS["chat"][1], "stream": True}).run(gateway)
    assert call.status == 200
    assert_json_answer(call)
    assert call.response_headers[b"content-type"] == b"application/json"
    assert b"cache-control" not in call.response_headers
    body = call.json_body()
    assert body["model"] == PUBLIC_MODEL
    assert "cost" not in body["usage"]


@pytest.mark.parametrize(
    ("status", "headers"),
    [(429, {"retry-after": "7"}), (503, {"retry-after": "30"}), (500, {}), (400, {})],
)
@pytest.mark.parametrize("kind", ["chat", "messages"])
async def test_upstream_error_status_passes_through(
    kind: str, status: int, headers: dict[str, str], autojump_clock: trio.testing.MockClock
):
    path, payload = JSON_KINDS[kind]
    error = {"error": {"message": "slow down", "code": status, "metadata": {"n": 1}}}
    gateway, _ = make_gateway(json_answer(error, status, extra_headers=headers))
    call = await AsgiCall.json({**payload, "stream": True}, path=path).run(gateway)
    assert call.status == status
    assert_json_answer(call)
    assert call.json_body() == error
    if "retry-after" in headers:
        assert call.response_headers[b"retry-after"] == headers["retry-after"].encode()
    else:
        assert b"retry-after" not in call.response_headers


@pytest.mark.parametrize(
    ("status", "client_status"), [(502, 502), (404, 404), (200, 502), (302, 502)]
)
@pytest.mark.parametrize("kind", JSON_KINDS)
async def test_non_json_answer_becomes_an_error_in_the_kinds_shape(
    kind: str, status: int, client_status: int, autojump_clock: trio.testing.MockClock
):
    page = b"<html>bad gateway from cdn.example</html>"
    answer = FakeResponse(body=[page[:9], page[9:]], status=status, content_type="text/html")
    gateway, _ = make_gateway(answer)
    path, payload = JSON_KINDS[kind]
    call = await AsgiCall.json({**payload, "stream": True}, path=path).run(gateway)
    assert call.status == client_status
    assert_json_answer(call)
    assert b"cdn.example" not in call.text
    if kind == "messages":
        message = anthropic_error(call)["message"]
    else:
        message = openai_error(call)["message"]
    assert f"answered {status} with a body that is not a JSON object" in message


async def test_json_answer_that_is_not_an_object_is_502(autojump_clock: trio.testing.MockClock):
    gateway, _ = make_gateway(json_answer(["not", "an", "answer"]))
    call = await AsgiCall.json(JSON_KINDS["chat"][1]).run(gateway)
    assert call.status == 502
    assert openai_error(call)["code"] == "upstream_invalid"


async def test_transcription_html_error_page_becomes_json(autojump_clock: trio.testing.MockClock):
    answer = FakeResponse(body=[b"<html>oops</html>"], status=503, content_type="text/html")
    gateway, _ = make_gateway(answer)
    call = await form_call(form_body(PUBLIC_MODEL)).run(gateway)
    assert call.status == 503
    assert openai_error(call)["code"] == "upstream_invalid"


@pytest.mark.parametrize("status", [401, 403, 407])
@pytest.mark.parametrize("kind", ["chat", "messages"])
async def test_upstream_refusing_our_credentials_is_502_without_its_words(
    kind: str, status: int, autojump_clock: trio.testing.MockClock
):
    path, payload = JSON_KINDS[kind]
    words = {"error": {"message": f"Invalid key {UPSTREAM_KEY} (user 1234)", "code": status}}
    gateway, _ = make_gateway(json_answer(words, status, extra_headers={"retry-after": "1"}))
    call = await AsgiCall.json(payload, path=path).run(gateway)
    assert call.status == 502
    assert_json_answer(call)
    assert UPSTREAM_KEY.encode() not in call.text
    assert b"user 1234" not in call.text
    if kind == "messages":
        assert anthropic_error(call)["type"] == "api_error"
    else:
        assert openai_error(call)["code"] == "upstream_auth"


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (400, "application/json", {"error": {"message": f"bad header: Bearer {UPSTREAM_KEY}"}}),
        (200, "application/json", {**CHAT_ANSWER, "echo": UPSTREAM_KEY}),
        (200, "text/plain", f"debug: key={UPSTREAM_KEY}"),
    ],
    ids=["error-json", "ok-json", "transcription-text"],
)
async def test_bodies_echoing_the_upstream_key_are_redacted(
    status: int, content_type: str, body: Any, autojump_clock: trio.testing.MockClock
):
    raw = body.encode() if isinstance(body, str) else orjson.dumps(body)
    answer = FakeResponse(body=[raw[:20], raw[20:]], status=status, content_type=content_type)
    gateway, _ = make_gateway(answer)
    if content_type == "text/plain":  # only a transcription passes a text answer on
        call = await form_call(form_body(PUBLIC_MODEL)).run(gateway)
    else:
        call = await AsgiCall.json(JSON_KINDS["chat"][1]).run(gateway)
    assert call.status == status
    assert UPSTREAM_KEY.encode() not in call.text
    assert b"[redacted]" in call.text
    assert call.response_headers[b"content-length"] == str(len(call.text)).encode()


async def test_upstream_body_over_limit_is_502(autojump_clock: trio.testing.MockClock):
    config = dataclasses.replace(make_config(), max_upstream_body_bytes=1000)
    big = orjson.dumps({**CHAT_ANSWER, "pad": "x" * 2000})
    upstream = FakeUpstream(
        FakeResponse(
            body=[big[i : i + 100] for i in range(0, len(big), 100)],
            content_type="application/json",
        )
    )
    gateway = Gateway(config, transport=upstream)
    call = await AsgiCall.json(JSON_KINDS["chat"][1]).run(gateway)
    assert call.status == 502
    assert_json_answer(call)
    assert openai_error(call)["type"] == "upstream_error"
    assert b"xxxx" not in call.text
    assert upstream.bodies[0].chunks_yielded <= 11  # stopped reading at the limit
    assert upstream.bodies[0].closed_at is not None


@pytest.mark.parametrize("kind", ["chat", "messages"])
async def test_json_answer_cut_mid_body_is_502(kind: str, autojump_clock: trio.testing.MockClock):
    path, answer = JSON_ANSWERS[kind]
    raw = orjson.dumps(answer)
    cut = FakeResponse(
        body=[raw[:30], httpx.ReadError("connection reset by upstream.invalid")],
        content_type="application/json",
    )
    gateway, _ = make_gateway(cut)
    call = await AsgiCall.json(JSON_KINDS[kind][1], path=path).run(gateway)
    assert call.status == 502
    assert_json_answer(call)
    assert raw[:30] not in call.text
    assert b"upstream.invalid" not in call.text
    if kind == "messages":
        assert anthropic_error(call)["type"] == "api_error"
    else:
        assert openai_error(call)["code"] == "upstream_reset"


@pytest.mark.parametrize("kind", ["chat", "messages"])
async def test_idle_timeout_during_json_body_is_504(
    kind: str, autojump_clock: trio.testing.MockClock
):
    path, answer = JSON_ANSWERS[kind]
    raw = orjson.dumps(answer)
    gateway, upstream = make_gateway(
        FakeResponse(body=[raw[:30], STALL], content_type="application/json")
    )
    start = trio.current_time()
    call = await AsgiCall.json(JSON_KINDS[kind][1], path=path).run(gateway)
    assert call.status == 504
    assert trio.current_time() - start == pytest.approx(gateway.config.timeouts.idle)
    assert_json_answer(call)
    if kind == "messages":
        assert anthropic_error(call)["type"] == "api_error"
    else:
        error = openai_error(call)
        assert error["type"] == "timeout_error"
        assert error["code"] == "idle_timeout"
    assert upstream.bodies[0].closed_at is not None


# --- response headers --------------------------------------------------------------------

LEAKY_HEADERS = {
    "set-cookie": "__cf_bm=upstream; path=/",
    "x-openrouter-provider": "SecretProvider",
    "server": "cloudflare",
    "cf-ray": "abc123",
    "x-ratelimit-remaining-requests": "99",
    "openai-organization": "org-upstream",
    "content-encoding": "identity",
}


async def test_json_answer_headers_are_only_ours(autojump_clock: trio.testing.MockClock):
    headers = {**LEAKY_HEADERS, "retry-after": "3"}
    gateway, _ = make_gateway(json_answer(CHAT_ANSWER, extra_headers=headers))
    call = await AsgiCall.json(JSON_KINDS["chat"][1]).run(gateway)
    assert call.status == 200
    assert set(call.response_headers) == {
        b"content-type",
        b"content-length",
        b"x-request-id",
        b"retry-after",
        b"x-gateway-served-by",
    }
    assert call.response_headers[b"retry-after"] == b"3"
    served_by = call.response_headers[b"x-gateway-served-by"]
    assert served_by == f"{PUBLIC_MODEL}; upstream=vendor".encode()
    assert UPSTREAM_KEY.encode() not in served_by
    assert re.fullmatch(rb"[0-9a-f]{32}", call.response_headers[b"x-request-id"])


async def test_stream_answer_headers_are_only_ours(autojump_clock: trio.testing.MockClock):
    answer = FakeResponse(
        body=sse({"model": UPSTREAM_MODEL}, "[DONE]"), extra_headers=LEAKY_HEADERS
    )
    gateway, _ = make_gateway(answer)
    call = await AsgiCall.json({**JSON_KINDS["chat"][1], "stream": True}).run(gateway)
    assert call.status == 200
    assert set(call.response_headers) == {
        b"content-type",
        b"cache-control",
        b"x-accel-buffering",
        b"x-request-id",
        b"x-gateway-served-by",
    }
    assert b"SecretProvider" not in call.text


async def test_error_headers_are_only_ours(autojump_clock: trio.testing.MockClock):
    gateway, _ = make_gateway(json_answer({"error": {}}, 401, extra_headers=LEAKY_HEADERS))
    call = await AsgiCall.json(JSON_KINDS["chat"][1]).run(gateway)
    assert call.status == 502
    assert set(call.response_headers) == {
        b"content-type",
        b"content-length",
        b"x-request-id",
        b"x-gateway-served-by",
    }


async def test_request_ids_are_hex_and_fresh(autojump_clock: trio.testing.MockClock):
    gateway, _ = ok_gateway()
    ids = set()
    calls = [
        AsgiCall(method="GET", path="/healthz"),
        AsgiCall(method="GET", path="/nowhere"),
        AsgiCall.json(JSON_KINDS["chat"][1]),
        AsgiCall.json(JSON_KINDS["chat"][1]),
        AsgiCall.json({"model": "nope"}),
    ]
    for call in calls:
        await call.run(gateway)
        request_id = call.response_headers[b"x-request-id"]
        assert re.fullmatch(rb"[0-9a-f]{32}", request_id)
        ids.add(request_id)
    assert len(ids) == len(calls)


async def test_transcription_content_type_that_cannot_go_upstream_is_400(
    autojump_clock: trio.testing.MockClock,
):
    """Found by the request fuzz target: the multipart content type is forwarded as it is."""
    boundary = "b\xc3oundary"
    body = form_body(PUBLIC_MODEL, boundary=boundary)
    call = form_call(body, boundary=boundary)
    call.headers[0] = (
        b"content-type",
        f"multipart/form-data; boundary={boundary}".encode("latin-1"),
    )
    gateway, upstream = make_gateway(json_answer({"text": "hello"}))
    await call.run(gateway)
    assert call.status == 400
    assert openai_error(call)["code"] == "invalid_header"
    assert upstream.requests == []
