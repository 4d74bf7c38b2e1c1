"""The integrity rules as the official SDKs see them, end to end.

A real hypercorn on 127.0.0.1:0 serves the gateway in front of the mock
provider, which each request scripts through a ``mock_script`` body field
(the gateway forwards the body's fields). The upstream ends its body
cleanly in the middle of the answer, or puts garbage in an event; the SDKs
(openai, anthropic, synchronous, in a worker thread) must raise, never
return half an answer as if it were whole. Each test has an absolute
``trio.fail_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anthropic
import openai
import pytest
import trio

from tests.helpers import ListSink, start_serving
from trio_gateway import Gateway, GatewayConfig
from trio_gateway._core.config import KeyEntry, ModelRoute, Upstream, hash_key
from trio_gateway._core.kinds import FailureType
from trio_gateway.testing.mock_upstream import MockUpstream, Script, script_from_request

CLIENT_KEY = "sdk-client-key"
UPSTREAM_KEY = "sdk-upstream-secret"
MODEL = "sdk/free-model"
UPSTREAM_MODEL = "vendor/hidden-model:free"
TIME_LIMIT = 20
T = TypeVar("T")


class Stack:
    def __init__(self, url: str, sink: ListSink) -> None:
        self.sink = sink
        self.openai = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0)
        self.anthropic = anthropic.Anthropic(base_url=url, api_key=CLIENT_KEY, max_retries=0)

    def close(self) -> None:
        self.openai.close()
        self.anthropic.close()


@pytest.fixture
async def stack(nursery: trio.Nursery) -> AsyncIterator[Stack]:
    mock = MockUpstream(script_from_request(Script(tokens=30)), api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    config = GatewayConfig(
        upstreams={"mock": Upstream("mock", mock.base_url, UPSTREAM_KEY)},
        models={MODEL: ModelRoute(MODEL, "mock", UPSTREAM_MODEL, free=True)},
        keys=(KeyEntry("sdk", hash_key(CLIENT_KEY)),),
    )
    sink = ListSink()
    url, stop = await start_serving(nursery, Gateway(config, sinks=[sink]))
    stack = Stack(url, sink)
    yield stack
    stack.close()
    stop.set()


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def cut(at: int) -> dict[str, Any]:
    """The body field that makes the mock end its body cleanly after ``at`` bytes."""
    return {"mock_script": {"fault": "eof", "fault_at": at}}


def garbage(event: int) -> dict[str, Any]:
    return {"mock_script": {"garble_event": event, "garble": "cut"}}


HI: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body", [cut(900), garbage(5)], ids=["clean-eof", "garbage"])
async def test_openai_chat_stream_cut_or_garbled_raises(stack: Stack, body: dict[str, Any]):
    def consume() -> str:
        text = ""
        stream = stack.openai.chat.completions.create(
            model=MODEL, messages=HI, stream=True, extra_body=body
        )
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
        return text

    with trio.fail_after(TIME_LIMIT):
        with pytest.raises(openai.APIError):
            await in_thread(consume)
    expected = FailureType.UPSTREAM_TRUNCATED if "fault" in body["mock_script"] else None
    assert (await stack.sink.nth(1)).error_type is (expected or FailureType.UPSTREAM_INVALID)


async def test_openai_chat_json_cut_raises(stack: Stack):
    with trio.fail_after(TIME_LIMIT):
        with pytest.raises(openai.APIStatusError) as raised:
            await in_thread(
                lambda: stack.openai.chat.completions.create(
                    model=MODEL, messages=HI, extra_body=cut(200)
                )
            )
    assert raised.value.status_code == 502
    assert (await stack.sink.nth(1)).error_type is FailureType.UPSTREAM_TRUNCATED


@pytest.mark.parametrize("body", [cut(1500), garbage(8)], ids=["clean-eof", "garbage"])
async def test_openai_responses_stream_cut_or_garbled_raises(stack: Stack, body: dict[str, Any]):
    # openai-python raises only when the error event holds a nested "error" object.
    def consume() -> list[str]:
        stream = stack.openai.responses.create(
            model=MODEL, input="hi", stream=True, extra_body=body
        )
        return [event.type for event in stream]

    with trio.fail_after(TIME_LIMIT):
        with pytest.raises(openai.APIError) as raised:
            await in_thread(consume)
    expected = "upstream_truncated" if "fault" in body["mock_script"] else "upstream_invalid"
    assert expected in str(raised.value.body) or expected in str(raised.value)


async def test_openai_responses_complete_stream_still_works(stack: Stack):
    with trio.fail_after(TIME_LIMIT):
        events = await in_thread(
            lambda: [
                e.type for e in stack.openai.responses.create(model=MODEL, input="hi", stream=True)
            ]
        )
    assert events[-1] == "response.completed"
    assert (await stack.sink.nth(1)).error_type is None


@pytest.mark.parametrize("body", [cut(700), garbage(4)], ids=["clean-eof", "garbage"])
async def test_anthropic_messages_stream_cut_or_garbled_raises(stack: Stack, body: dict[str, Any]):
    def consume() -> str:
        with stack.anthropic.messages.stream(
            model=MODEL,
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
            extra_body=body,
        ) as stream:
            return "".join(stream.text_stream)

    with trio.fail_after(TIME_LIMIT):
        with pytest.raises(anthropic.APIError):
            await in_thread(consume)
    assert (await stack.sink.nth(1)).error_type in (
        FailureType.UPSTREAM_TRUNCATED,
        FailureType.UPSTREAM_INVALID,
    )
