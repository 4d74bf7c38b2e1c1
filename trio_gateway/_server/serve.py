"""Serving the app with hypercorn's trio worker, and shutting down gracefully.

Theory of operation
===================

:func:`serve` runs hypercorn in a nursery of its own, beside the usage
store, which it starts first and closes (drained, bounded) last. It uses only
hypercorn's public API (``hypercorn.config.Config`` and
``hypercorn.trio.serve``); what the gateway needs from hypercorn's internals
lives in :mod:`~trio_gateway._server.hypercorn_private`:

* listening sockets carry ``TCP_USER_TIMEOUT`` = ``timeouts.client_stall``,
  so the kernel aborts a connection whose client stopped reading;
* HTTP/1.1 connections run the gateway's protocol, which refuses ambiguous
  framing (request smuggling) before the app sees it, keeps hypercorn's
  reading task from writing over, or closing under, an answer the app is
  sending, and closes a connection as soon as its client has closed it.

Hypercorn's keep-alive timer, ``timeouts.client_headers``, bounds the wait for
a whole request head, however slowly it trickles; the app bounds the body
(``timeouts.request_body``).

Shutdown takes up to three steps, each started by a signal (SIGINT or
SIGTERM) or, in tests, by a trigger:

1. The first stops hypercorn accepting and starts :meth:`Gateway.drain`:
   open requests get ``timeouts.shutdown`` seconds to finish, then the rest
   are stopped, each still answered with its kind's error event (or a 503)
   and recorded, so no client mistakes a shutdown for a clean end. Hypercorn
   gives open connections that grace plus a margin.
2. A second ends the grace now (:meth:`Gateway.end_grace`): every open
   request is stopped at once, in the same way. The process then ends as
   after the grace: when every connection has closed and the usage store has
   written what it holds.
3. A third ends the process at once, as the signal's default action does,
   with no cleanup: records not yet written are lost, as with ``kill -9``.

The signal receiver is installed for the whole of :func:`serve`, so a signal
during the drain is never the default action before the third. (Signals
that arrive together, before the gateway has seen the first, count once.)

A worker process (:mod:`~trio_gateway._server.workers`) runs this same
:func:`serve` on the listening socket its parent made, with one more way
into the first step: ``drain_trigger``, which returns when the parent has
gone.
"""

from __future__ import annotations

import math
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from trio_gateway._core.config import GatewayConfig
from trio_gateway._proxy.app import Gateway
from trio_gateway._server.hypercorn_private import Config, install_protocol

__all__ = ["hypercorn_config", "hypercorn_settings", "serve"]

# Time hypercorn allows past the gateway's own shutdown grace, for the error
# events of stopped streams to reach their clients.
_SEND_MARGIN = 5.0

_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Trigger = Callable[[], Awaitable[None]]


def hypercorn_config(gateway: Gateway, bind: str) -> HypercornConfig:
    """Hypercorn settings for ``gateway`` listening on ``bind`` (HOST:PORT).

    Also installs the gateway's HTTP/1.1 protocol, which connections with
    these settings run (see :func:`~trio_gateway._server.hypercorn_private.install_protocol`).
    """
    return hypercorn_settings(gateway.config, bind)


def hypercorn_settings(gateway_config: GatewayConfig, bind: str) -> HypercornConfig:
    """Hypercorn settings for a gateway configured by ``gateway_config``, listening on ``bind``.

    ``bind`` is HOST:PORT, or ``fd://N`` for a listening socket already open
    as file descriptor N. Installs the gateway's HTTP/1.1 protocol, as
    :func:`hypercorn_config` does; its ``create_sockets`` gives the
    listening sockets their ``TCP_USER_TIMEOUT``.
    """
    install_protocol()
    config = Config()
    timeouts = gateway_config.timeouts
    stall = timeouts.client_stall
    config.stall_ms = None if math.isinf(stall) else max(1, round(stall * 1000))
    # Started when a connection opens or a response ends, stopped only when a
    # whole request head has arrived: a trickled head does not restart it.
    config.keep_alive_timeout = timeouts.client_headers
    config.bind = [bind]
    config.graceful_timeout = timeouts.shutdown + _SEND_MARGIN
    config.accesslog = None
    config.errorlog = "-"
    return config


def _end_process(signum: int) -> None:
    """End the process as ``signum``'s default action does: at once, no cleanup."""
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


