"""trio-gateway: a stream-safe AI gateway (LLM API proxy) built on Trio.

The public face, h11 style: every public name is re-exported here from the
private module that defines it, so users and tests write
``trio_gateway.Gateway``, never ``trio_gateway._proxy.app.Gateway``.

The codec (:mod:`trio_gateway.sse`) and the rewriters do no I/O; Trio lives
only in the proxy and server layers. The names that need trio, httpx or
hypercorn are loaded on first use, so ``import trio_gateway.sse`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trio_gateway._core.config import ConfigError, GatewayConfig, Timeouts, load_config
from trio_gateway._version import __version__
from trio_gateway.sse import SSEDecoder, SSEError, SSEEvent, SSEEventTooLarge, encode_event

if TYPE_CHECKING:
    from trio_gateway._proxy.app import Gateway
    from trio_gateway._server.serve import serve

__all__ = [
    "ConfigError",
    "Gateway",
    "GatewayConfig",
    "SSEDecoder",
    "SSEError",
    "SSEEvent",
    "SSEEventTooLarge",
    "Timeouts",
    "__version__",
    "encode_event",
    "load_config",
    "serve",
]

# Public names that pull in trio, httpx or hypercorn: imported on first access.
_LAZY = {"Gateway": "trio_gateway._proxy.app", "serve": "trio_gateway._server.serve"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trio_gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
