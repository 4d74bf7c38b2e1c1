"""Routing's trio side: the gateway-wide state, the first chunk, and the waits between attempts.

Theory of operation
===================

The rules (which deployment next, cooldowns, what is retried) are pure code
in :mod:`trio_gateway._core.routing`. The attempt loop that applies them is
:meth:`trio_gateway._proxy.exchange.Exchanger.run`. This module holds what
they share and the two waits the loop needs:

1. :class:`Router` is one per gateway: each public model's chain and number
   of attempts (worked out once, from the configuration), the
   :class:`~trio_gateway._core.routing.Cooldowns` every request shares, the
   seeded random source of the weighted choice, and each deployment's
   ``x-gateway-served-by`` value, encoded once.
2. :func:`first_chunk` waits for an event stream's first body bytes before
   anything goes to the client, so that a stream which answered 200 and
   then sent nothing can still be retried. It reads from the response's own
   byte stream and puts what it read back in front of the rest
   (:class:`_Replayed`), so :func:`~trio_gateway._proxy.pipeline.stream_events`
   reads the response exactly as it would have, from the first byte. Only a
   request that may still retry waits for it: a model with one deployment
   and no retries skips this, and its stream goes out as before.
3. :func:`wait_until` is the wait a Retry-After asks for. Like every wait on
   upstream, it is registered with the exchange's
   :class:`~trio_gateway._proxy.upstream.ExchangeControl`, so a shutdown
   stops it; a client that leaves cancels it with the request.

Every wait here is bounded by the request's one deadline, ``first_byte``
seconds after it was routed, across all its attempts.
"""

from __future__ import annotations

import random
import urllib.parse
from collections.abc import AsyncIterator

import httpx
import trio

from trio_gateway._core.config import GatewayConfig, ModelRoute
from trio_gateway._core.kinds import Failure, FailureType
from trio_gateway._core.routing import (
    Choice,
    Cooldowns,
    Plan,
    chain_of,
    default_retries,
    distinct_deployments,
)
from trio_gateway._proxy.upstream import ExchangeControl, UpstreamError, upstream_errors

__all__ = ["SERVED_BY", "Router", "first_chunk", "wait_until"]

#: The response header that names who answered: ``PUBLIC-MODEL; upstream=NAME``.
SERVED_BY = b"x-gateway-served-by"
# Characters of a configured name sent as they are in the header; others are %-escaped.
_HEADER_SAFE = "/:._-@+~!$&'()*,=[]"


class Router:
    """The routing state of one gateway: chains, attempts, cooldowns, the random source."""

    def __init__(self, config: GatewayConfig, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random()
        routing = config.routing
        self.cooldowns = Cooldowns(
            routing.cooldown_failures, routing.cooldown_window, routing.cooldown_seconds
        )
        # Per public model: (chain, attempts in all, whether cooldowns apply).
        self._plans: dict[str, tuple[tuple[ModelRoute, ...], int, bool]] = {}
        self._served_by: dict[tuple[str, str], bytes] = {}
        for name, route in config.models.items():
            chain = chain_of(config.models, name)
            retries = route.retries if route.retries is not None else default_retries(chain)
            self._plans[name] = (chain, 1 + retries, distinct_deployments(chain) > 1)
            for deployment in route.deployments:
                value = f"{name}; upstream={deployment.upstream}"
                encoded = urllib.parse.quote(value, safe=_HEADER_SAFE + " ;")
                self._served_by[name, deployment.upstream] = encoded.encode("ascii")

    def plan(self, route: ModelRoute) -> Plan:
        """A new request's attempts at ``route``. Not a checkpoint."""
        chain, attempts, use_cooldowns = self._plans[route.public_name]
        return Plan(chain, attempts, self.cooldowns, self.rng, use_cooldowns=use_cooldowns)

    def chain(self, route: ModelRoute) -> tuple[ModelRoute, ...]:
        """``route`` and its fallbacks, in the order they are tried."""
        return self._plans[route.public_name][0]

    def served_by(self, choice: Choice) -> tuple[bytes, bytes]:
        """The ``x-gateway-served-by`` header of an answer from ``choice``."""
        return (SERVED_BY, self._served_by[choice.route.public_name, choice.deployment.upstream])

    def unavailable(self, route: ModelRoute, now: float) -> tuple[Failure | None, float]:
        """Why no deployment of ``route``'s chain can be tried now: the last failure, and
        the seconds until the first of them comes back."""
        last: Failure | None = None
        back = now
        for model in self.chain(route):
            for deployment in model.deployments:
                failure = self.cooldowns.last_failure(deployment.key)
                last = failure or last
                until = self.cooldowns.back_at(deployment.key)
                if until is not None and until > now and (back == now or until < back):
                    back = until
        return last, back - now


class _Replayed(httpx.AsyncByteStream):
    """A response body whose first bytes were read already: those first, then the rest.

    Closing it closes the half-read iterator and the response's own stream.
    """

    def __init__(self, rest: AsyncIterator[bytes], inner: httpx.AsyncByteStream) -> None:
        self.first = b""
        self._rest = rest
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.first:
            first, self.first = self.first, b""
            yield first
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._rest, "aclose", None)
        if aclose is not None:
            await aclose()
        await self._inner.aclose()


async def first_chunk(
    response: httpx.Response, deadline: float, control: ExchangeControl, first_byte: float
) -> None:
    """Wait for an event stream's first body bytes, and keep them for whoever reads it.

    A checkpoint. Returns once bytes have arrived; the response then reads
    from its first byte as before (the bytes read are replayed). Raises
    :class:`UpstreamError` when the body breaks (``upstream_reset``) or ends
    (``upstream_truncated``) before any byte, when nothing arrived by
    ``deadline`` (``upstream_timeout``), or when ``control`` is stopped. The
    caller still owns ``response`` and closes it on every way out, which
    also closes what was half read.
    """
    stream = response.stream
    if not isinstance(stream, httpx.AsyncByteStream):  # pragma: no cover - httpx's own
        raise TypeError("expected an async response stream")
    chunks = aiter(stream)
    replayed = response.stream = _Replayed(chunks, stream)
    with trio.move_on_at(deadline) as waited, control.guarded(waited):
        try:
            with upstream_errors("stream"):
                while not replayed.first:
                    replayed.first = await anext(chunks)
        except StopAsyncIteration:
            message = "upstream ended its event stream before its first byte"
            raise UpstreamError(Failure(FailureType.UPSTREAM_TRUNCATED, message)) from None
        return
    control.check()
    message = f"upstream sent no event within {first_byte:g} s"
    raise UpstreamError(Failure(FailureType.UPSTREAM_TIMEOUT, message))


async def wait_until(when: float, control: ExchangeControl) -> None:
    """Sleep until ``when`` (a Retry-After's end). A checkpoint.

    Raises :class:`UpstreamError` if ``control`` is stopped first (shutdown).
    Cancellation (the client left) ends it at once.
    """
    with trio.CancelScope(deadline=when) as scope, control.guarded(scope):
        await trio.sleep_forever()
    control.check()
