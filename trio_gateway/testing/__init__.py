"""Test doubles that ship with trio-gateway, public like :mod:`trio.testing`.

:class:`MockUpstream` is a fake LLM provider on a real socket (the demo and
the benchmarks use it too); the ``render_*`` functions give its bytes
without any I/O. ``python -m trio_gateway.testing.mock_upstream`` runs it.
"""

from trio_gateway.testing.mock_upstream import (
    MockConnection,
    MockRequest,
    MockUpstream,
    Script,
    StreamKind,
    expected_text,
    iter_stream,
    render_json,
    render_stream,
)

__all__ = [
    "MockConnection",
    "MockRequest",
    "MockUpstream",
    "Script",
    "StreamKind",
    "expected_text",
    "iter_stream",
    "render_json",
    "render_stream",
]
