"""The installed version of trio-gateway, read once from the package metadata."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trio-gateway")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0+unknown"

__all__ = ["__version__"]
