"""Configuration: the TOML file, validated once at start-up.

Every check names the bad key, so a mistake in ``gateway.toml`` is one line
of output, not a stack trace. Upstream keys come from the environment and
are kept out of every ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

__all__ = [
    "LOG_LEVELS",
    "ConfigError",
    "GatewayConfig",
    "KeyEntry",
    "ModelRoute",
    "RedisTarget",
    "Timeouts",
    "Upstream",
    "hash_key",
    "load_config",
    "parse_config",
    "split_redis_url",
]

AuthStyle = Literal["bearer", "x-api-key"]
#: ``[limits] on_redis_error``: admit when Redis does not answer, or refuse with 503.
RedisErrorPolicy = Literal["fail_open", "fail_closed"]

#: The request log's levels (``[log] level``): each name's stdlib logging level; "off" logs nothing.
LOG_LEVELS: Final[dict[str, int | None]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "off": None,
}

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):(?P<port>\d{1,5})")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


_OPTIONAL_TIMEOUTS = ("idle", "keepalive", "client_stall", "request_body")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. For the optional ones (idle, keepalive, client_stall, request_body) 0 means off.

    Off is stored as ``math.inf``, so code never needs to special-case 0.
    """

    connect: float = 10.0
    first_byte: float = 120.0  # until upstream response headers
    idle: float = 300.0  # longest silence between upstream chunks
    keepalive: float = 15.0  # upstream silence after which the client gets a comment
    client_stall: float = 60.0  # longest a client may refuse to take the next chunk
    shutdown: float = 30.0  # grace given to open exchanges on shutdown
    # Longest wait for a whole request head, and idle time between requests on a
    # kept-alive connection (hypercorn's keep_alive_timeout times both). Above
    # httpx's 5 s keep-alive expiry, so SDK clients close idle connections first.
    client_headers: float = 10.0
    request_body: float = 60.0  # longest wait for a whole request body, however it trickles

    def __post_init__(self) -> None:
        for name in (
            "connect",
            "first_byte",
            "idle",
            "keepalive",
            "client_stall",
            "shutdown",
            "client_headers",
            "request_body",
        ):
            value = getattr(self, name)
            if value == 0 and name in _OPTIONAL_TIMEOUTS:
                object.__setattr__(self, name, math.inf)
            elif not value > 0:
                raise ConfigError(f"timeouts.{name}: expected a positive number, got {value!r}")


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: str
    api_key: str = field(repr=False)
    auth: AuthStyle = "bearer"


