"""Serving the app with hypercorn's trio worker, and shutting down gracefully.

Theory of operation: :func:`serve` runs hypercorn in a nursery of its own.
Listening sockets carry ``TCP_USER_TIMEOUT`` = ``timeouts.client_stall``, so
the kernel aborts a connection whose client stopped reading (see
:class:`_Config`).
When the shutdown trigger fires (SIGINT or SIGTERM by default) hypercorn
stops accepting connections and gives open ones ``timeouts.shutdown`` plus a
margin; meanwhile :meth:`Gateway.drain` lets open streams finish for
``timeouts.shutdown`` seconds and then ends the rest with their kind's error
event, so no client mistakes a shutdown for a clean end.
"""

from __future__ import annotations

import math
import signal
import socket
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio import serve as hypercorn_serve

from trio_gateway._app import Gateway

__all__ = ["hypercorn_config", "serve"]

# Time hypercorn allows past the gateway's own shutdown grace, for the error
# events of stopped streams to reach their clients.
_SEND_MARGIN = 5.0


class _Config(HypercornConfig):
    """Hypercorn's settings, plus a kernel-enforced bound on stalled clients.

    Hypercorn shields its socket writes, so no cancellation can free a
    connection whose client has stopped reading. ``TCP_USER_TIMEOUT`` makes
    the kernel abort such a connection once it has made no progress for that
    long, zero-window probing included (Linux 5.11+); the blocked write then
    fails and the request's task ends. Accepted sockets inherit the option
    from the listening socket.
    """

    stall_ms: int | None = None

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        if self.stall_ms is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.stall_ms)
        return sockets


def hypercorn_config(gateway: Gateway, bind: str) -> HypercornConfig:
    """Hypercorn settings for ``gateway`` listening on ``bind`` (HOST:PORT)."""
    config = _Config()
    stall = gateway.config.timeouts.client_stall
    config.stall_ms = None if math.isinf(stall) else max(1, round(stall * 1000))
    config.bind = [bind]
    config.graceful_timeout = gateway.config.timeouts.shutdown + _SEND_MARGIN
    config.accesslog = None
    config.errorlog = "-"
    return config


async def _until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def serve(
    gateway: Gateway,
    bind: str,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``gateway`` until ``shutdown_trigger`` returns, then drain and stop.

    A checkpoint. ``task_status.started`` receives the bound URLs (useful
    with port 0). Returns once every connection has closed.
    """
    trigger = shutdown_trigger or _until_signalled
    try:
        async with trio.open_nursery() as services:
            if gateway.store is not None:
                # Started first and closed last: it outlives every request.
                await services.start(gateway.store.run)
            await _serve_until(gateway, bind, trigger, task_status)
            if gateway.store is not None:
                await gateway.store.aclose()  # drains every pending record (bounded)
    finally:
        await gateway.aclose()  # also when cancelled: pooled sockets must not leak


async def _serve_until(
    gateway: Gateway,
    bind: str,
    trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]],
) -> None:
    async with trio.open_nursery() as nursery:

        async def shutdown_then_drain() -> None:
            await trigger()
            nursery.start_soon(gateway.drain, gateway.config.timeouts.shutdown)

        await hypercorn_serve(
            gateway,  # type: ignore[arg-type]  # hypercorn's ASGI types are narrower
            hypercorn_config(gateway, bind),
            shutdown_trigger=shutdown_then_drain,
            task_status=task_status,
        )
        nursery.cancel_scope.cancel(reason="server stopped")