class _ShutdownSignals:
    """Counts the shutdown signals received; the third one ends the process.

    :meth:`receive` runs for the whole of :func:`serve`. The first and second
    signals are awaited through :meth:`wait_for`.
    """

    def __init__(self, end_process: Callable[[int], object] = _end_process) -> None:
        self.received = 0
        self._end_process = end_process
        self._changed = trio.Event()

    async def receive(self, signals: AsyncIterator[int]) -> None:
        """Count each signal from ``signals``; on the third, end the process. A checkpoint."""
        async for signum in signals:
            self.received += 1
            self._changed.set()
            self._changed = trio.Event()
            if self.received >= 3:
                self._end_process(signum)

    async def wait_for(self, count: int) -> None:
        """Return once ``count`` signals have been received. A checkpoint."""
        while self.received < count:
            await self._changed.wait()
        await trio.lowlevel.checkpoint()

    async def first_step_after(self, trigger: Trigger) -> None:
        """Once ``trigger`` returns, take the first step if no signal has. A checkpoint.

        It never takes a later step: a drain already under way goes on as it was.
        """
        await trigger()
        if self.received == 0:
            self.received = 1
            self._changed.set()
            self._changed = trio.Event()


async def serve(
    gateway: Gateway,
    bind: str,
    *,
    shutdown_trigger: Trigger | None = None,
    end_grace_trigger: Trigger | None = None,
    drain_trigger: Trigger | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``gateway`` until ``shutdown_trigger`` returns, then drain and stop.

    A checkpoint. ``task_status.started`` receives the bound URLs (useful
    with port 0). Returns once every connection has closed and the usage
    store has written what it holds.

    ``end_grace_trigger``, awaited once ``shutdown_trigger`` has returned,
    cuts the drain's grace short when it returns. With no
    ``shutdown_trigger``, SIGINT and SIGTERM drive both steps, and a third
    signal ends the process at once (see the module docstring); with one,
    signals are left alone.

    ``drain_trigger`` (signals only) is one more way into the first step:
    when it returns, the drain starts as on a first signal, unless a signal
    came first; the later steps still take signals. A worker process passes
    one that returns when its parent has gone.

    Must run in the main thread when it receives signals (trio's rule).
    """
    if shutdown_trigger is not None:
        await _serve(gateway, bind, shutdown_trigger, end_grace_trigger, task_status)
        return
    signals = _ShutdownSignals()
    with trio.open_signal_receiver(*_SHUTDOWN_SIGNALS) as receiver:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(signals.receive, receiver)
            if drain_trigger is not None:
                nursery.start_soon(signals.first_step_after, drain_trigger)
            await _serve(
                gateway,
                bind,
                partial(signals.wait_for, 1),
                partial(signals.wait_for, 2),
                task_status,
                signalled=True,
            )
            nursery.cancel_scope.cancel(reason="server stopped")


async def _serve(
    gateway: Gateway,
    bind: str,
    shutdown_trigger: Trigger,
    end_grace_trigger: Trigger | None,
    task_status: trio.TaskStatus[list[str]],
    *,
    signalled: bool = False,
) -> None:
    try:
        async with trio.open_nursery() as services:
            if gateway.store is not None:
                # Started first and closed last: it outlives every request.
                await services.start(gateway.store.run)
            await _serve_until(
                gateway, bind, shutdown_trigger, end_grace_trigger, task_status, signalled
            )
            if gateway.store is not None:
                await gateway.store.aclose()  # drains every pending record (bounded)
    finally:
        await gateway.aclose()  # also when cancelled: pooled sockets must not leak


async def _serve_until(
    gateway: Gateway,
    bind: str,
    shutdown_trigger: Trigger,
    end_grace_trigger: Trigger | None,
    task_status: trio.TaskStatus[list[str]],
    signalled: bool,
) -> None:
    config = hypercorn_config(gateway, bind)
    grace = gateway.config.timeouts.shutdown
    then = " (signal again to stop them now)" if signalled else ""
    finally_ = " (signal again to exit at once)" if signalled else ""

    async with trio.open_nursery() as nursery:

        async def end_grace_when(trigger: Trigger) -> None:
            await trigger()
            gateway.end_grace()
            await config.log.info(f"Grace cut short: every open request is stopped{finally_}")

        async def shutdown_then_drain() -> None:
            await shutdown_trigger()
            nursery.start_soon(gateway.drain, grace)
            if end_grace_trigger is not None:
                nursery.start_soon(end_grace_when, end_grace_trigger)
            await config.log.info(f"Shutting down: open requests have {grace:g} s to finish{then}")

        await hypercorn_serve(
            gateway,  # type: ignore[arg-type]  # hypercorn's ASGI types are narrower
            config,
            shutdown_trigger=shutdown_then_drain,
            task_status=task_status,
        )
        nursery.cancel_scope.cancel(reason="server stopped")
