"""trio-gateway: a stream-safe AI gateway (LLM API proxy) built on Trio.

The codec (:mod:`trio_gateway.sse`) and the rewriters do no I/O; Trio lives
only in the pipeline and the server layers.
"""

from importlib.metadata import PackageNotFoundError, version

from trio_gateway.sse import SSEDecoder, SSEError, SSEEvent, SSEEventTooLarge, encode_event

try:
    __version__ = version("trio-gateway")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0+unknown"

__all__ = [
    "SSEDecoder",
    "SSEError",
    "SSEEvent",
    "SSEEventTooLarge",
    "__version__",
    "encode_event",
]
