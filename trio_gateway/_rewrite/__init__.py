"""Rewriting answers on their way to the client: one module per API kind, no I/O.

:func:`policy_for` picks the kind's rules; :mod:`.base` holds what every kind
shares (the :class:`~.base.StreamRewriter`, the :class:`~.base.Policy` base,
and the whole-body rewrite).
"""

from __future__ import annotations

from trio_gateway._core.kinds import Kind
from trio_gateway._rewrite.base import PassThroughPolicy, Policy
from trio_gateway._rewrite.chat import ChatPolicy
from trio_gateway._rewrite.messages import MessagesPolicy
from trio_gateway._rewrite.responses import ResponsesPolicy

__all__ = ["policy_for"]

_POLICIES: dict[Kind, type[Policy]] = {
    Kind.CHAT: ChatPolicy,
    Kind.MESSAGES: MessagesPolicy,
    Kind.RESPONSES: ResponsesPolicy,
}


def policy_for(kind: Kind, public_model: str, *, free: bool, upstream_model: str = "") -> Policy:
    """A fresh policy with ``kind``'s rules (pass-through for kinds with none of their own).

    ``upstream_model`` is the name the policy hides in the upstream's error messages.
    """
    return _POLICIES.get(kind, PassThroughPolicy)(
        public_model, free=free, upstream_model=upstream_model
    )
