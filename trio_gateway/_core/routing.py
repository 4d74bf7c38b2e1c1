"""Routing with no I/O: the order of a request's attempts, weighted choice, cooldowns.

Theory of operation
===================

Everything here is plain data and arithmetic on times the caller passes in
(the Trio clock in the gateway, any numbers in a test), so the rules can be
checked without a clock, a network or trio. The trio side, which waits and
talks to upstreams, is :mod:`trio_gateway._proxy.router` and the attempt
loop in :mod:`trio_gateway._proxy.exchange`. docs/routing.md gives the rules
with the test of each.

1. **The chain.** A request for a public model may be served by the
   model's deployments, then by each fallback model's, in the order the
   fallbacks are listed, depth first, each model once (:func:`chain_of`).
   The configuration refuses cycles, so the chain is finite.
2. **One attempt, one choice** (:meth:`Plan.next`). The next attempt goes to
   the first model of the chain that still has a deployment this request
   has not tried: a weighted random choice among its deployments that are
   neither cooling down nor held back by a Retry-After. A model whose every
   deployment is cooling down lets one request through as a *probe*
   (:class:`Cooldowns` keeps one probe per model at a time); other requests
   go on down the chain. When no deployment is ready now, the one a
   Retry-After frees first is taken, if that is before the deadline. When
   every deployment of the chain has been tried and attempts remain, a new
   round begins, in the same order.
3. **Cooldowns** (:class:`Cooldowns`): a deployment (an upstream and its
   model name, shared by every public model that lists it) that fails
   ``failures`` times within ``window`` seconds is left out for ``seconds``
   seconds, and comes back on its own. A probe that succeeds ends the
   cooldown at once; one that fails starts it again. A chain with a single
   deployment ignores cooldowns: there is nothing to turn to, and refusing
   would only turn a possible answer into a certain error.
4. **What is retried** (:func:`is_retryable`): connect errors, resets and
   timeouts before the answer's first byte, an event stream that ends or
   stays silent before its first byte, and the statuses in
   :data:`RETRYABLE_STATUSES`. Nothing else: a 400, 401, 403, 404, 413 or
   422 is the client's answer and is passed on.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from trio_gateway._core.config import MAX_RETRIES, Deployment, ModelRoute
from trio_gateway._core.kinds import Failure, FailureType

__all__ = [
    "RETRYABLE_STATUSES",
    "Choice",
    "Cooldowns",
    "DeploymentKey",
    "Plan",
    "chain_of",
    "default_retries",
    "is_retryable",
    "retry_after_seconds",
    "weighted_pick",
]

#: What the cooldowns know a deployment by: (upstream name, upstream model).
DeploymentKey = tuple[str, str]

#: Upstream statuses that send a request to its next attempt (529: Anthropic's "overloaded").
RETRYABLE_STATUSES: Final = frozenset({429, 500, 502, 503, 504, 529})

# Failures before the first byte that a retry is for (UPSTREAM_STATUS: see RETRYABLE_STATUSES).
_RETRYABLE_FAILURES: Final = frozenset(
    {
        FailureType.UPSTREAM_UNREACHABLE,  # connect error, or closed before the headers
        FailureType.UPSTREAM_TIMEOUT,  # no headers, or no first byte, in time
        FailureType.UPSTREAM_RESET,  # an event stream cut before its first byte
        FailureType.UPSTREAM_TRUNCATED,  # an event stream that ended before its first byte
        FailureType.UPSTREAM_STATUS,
    }
)


def is_retryable(failure: Failure) -> bool:
    """Whether ``failure``, met before the answer's first byte, is worth another attempt."""
    return failure.type in _RETRYABLE_FAILURES


def chain_of(models: Mapping[str, ModelRoute], name: str) -> tuple[ModelRoute, ...]:
    """``name``'s route, then its fallbacks', depth first, each model once."""
    chain: list[ModelRoute] = []
    seen: set[str] = set()

    def visit(model: str) -> None:
        if model in seen:
            return
        seen.add(model)
        route = models[model]
        chain.append(route)
        for fallback in route.fallbacks:
            visit(fallback)

    visit(name)
    return tuple(chain)


def distinct_deployments(chain: Sequence[ModelRoute]) -> int:
    """How many different deployments (by upstream and model) ``chain`` holds."""
    return len({d.key for route in chain for d in route.deployments})