@dataclass(frozen=True, slots=True)
class ModelRoute:
    public_name: str
    upstream: str
    upstream_model: str
    free: bool = False


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One client key: its hash, and what it may do (None: no restriction)."""

    name: str
    sha256: str = field(repr=False)
    models: frozenset[str] | None = None  # public model names this key may use
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute, charged from reported usage

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    upstreams: Mapping[str, Upstream]
    models: Mapping[str, ModelRoute]
    keys: tuple[KeyEntry, ...] = ()
    allow_anonymous: bool = False
    bind: str = "127.0.0.1:8080"
    max_body_bytes: int = 32 * 1024 * 1024
    max_upstream_body_bytes: int = 64 * 1024 * 1024  # a non-streamed upstream answer
    max_event_bytes: int = 16 * 1024 * 1024
    timeouts: Timeouts = field(default_factory=Timeouts)
    database: str | None = None  # the usage database; None: no usage database
    log_level: str = "info"  # the per-request JSON log line's level
    log_destination: str = "-"  # "-" for stderr, "logging" for the stdlib logger, or a path
    # [limits]: rate limits kept in Redis, shared by processes (None: in this process's memory)
    redis_url: str | None = field(default=None, repr=False)  # the URL may hold a password
    redis_timeout: float = 0.05  # seconds; bounds every call to Redis
    on_redis_error: RedisErrorPolicy = "fail_open"
    redis_prefix: str = "trio-gateway:"

    def __post_init__(self) -> None:
        for route in self.models.values():
            if route.upstream not in self.upstreams:
                raise ConfigError(
                    f"models.{_quote(route.public_name)}.upstream: no upstream named "
                    f"{route.upstream!r} (known: {', '.join(sorted(self.upstreams)) or 'none'})"
                )
        if not self.keys and not self.allow_anonymous:
            raise ConfigError(
                "keys: no [[keys]] configured; add one (see `trio-gateway hash-key`) "
                "or set [auth] allow_anonymous = true"
            )
        seen: dict[tuple[str, str], int] = {}
        for index, key in enumerate(self.keys):
            # Limits and usage are per name; a repeated hash would shadow a key.
            for field_name, value in (("name", key.name), ("sha256", key.sha256)):
                if (field_name, value) in seen:
                    earlier = seen[field_name, value]
                    raise ConfigError(f"keys[{index}].{field_name}: the same as keys[{earlier}]")
                seen[field_name, value] = index
            unknown = sorted((key.models or frozenset()) - set(self.models))
            if unknown:
                raise ConfigError(f"keys[{index}].models: no model named {unknown[0]!r}")
        split_bind(self.bind)
        if self.redis_url is not None:
            split_redis_url(self.redis_url)
        if not 0 < self.redis_timeout < math.inf:
            raise ConfigError(
                f"limits.redis_timeout: expected a positive number, got {self.redis_timeout!r}"
            )

    def find_key(self, presented: str) -> KeyEntry | None:
        """The configured key matching ``presented``, or None.

        Compares SHA-256 digests in constant time against every entry, so
        timing does not reveal which entry (if any) came close.
        """
        digest = hashlib.sha256(presented.encode()).hexdigest()
        found = None
        for entry in self.keys:
            if hmac.compare_digest(digest, entry.sha256):
                found = entry
        return found


def hash_key(key: str) -> str:
    """The hex SHA-256 of a client key, as ``[[keys]] sha256`` stores it."""
    return hashlib.sha256(key.encode()).hexdigest()


def split_bind(bind: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6); raise ConfigError if malformed."""
    match = _HOST_PORT.fullmatch(bind)
    if match is None or int(match["port"]) > 65535:
        raise ConfigError(f"server.bind: expected HOST:PORT, got {bind!r}")
    return match["host"].strip("[]"), int(match["port"])


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where ``[limits] redis_url`` points; the password is kept out of ``repr``."""

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False  # rediss://
    username: str | None = None
    password: str | None = field(default=None, repr=False)


_REDIS_URL_FORM = "expected redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] or rediss://..."


def split_redis_url(url: str) -> RedisTarget:
    """Parse a ``redis://`` or ``rediss://`` URL; raise a ConfigError that never echoes it."""
    problem = f"limits.redis_url: {_REDIS_URL_FORM}"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError when not a number in 0..65535
    except ValueError:
        raise ConfigError(problem) from None
    if (
        parts.scheme not in ("redis", "rediss")
        or not parts.hostname
        or port == 0
        or parts.query
        or parts.fragment
        or re.search(r"\s", url)
    ):
        raise ConfigError(problem)
    db = parts.path.removeprefix("/")
    if not re.fullmatch(r"\d{0,9}", db):
        raise ConfigError("limits.redis_url: the database must be a number, as in redis://HOST/0")
    if parts.username and parts.password is None:
        raise ConfigError("limits.redis_url: a user name needs a password, as in USER:PASSWORD@")
    return RedisTarget(
        host=parts.hostname,
        port=port or 6379,
        db=int(db or 0),
        tls=parts.scheme == "rediss",
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=None if parts.password is None else urllib.parse.unquote(parts.password),
    )


