"""Serving the app with hypercorn's trio worker, and shutting down gracefully.

Theory of operation: :func:`serve` runs hypercorn in a nursery of its own.
When the shutdown trigger fires (SIGINT or SIGTERM by default) hypercorn
stops accepting connections and gives open ones ``timeouts.shutdown`` plus a
margin; meanwhile :meth:`Gateway.drain` lets open streams finish for
``timeouts.shutdown`` seconds and then ends the rest with their kind's error
event, so no client mistakes a shutdown for a clean end.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from trio_gateway._app import Gateway

__all__ = ["hypercorn_config", "serve"]

# Time hypercorn allows past the gateway's own shutdown grace, for the error
# events of stopped streams to reach their clients.
_SEND_MARGIN = 5.0


def hypercorn_config(gateway: Gateway, bind: str) -> HypercornConfig:
    """Hypercorn settings for ``gateway`` listening on ``bind`` (HOST:PORT)."""
    config = HypercornConfig()
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
        await _serve_until(gateway, bind, trigger, task_status)
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