def default_retries(chain: Sequence[ModelRoute]) -> int:
    """The retries of a model that sets none: one attempt at each deployment of its chain."""
    return min(MAX_RETRIES, distinct_deployments(chain) - 1)


def weighted_pick(candidates: Sequence[Deployment], rng: random.Random) -> Deployment:
    """One of ``candidates``, each with a chance proportional to its weight.

    A single candidate is returned without drawing, so a model with one
    deployment never touches ``rng``. Otherwise exactly one ``rng.random()``.
    """
    if len(candidates) == 1:
        return candidates[0]
    point = rng.random() * math.fsum(d.weight for d in candidates)
    for deployment in candidates:
        point -= deployment.weight
        if point < 0:
            return deployment
    return candidates[-1]  # rounding left a sliver at the top


def retry_after_seconds(value: str | None, now_wall: float) -> float | None:
    """Seconds a ``Retry-After`` value asks to wait; None when absent or not understood.

    Takes delta-seconds (a non-negative number) or an HTTP date, measured from
    ``now_wall`` (Unix time). A date in the past is 0.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - now_wall)
    return seconds if 0 <= seconds < math.inf else None


class Cooldowns:
    """Failures and cooldowns of every deployment, and the probes in flight. Times passed in.

    Shared by every request of a gateway (one process). Memory is bounded by
    the configuration: one entry per deployment, at most ``failures`` times
    each, and one probe flag per public model.
    """

    __slots__ = ("_last", "_probing", "_recent", "_until", "failures", "seconds", "window")

    def __init__(self, failures: int, window: float, seconds: float) -> None:
        self.failures = failures  # 0: cooldowns are off
        self.window = window
        self.seconds = seconds
        self._recent: dict[DeploymentKey, deque[float]] = {}
        self._until: dict[DeploymentKey, float] = {}
        self._last: dict[DeploymentKey, Failure] = {}
        self._probing: set[str] = set()

    def cooling(self, key: DeploymentKey, now: float) -> bool:
        """Whether the deployment is cooling down at ``now``."""
        until = self._until.get(key)
        return until is not None and now < until

    def back_at(self, key: DeploymentKey) -> float | None:
        """When the deployment's last cooldown ends (or ended); None if it never cooled down."""
        return self._until.get(key)

    def last_failure(self, key: DeploymentKey) -> Failure | None:
        """The deployment's last failure, if it ever failed."""
        return self._last.get(key)

    def failed(self, key: DeploymentKey, failure: Failure, now: float, *, probe: bool) -> bool:
        """Count a failure at ``now``; True if it started a cooldown.

        A failure W seconds old or older no longer counts. A failed probe
        starts a fresh cooldown; a failure met while cooling down (a request
        that began before) does not lengthen it.
        """
        self._last[key] = failure
        if not self.failures:
            return False
        if probe:
            self._until[key] = now + self.seconds
            self._recent.pop(key, None)
            return True
        if self.cooling(key, now):
            return False
        recent = self._recent.setdefault(key, deque())
        recent.append(now)
        while recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) < self.failures:
            return False
        self._until[key] = now + self.seconds
        del self._recent[key]
        return True

    def succeeded(self, key: DeploymentKey, *, probe: bool) -> None:
        """An attempt got an answer; a probe's success ends the deployment's cooldown."""
        if probe:
            self._until.pop(key, None)

    def probe_free(self, model: str) -> bool:
        """Whether no probe of ``model`` is in flight."""
        return model not in self._probing

    def take_probe(self, model: str) -> None:
        self._probing.add(model)

    def release_probe(self, model: str) -> None:
        self._probing.discard(model)


@dataclass(frozen=True, slots=True)
class Choice:
    """The next attempt: which public model's deployment, and from when."""

    route: ModelRoute  # the public model whose deployment this is (a fallback's, maybe)
    deployment: Deployment
    start_at: float  # on the caller's clock: now, or when a Retry-After lets it go
    probe: bool = False  # the one attempt let through while the model cools down


