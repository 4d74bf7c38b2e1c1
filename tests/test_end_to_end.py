"""End to end: the official SDKs -> hypercorn -> the gateway -> the mock upstream.

Everything listens on 127.0.0.1 port 0. The SDKs are synchronous clients run
in a worker thread, so the servers keep running in the test's Trio loop.
Every test has an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import io
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import httpx
import openai
import pytest
import trio

from tests.helpers import AsgiCall, serve_command
from trio_gateway._core.config import (
    GatewayConfig,
    KeyEntry,
    ModelRoute,
    Timeouts,
    Upstream,
    hash_key,
)
from trio_gateway._proxy.app import Gateway
from trio_gateway._server.serve import serve
from trio_gateway.testing.mock_upstream import MockRequest, MockUpstream, Script, expected_text

CLIENT_KEY = "e2e-client-key"
UPSTREAM_KEY = "e2e-upstream-secret"
FREE = "e2e/free-model"
PAID = "e2e/paid-model"
TIME_LIMIT = 20
T = TypeVar("T")


@dataclass
class Stack:
    gateway_url: str
    mock: MockUpstream
    gateway: Gateway

    def __post_init__(self) -> None:
        self._openai = openai.OpenAI(
            base_url=f"{self.gateway_url}/v1", api_key=CLIENT_KEY, max_retries=0
        )
        self._anthropic = anthropic.Anthropic(
            base_url=self.gateway_url, api_key=CLIENT_KEY, max_retries=0
        )

    def openai(self) -> openai.OpenAI:
        return self._openai

    def anthropic(self) -> anthropic.Anthropic:
        return self._anthropic

    def close(self) -> None:
        self._openai.close()
        self._anthropic.close()


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


@pytest.fixture
async def stack(nursery: trio.Nursery) -> AsyncIterator[Stack]:
    mock = MockUpstream(Script(tokens=8), api_key=UPSTREAM_KEY)
    stopped = trio.Event()
    with trio.fail_after(TIME_LIMIT):
        await nursery.start(mock.serve)
        config = GatewayConfig(
            upstreams={"mock": Upstream("mock", mock.base_url, UPSTREAM_KEY)},
            models={
                FREE: ModelRoute(FREE, "mock", "vendor/model:free", free=True),
                PAID: ModelRoute(PAID, "mock", "vendor/model"),
            },
            keys=(KeyEntry("e2e", hash_key(CLIENT_KEY)),),
        )
        gateway = Gateway(config)
        urls = await nursery.start(
            partial(serve, gateway, "127.0.0.1:0", shutdown_trigger=stopped.wait)
        )
    stack = Stack(urls[0], mock, gateway)
    yield stack
    stack.close()
    stopped.set()


def no_cost(usage: Any) -> None:
    extra = getattr(usage, "model_extra", None) or {}
    assert not {"cost", "cost_details", "is_byok"} & set(extra)


async def test_openai_chat_streaming(stack: Stack):
    with trio.fail_after(TIME_LIMIT):

        def run() -> list[Any]:
            stream = stack.openai().chat.completions.create(
                model=FREE, stream=True, messages=[{"role": "user", "content": "hi"}]
            )
            return list(stream)

        chunks = await in_thread(run)
    assert {chunk.model for chunk in chunks} == {FREE}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(Script(tokens=8))
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 8
    no_cost(usage)
    sent = stack.mock.requests[-1]
    assert sent.json is not None
    assert sent.json["model"] == "vendor/model:free"
    assert sent.json["stream_options"] == {"include_usage": True}
    assert sent.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_KEY not in str(sent.headers)


async def test_openai_chat_json_paid_model_keeps_cost(stack: Stack):
    with trio.fail_after(TIME_LIMIT):
        completion = await in_thread(
            lambda: stack.openai().chat.completions.create(
                model=PAID, messages=[{"role": "user", "content": "hi"}]
            )
        )
    assert completion.model == PAID
    assert completion.choices[0].message.content == expected_text(Script(tokens=8))
    assert completion.usage is not None
    assert "cost" in (completion.usage.model_extra or {})


async def test_openai_responses_streaming_and_json(stack: Stack):
    with trio.fail_after(TIME_LIMIT):
        events = await in_thread(
            lambda: list(stack.openai().responses.create(model=FREE, input="hi", stream=True))
        )
        response = await in_thread(lambda: stack.openai().responses.create(model=FREE, input="hi"))
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1
    assert completed[0].response.model == FREE
    assert completed[0].response.usage is not None
    no_cost(completed[0].response.usage)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == expected_text(Script(tokens=8))
    assert response.model == FREE
    assert response.output_text == expected_text(Script(tokens=8))


async def test_anthropic_messages_streaming_and_json(stack: Stack):
    with trio.fail_after(TIME_LIMIT):

        def run_stream() -> tuple[str, Any]:
            with stack.anthropic().messages.stream(
                model=FREE, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                text = "".join(stream.text_stream)
                return text, stream.get_final_message()

        text, final = await in_thread(run_stream)
        message = await in_thread(
            lambda: stack.anthropic().messages.create(
                model=FREE, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
            )
        )
    assert text == expected_text(Script(tokens=8))
    assert final.model == FREE
    assert final.usage.output_tokens == 8
    no_cost(final.usage)
    assert message.model == FREE
    sent = stack.mock.requests[-1]
    assert sent.header("anthropic-version") is not None, "API version headers are forwarded"
    assert sent.header("x-api-key") is None or sent.header("x-api-key") == UPSTREAM_KEY


async def test_embeddings_transcriptions_and_models(stack: Stack):
    with trio.fail_after(TIME_LIMIT):
        embedding = await in_thread(
            lambda: stack.openai().embeddings.create(model=FREE, input=["a", "b"])
        )
        transcript = await in_thread(
            lambda: stack.openai().audio.transcriptions.create(
                model=PAID, file=("a.wav", io.BytesIO(b"RIFF\r\n--fake--\r\n"), "audio/wav")
            )
        )
        models = await in_thread(lambda: list(stack.openai().models.list()))
    assert embedding.model == FREE
    assert len(embedding.data) == 2
    assert transcript.text
    forms = [r for r in stack.mock.requests if r.path.endswith("/audio/transcriptions")]
    assert b'name="model"\r\n\r\nvendor/model\r\n' in forms[-1].body
    assert b"RIFF\r\n--fake--\r\n" in forms[-1].body
    assert sorted(m.id for m in models) == sorted([FREE, PAID])


async def test_sdk_sees_upstream_failure_not_a_clean_end(stack: Stack):
    stack.mock.script = Script(tokens=50, fault="reset", fault_at=900)
    with trio.fail_after(TIME_LIMIT):

        def chat() -> BaseException | None:
            try:
                list(
                    stack.openai().chat.completions.create(
                        model=FREE, stream=True, messages=[{"role": "user", "content": "hi"}]
                    )
                )
            except openai.APIError as exc:
                return exc
            return None

        def messages() -> BaseException | None:
            try:
                with stack.anthropic().messages.stream(
                    model=FREE, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
                ) as stream:
                    for _ in stream.text_stream:
                        pass
            except anthropic.APIError as exc:
                return exc
            return None

        chat_error = await in_thread(chat)
        messages_error = await in_thread(messages)
    assert chat_error is not None
    assert "upstream" in str(chat_error)
    assert messages_error is not None


async def test_unknown_model_and_bad_key_through_sdks(stack: Stack):
    with trio.fail_after(TIME_LIMIT):

        def unknown() -> Any:
            with pytest.raises(openai.NotFoundError) as info:
                stack.openai().chat.completions.create(model="nope", messages=[])
            return info.value

        def bad_key() -> Any:
            with (
                anthropic.Anthropic(
                    base_url=stack.gateway_url, api_key="wrong", max_retries=0
                ) as client,
                pytest.raises(anthropic.AuthenticationError) as info,
            ):
                client.messages.create(model=FREE, max_tokens=5, messages=[])
            return info.value

        not_found = await in_thread(unknown)
        unauthorized = await in_thread(bad_key)
    assert not_found.status_code == 404
    assert unauthorized.status_code == 401


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/messages", {"messages": [], "max_tokens": 10}),
        ("/v1/responses", {"input": "hi"}),
    ],
)
async def test_client_disconnect_closes_upstream_connection(
    stack: Stack, path: str, payload: dict[str, Any]
):
    stack.mock.script = Script(tokens=10_000, pace=0.01)
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    body = {"model": FREE, "stream": True, **payload}
    with trio.fail_after(TIME_LIMIT):
        async with httpx.AsyncClient() as client:
            async with client.stream(
                "POST", stack.gateway_url + path, json=body, headers=headers
            ) as response:
                assert response.status_code == 200
                received = 0
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    if received > 2000:
                        break
            left_at = trio.current_time()
        # The response context closed the client's connection; the gateway must
        # close its upstream connection, which is what stops the provider.
        connection = stack.mock.connections[-1]
        await connection.closed.wait()
    assert connection.closed_by_peer
    assert connection.closed_at is not None
    assert connection.closed_at - left_at < 1.0
    generated = len(stack.mock.requests)
    assert generated >= 1


async def test_shutdown_ends_open_stream_with_error_event(nursery: trio.Nursery):
    mock = MockUpstream(Script(tokens=10_000, pace=0.05), api_key=UPSTREAM_KEY)
    stop = trio.Event()
    served = trio.Event()

    async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
        config = GatewayConfig(
            upstreams={"mock": Upstream("mock", mock.base_url, UPSTREAM_KEY)},
            models={FREE: ModelRoute(FREE, "mock", "vendor/model:free", free=True)},
            keys=(KeyEntry("e2e", hash_key(CLIENT_KEY)),),
            timeouts=Timeouts(shutdown=0.5),
        )
        await serve(
            Gateway(config), "127.0.0.1:0", shutdown_trigger=stop.wait, task_status=task_status
        )
        served.set()

    with trio.fail_after(TIME_LIMIT):
        await nursery.start(mock.serve)
        urls = await nursery.start(run_server)
        body = {"model": FREE, "stream": True, "messages": []}
        headers = {"authorization": f"Bearer {CLIENT_KEY}"}
        async with (
            httpx.AsyncClient() as client,
            client.stream(
                "POST", urls[0] + "/v1/chat/completions", json=body, headers=headers
            ) as response,
        ):
            text = b""
            async for chunk in response.aiter_raw():
                text += chunk
                if not stop.is_set() and len(text) > 500:
                    stop.set()
        await served.wait()
    assert b'"type":"shutdown"' in text
    assert b"[DONE]" not in text
    assert mock.connections[-1].closed.is_set()


async def test_stalled_client_releases_upstream_through_hypercorn(nursery: trio.Nursery):
    """A client that stops reading but keeps its socket: the upstream is freed anyway.

    Hypercorn shields its socket write, so the gateway's writer stays blocked in
    ``send``; the reader gives up after ``client_stall`` and closes upstream,
    and the kernel aborts the client connection so the server can still stop.
    """
    arrived: list[MockRequest] = []
    reached = trio.Event()

    def endless(request: MockRequest) -> Script:
        arrived.append(request)
        reached.set()
        return Script(total_bytes=1 << 30)

    mock = MockUpstream(endless, api_key=UPSTREAM_KEY)
    stop = trio.Event()
    served = trio.Event()

    async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
        config = GatewayConfig(
            upstreams={"mock": Upstream("mock", mock.base_url, UPSTREAM_KEY)},
            models={FREE: ModelRoute(FREE, "mock", "vendor/model:free", free=True)},
            keys=(KeyEntry("e2e", hash_key(CLIENT_KEY)),),
            timeouts=Timeouts(client_stall=0.5, keepalive=0),
        )
        await serve(
            Gateway(config), "127.0.0.1:0", shutdown_trigger=stop.wait, task_status=task_status
        )
        served.set()

    body = b'{"model": "%s", "stream": true, "messages": []}' % FREE.encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n%s"
        % (CLIENT_KEY.encode(), len(body), body)
    )
    with trio.fail_after(TIME_LIMIT):
        await nursery.start(mock.serve)
        urls = await nursery.start(run_server)
        port = int(urls[0].rsplit(":", 1)[1])
        client = await trio.open_tcp_stream("127.0.0.1", port)
        with client.socket as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await client.send_all(request)
            sent_at = trio.current_time()
            await reached.wait()  # the mock has the forwarded request
            [forwarded] = arrived
            upstream = mock.connections[forwarded.connection]
            # The client never reads: buffers fill, then the stall timer runs.
            await upstream.closed.wait()
            assert upstream.closed_by_peer
            stalled_for = (upstream.closed_at or 0) - sent_at
            assert 0.5 <= stalled_for < 5
            # The client still holds its socket and still reads nothing, yet the
            # server can stop: the kernel aborts the stalled connection
            # (TCP_USER_TIMEOUT), which frees hypercorn's shielded write.
            stop.set()
            await served.wait()


async def test_serve_command_with_a_toml_config(tmp_path: Path, nursery: trio.Nursery):
    """`trio-gateway serve --config` as a user runs it, then SIGTERM stops it cleanly."""
    mock = MockUpstream(Script(tokens=5), api_key=UPSTREAM_KEY)
    with trio.fail_after(TIME_LIMIT):
        await nursery.start(mock.serve)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[upstreams.mock]
base_url = "{mock.base_url}"
api_key_env = "E2E_UPSTREAM_KEY"
auth = "x-api-key"

[models."{FREE}"]
upstream = "mock"
upstream_model = "vendor/model:free"
free = true

[[keys]]
name = "e2e"
sha256 = "{hash_key(CLIENT_KEY)}"
"""
    )
    with trio.fail_after(TIME_LIMIT):
        async with serve_command(config, {"E2E_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway:
            with anthropic.Anthropic(
                base_url=gateway.url, api_key=CLIENT_KEY, max_retries=0
            ) as client:
                message = await in_thread(
                    lambda: client.messages.create(
                        model=FREE, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
                    )
                )
    assert message.model == FREE
    no_cost(message.usage)
    assert mock.requests[-1].header("x-api-key") == UPSTREAM_KEY
    assert gateway.status == 0, "SIGTERM stops it cleanly"


async def test_real_refused_connection_is_a_502_in_each_kinds_shape():
    """Nothing listens on the upstream's port: the kernel refuses, the client gets 502."""
    with socket.socket() as probe:  # a loopback port that is free, then closed again
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = GatewayConfig(
        upstreams={"gone": Upstream("gone", f"http://127.0.0.1:{port}/v1", UPSTREAM_KEY)},
        models={FREE: ModelRoute(FREE, "gone", "vendor/model")},
        keys=(KeyEntry("e2e", hash_key(CLIENT_KEY)),),
    )
    gateway = Gateway(config)
    with trio.fail_after(TIME_LIMIT):
        for path in ("/v1/chat/completions", "/v1/messages"):
            call = AsgiCall.json({"model": FREE, "stream": True, "messages": []}, path=path)
            call.headers = [
                (b"content-type", b"application/json"),
                (b"authorization", f"Bearer {CLIENT_KEY}".encode()),
            ]
            await call.run(gateway)
            assert call.status == 502
            body = call.json_body()
            if path.endswith("messages"):
                assert body["error"]["type"] == "api_error"
            else:
                assert body["error"]["code"] == "upstream_unreachable"
            assert str(port) not in call.text.decode()
        await gateway.aclose()