def _quote(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'


class _Table:
    """A TOML table being validated: typed getters that name the key on error."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a table")
        self.data: dict[str, Any] = data
        self.path = path
        self.used: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{_quote(key)}" if self.path else _quote(key)

    def _get(self, key: str, kind: type | tuple[type, ...], label: str) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            return None
        # bool is an int in Python; refuse it where a number is wanted.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
            raise ConfigError(f"{self.key_path(key)}: expected {label}, got {value!r}")
        return value

    def text(self, key: str, default: str | None = None) -> str:
        value = self._get(key, str, "a string")
        if value is None:
            if default is None:
                raise ConfigError(f"{self.key_path(key)}: required")
            return default
        if not value:
            raise ConfigError(f"{self.key_path(key)}: must not be empty")
        return str(value)

    def flag(self, key: str) -> bool:
        value = self._get(key, bool, "true or false")
        return bool(value)

    def seconds(self, key: str, default: float, *, zero_is_off: bool = False) -> float:
        value = self._get(key, (int, float), "a number of seconds")
        if value is None:
            return default
        if value == 0 and zero_is_off:
            return math.inf
        if not value > 0 or not math.isfinite(value):
            off = " (0 turns it off)" if zero_is_off else ""
            raise ConfigError(
                f"{self.key_path(key)}: expected a positive number{off}, got {value!r}"
            )
        return float(value)

    def size(self, key: str, default: int) -> int:
        value = self._get(key, int, "a whole number of bytes")
        if value is None:
            return default
        if value < 1:
            raise ConfigError(f"{self.key_path(key)}: must be at least 1, got {value!r}")
        return int(value)

    def count(self, key: str) -> int | None:
        """A positive whole number, or None when absent."""
        value = self._get(key, int, "a whole number")
        if value is None:
            return None
        if value < 1:
            raise ConfigError(f"{self.key_path(key)}: must be at least 1, got {value!r}")
        return int(value)

    def names(self, key: str) -> frozenset[str] | None:
        """A list of non-empty strings, or None when absent."""
        value = self._get(key, list, "a list of names")
        if value is None:
            return None
        if not all(isinstance(item, str) and item for item in value):
            raise ConfigError(f"{self.key_path(key)}: expected a list of non-empty strings")
        return frozenset(value)

    def table(self, key: str) -> _Table:
        self.used.add(key)
        return _Table(self.data.get(key, {}), self.key_path(key))

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key_path(unknown[0])}: unknown key")


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def parse_config(
    data: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    *,
    base_dir: Path | None = None,
) -> GatewayConfig:
    """Validate parsed TOML; read upstream keys from ``env`` (default: os.environ).

    Relative paths (the usage database, a log file) are taken from
    ``base_dir``, the config file's folder, or the working directory.
    """
    env = os.environ if env is None else env
    root = _Table(dict(data), "")

    server = root.table("server")
    bind = server.text("bind", "127.0.0.1:8080")
    max_body = server.size("max_body_bytes", 32 * 1024 * 1024)
    max_upstream_body = server.size("max_upstream_body_bytes", 64 * 1024 * 1024)
    max_event = server.size("max_event_bytes", 16 * 1024 * 1024)
    server.check_unknown()

    t = root.table("timeouts")
    defaults = Timeouts()
    timeouts = Timeouts(
        connect=t.seconds("connect", defaults.connect),
        first_byte=t.seconds("first_byte", defaults.first_byte),
        idle=t.seconds("idle", defaults.idle, zero_is_off=True),
        keepalive=t.seconds("keepalive", defaults.keepalive, zero_is_off=True),
        client_stall=t.seconds("client_stall", defaults.client_stall, zero_is_off=True),
        shutdown=t.seconds("shutdown", defaults.shutdown),
        client_headers=t.seconds("client_headers", defaults.client_headers),
        request_body=t.seconds("request_body", defaults.request_body, zero_is_off=True),
    )
    t.check_unknown()

    upstreams: dict[str, Upstream] = {}
    upstream_tables = root.table("upstreams")
    for name in upstream_tables.data:
        u = upstream_tables.table(name)
        base_url = u.text("base_url").rstrip("/")
        if not re.match(r"https?://[^/\s]+", base_url):
            raise ConfigError(f"{u.key_path('base_url')}: expected an http:// or https:// URL")
        if "api_key" in u.data:
            raise ConfigError(
                f"{u.key_path('api_key')}: keys are never written in the file; use api_key_env"
            )
        env_name = u.text("api_key_env")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env_name):
            # Never echo the value: it may be a key pasted in by mistake.
            raise ConfigError(f"{u.key_path('api_key_env')}: expected an environment variable name")
        api_key = env.get(env_name)
        if not api_key:
            raise ConfigError(
                f"{u.key_path('api_key_env')}: environment variable {env_name} is not set"
            )
        auth = u.text("auth", "bearer")
        if auth not in ("bearer", "x-api-key"):
            raise ConfigError(f'{u.key_path("auth")}: expected "bearer" or "x-api-key"')
        u.check_unknown()
        upstreams[name] = Upstream(
            name, base_url, api_key, "bearer" if auth == "bearer" else "x-api-key"
        )

    models: dict[str, ModelRoute] = {}
    model_tables = root.table("models")
    for public_name in model_tables.data:
        m = model_tables.table(public_name)
        models[public_name] = ModelRoute(
            public_name=public_name,
            upstream=m.text("upstream"),
            upstream_model=m.text("upstream_model"),
            free=m.flag("free"),
        )
        m.check_unknown()

    root.used.add("keys")
    raw_keys = data.get("keys", [])
    if not isinstance(raw_keys, list):
        raise ConfigError("keys: expected an array of tables, written [[keys]]")
    keys = []
    for index, raw in enumerate(raw_keys):
        k = _Table(raw, f"keys[{index}]")
        name = k.text("name")
        digest = k.text("sha256").lower()
        if not _HEX_SHA256.fullmatch(digest):
            raise ConfigError(
                f"keys[{index}].sha256: expected 64 hex digits (`trio-gateway hash-key`)"
            )
        allowed = k.names("models")
        rpm = k.count("rpm")
        tpm = k.count("tpm")
        k.check_unknown()
        keys.append(KeyEntry(name, digest, models=allowed, rpm=rpm, tpm=tpm))

    base = base_dir or Path()
    accounting = root.table("accounting")
    database = accounting.text("database", "usage.db")
    if database != ":memory:":
        database = str(base / database)
    accounting.check_unknown()

    log = root.table("log")
    log_level = log.text("level", "info").lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log.level: expected one of {', '.join(LOG_LEVELS)}")
    log_destination = log.text("destination", "-")
    if log_destination not in ("-", "logging"):
        log_destination = str(base / log_destination)
    log.check_unknown()

    auth_table = root.table("auth")
    allow_anonymous = auth_table.flag("allow_anonymous")
    auth_table.check_unknown()

    limits = root.table("limits")
    redis_url = limits.text("redis_url") if "redis_url" in limits.data else None
    redis_timeout = limits.seconds("redis_timeout", 0.05)
    on_redis_error = limits.text("on_redis_error", "fail_open")
    if on_redis_error not in ("fail_open", "fail_closed"):
        raise ConfigError('limits.on_redis_error: expected "fail_open" or "fail_closed"')
    redis_prefix = limits.text("redis_prefix", "trio-gateway:")
    limits.check_unknown()
    root.check_unknown()

    return GatewayConfig(
        upstreams=upstreams,
        models=models,
        keys=tuple(keys),
        allow_anonymous=allow_anonymous,
        bind=bind,
        max_body_bytes=max_body,
        max_upstream_body_bytes=max_upstream_body,
        max_event_bytes=max_event,
        timeouts=timeouts,
        database=database,
        log_level=log_level,
        log_destination=log_destination,
        redis_url=redis_url,
        redis_timeout=redis_timeout,
        on_redis_error="fail_open" if on_redis_error == "fail_open" else "fail_closed",
        redis_prefix=redis_prefix,
    )


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate a TOML config file; raise ConfigError naming the problem."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, env, base_dir=Path(path).resolve().parent)