class Plan:
    """One request's attempts: which deployment next, and what failed. No I/O.

    ``attempts`` is how many attempts the request may make in all (1 +
    retries). The caller asks :meth:`next` for each attempt and reports how
    it went with exactly one of :meth:`succeeded`, :meth:`failed` or
    :meth:`abandon` (which also frees a probe).
    """

    __slots__ = (
        "_chain",
        "_cooldowns",
        "_left",
        "_not_before",
        "_probed",
        "_rng",
        "_round",
        "_tried",
        "_use_cooldowns",
        "attempts",
        "failures",
    )

    def __init__(
        self,
        chain: Sequence[ModelRoute],
        attempts: int,
        cooldowns: Cooldowns,
        rng: random.Random,
        *,
        use_cooldowns: bool,
    ) -> None:
        self._chain = chain
        self._left = attempts
        self._cooldowns = cooldowns
        self._rng = rng
        self._use_cooldowns = use_cooldowns
        self._tried: set[DeploymentKey] = set()  # in this round
        self._round = 0  # attempts made in this round
        self._not_before: dict[DeploymentKey, float] = {}  # from Retry-After
        self._probed: set[str] = set()
        self.attempts = 0  # made so far
        self.failures: list[str] = []  # "upstream:type" or "upstream:upstream_status:503"

    @property
    def may_retry(self) -> bool:
        """Whether another attempt may follow the current one (attempts are left)."""
        return self._left > 0

    def attempt_deadline(self, now: float, deadline: float) -> float:
        """When the current attempt must have its answer: its share of the time left.

        The time left is shared evenly among the attempts left, this one
        included, so a silent deployment cannot use up the time of those
        after it, and the last attempt ends at ``deadline`` itself.
        """
        return now + max(0.0, deadline - now) / (self._left + 1)

    def failed_text(self) -> str | None:
        """The failed attempts as the record stores them, ``;``-separated; None if none."""
        return ";".join(self.failures) or None

    def next(self, now: float, deadline: float) -> Choice | None:
        """The next attempt, or None when there is none (no attempts left, nothing to try)."""
        if self._left <= 0:
            return None
        choice = self._scan(now, deadline)
        if choice is None and self._round:  # every deployment tried: a new round
            self._tried.clear()
            self._round = 0
            choice = self._scan(now, deadline)
        if choice is not None:
            self._left -= 1
            self._round += 1
            self.attempts += 1
            self._tried.add(choice.deployment.key)
            if choice.probe:
                self._cooldowns.take_probe(choice.route.public_name)
                self._probed.add(choice.route.public_name)
        return choice

    def _scan(self, now: float, deadline: float) -> Choice | None:
        cooldowns = self._cooldowns
        held: Choice | None = None  # the earliest a Retry-After lets go, before the deadline
        for route in self._chain:
            untried = [d for d in route.deployments if d.key not in self._tried]
            if not untried:
                continue
            if self._use_cooldowns:
                ready = [d for d in untried if not cooldowns.cooling(d.key, now)]
            else:
                ready = untried
            free = [d for d in ready if self._not_before.get(d.key, now) <= now]
            if free:
                return Choice(route, weighted_pick(free, self._rng), now)
            for d in ready:
                at = self._not_before[d.key]
                if at < deadline and (held is None or at < held.start_at):
                    held = Choice(route, d, at)
            if (
                self._use_cooldowns
                and not ready
                and route.public_name not in self._probed
                and cooldowns.probe_free(route.public_name)
                and all(cooldowns.cooling(d.key, now) for d in route.deployments)
            ):
                return Choice(route, weighted_pick(untried, self._rng), now, probe=True)
        return held

    def succeeded(self, choice: Choice) -> None:
        """The attempt got an answer that goes to the client (whatever its status)."""
        self._release(choice)
        self._cooldowns.succeeded(choice.deployment.key, probe=choice.probe)

    def failed(
        self,
        choice: Choice,
        failure: Failure,
        now: float,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> bool:
        """The attempt failed in a way a retry is for; True if that started a cooldown.

        ``retry_after`` (seconds) holds the deployment back for this request.
        """
        self._release(choice)
        deployment = choice.deployment
        detail = failure.type.value if status is None else f"{failure.type.value}:{status}"
        self.failures.append(f"{deployment.upstream}:{detail}")
        if retry_after is not None:
            self._not_before[deployment.key] = now + retry_after
        return self._cooldowns.failed(deployment.key, failure, now, probe=choice.probe)

    def abandon(self, choice: Choice) -> None:
        """The attempt ended with no verdict on the deployment (cancelled, or stopped)."""
        self._release(choice)

    def _release(self, choice: Choice) -> None:
        if choice.probe:
            self._cooldowns.release_probe(choice.route.public_name)
