"""``trio-gateway demo``: the gateway in front of the built-in mock upstream.

Theory of operation: one nursery holds the mock upstream, the gateway's
server, and the demo itself. The demo streams one chat answer through the
gateway, printing tokens as they arrive, then prints snippets to paste. With
``once`` it then cancels the nursery; otherwise it serves until Ctrl-C or
SIGTERM stops the gateway's server, which then cancels the nursery, and with
it the mock upstream.
"""

from __future__ import annotations

import sys
from typing import TextIO

import httpx
import orjson
import trio

from trio_gateway._core.config import GatewayConfig, KeyEntry, ModelRoute, Upstream, hash_key
from trio_gateway._proxy.app import Gateway
from trio_gateway._server.serve import serve
from trio_gateway.sse import SSEDecoder
from trio_gateway.testing.mock_upstream import MockUpstream, Script

__all__ = ["DEMO_KEY", "demo_config", "run_demo"]

DEMO_KEY = "demo-key"
DEMO_MODEL = "demo/free-model"
_MOCK_UPSTREAM_KEY = "mock-upstream-key"  # known only to the gateway and the mock


def demo_config(mock_base_url: str, bind: str) -> GatewayConfig:
    """The demo's config: one free and one paid model on the mock upstream."""
    return GatewayConfig(
        upstreams={"mock": Upstream("mock", mock_base_url, _MOCK_UPSTREAM_KEY)},
        models={
            DEMO_MODEL: ModelRoute(DEMO_MODEL, "mock", "mock-vendor/model:free", free=True),
            "demo/model": ModelRoute("demo/model", "mock", "mock-vendor/model"),
        },
        keys=(KeyEntry("demo", hash_key(DEMO_KEY)),),
        bind=bind,
    )


def _snippets(url: str) -> str:
    body = orjson.dumps(
        {"model": DEMO_MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).decode()
    return f"""
Try it yourself (the gateway keeps serving until Ctrl-C):

  curl -N {url}/v1/chat/completions \\
    -H 'Authorization: Bearer {DEMO_KEY}' -H 'Content-Type: application/json' \\
    -d '{body}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="{DEMO_KEY}")
  for chunk in client.chat.completions.create(
      model="{DEMO_MODEL}", stream=True, messages=[{{"role": "user", "content": "hi"}}]):
      print(chunk.choices[0].delta.content or "" if chunk.choices else "", end="", flush=True)

  from anthropic import Anthropic
  client = Anthropic(base_url="{url}", api_key="{DEMO_KEY}")
  with client.messages.stream(model="{DEMO_MODEL}", max_tokens=100,
                              messages=[{{"role": "user", "content": "hi"}}]) as stream:
      for text in stream.text_stream:
          print(text, end="", flush=True)
"""


async def _show_one_stream(url: str, out: TextIO) -> None:
    """Stream one chat answer through the gateway, printing it as it arrives."""
    payload = {"model": DEMO_MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {DEMO_KEY}"}
    decoder = SSEDecoder()
    usage = None
    model = None
    print(f"POST {url}/v1/chat/completions  (model {DEMO_MODEL}, streamed)\n", file=out)
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=payload, headers=headers) as resp,
    ):
        async for chunk in resp.aiter_raw():
            for event in decoder.feed(chunk):
                if not event.data or event.data == "[DONE]":
                    continue
                data = orjson.loads(event.data)
                model = data.get("model", model)
                usage = data.get("usage") or usage
                for choice in data.get("choices") or []:
                    print(
                        (choice.get("delta") or {}).get("content") or "",
                        end="",
                        flush=True,
                        file=out,
                    )
    print(f"\n\nmodel as the client saw it: {model}", file=out)
    print(f"usage (cost fields stripped, free model): {orjson.dumps(usage).decode()}", file=out)


async def run_demo(bind: str, once: bool, out: TextIO | None = None) -> None:
    """Run the demo; returns after the sample stream when ``once``. A checkpoint."""
    out = out or sys.stdout
    mock = MockUpstream(Script(tokens=24, pace=0.04), api_key=_MOCK_UPSTREAM_KEY)
    async with trio.open_nursery() as nursery:
        await nursery.start(mock.serve)
        gateway = Gateway(demo_config(mock.base_url, bind))

        async def serve_until_signalled(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(gateway, bind, task_status=task_status)
            # Ctrl-C or SIGTERM stopped the gateway: stop the mock upstream too.
            nursery.cancel_scope.cancel(reason="gateway stopped")

        urls: list[str] = await nursery.start(serve_until_signalled)
        url = urls[0]
        print(f"trio-gateway demo: gateway on {url}, mock upstream on {mock.base_url}", file=out)
        print(f"client key: {DEMO_KEY}\n", file=out)
        await _show_one_stream(url, out)
        if once:
            nursery.cancel_scope.cancel(reason="demo finished")
            return
        print(_snippets(url), file=out, flush=True)
