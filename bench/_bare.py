"""``bare``: the least a hypercorn + httpx proxy can do, the floor under the gateway's stack.

``python -m bench._bare --upstream URL --port N`` forwards every request
to ``URL`` + its path, with the same body, and streams the raw upstream
bytes back as they come: no checks, no parsing, no rewriting, no accounting.
It keeps what any proxy of a stream must do: one pooled httpx client
configured like the gateway's, one hypercorn trio worker, and a disconnect
watcher, so a client that leaves closes the upstream connection.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

__all__ = ["main"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_FORWARDED = ("content-type", "authorization", "x-api-key", "anthropic-version")


class BareProxy:
    """The ASGI app: one pooled httpx client, one upstream exchange per request."""

    def __init__(self, upstream: str, client: httpx.AsyncClient) -> None:
        self.upstream = upstream.rstrip("/")
        self.client = client

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope. A checkpoint."""
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {
            key.decode(): value.decode()
            for key, value in scope["headers"]
            if key.decode() in _FORWARDED
        }
        request = self.client.build_request(
            scope["method"], self.upstream + scope["path"], content=bytes(body), headers=headers
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await self._exchange(request, send)
            nursery.cancel_scope.cancel()

    async def _exchange(self, request: httpx.Request, send: Send) -> None:
        """Send ``request`` upstream and stream its answer back. A checkpoint."""
        response = await self.client.send(request, stream=True)
        try:
            content_type = response.headers.get("content-type", "application/octet-stream")
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(b"content-type", content_type.encode())],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when the client leaves. A checkpoint; returns after cancelling."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _serve(upstream: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT. A checkpoint."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=None, trust_env=False) as client:
        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        await serve(BareProxy(upstream, client), config)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench._bare", description=__doc__)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    trio.run(_serve, args.upstream, args.port)


if __name__ == "__main__":
    main()
