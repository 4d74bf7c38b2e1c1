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
    "MAX_RETRIES",
    "MAX_WORKERS",
    "ConfigError",
    "Deployment",
    "GatewayConfig",
    "KeyEntry",
    "ModelRoute",
    "RedisTarget",
    "Routing",
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

#: The most ``[server] workers`` (processes serving one port) a gateway may run.
MAX_WORKERS: Final = 64

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


#: The most ``retries`` a model may ask for (extra attempts, across deployments and fallbacks).
MAX_RETRIES: Final = 10


@dataclass(frozen=True, slots=True)
class Deployment:
    """One place a public model is served: an upstream, its name for the model, a weight."""

    upstream: str
    upstream_model: str
    weight: float = 1.0  # relative share of the model's traffic

    @property
    def key(self) -> tuple[str, str]:
        """What the cooldowns know a deployment by: (upstream, upstream model)."""
        return (self.upstream, self.upstream_model)


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A public model: its deployments, and what to try when they fail (docs/routing.md).

    The short form ``ModelRoute(name, upstream, upstream_model)`` is one
    deployment of weight 1. ``upstream`` and ``upstream_model`` always name
    the first deployment, so code that knows one upstream per model still
    works. ``fallbacks`` are other public models, tried in order after this
    model's deployments; ``retries`` is the number of extra attempts in all
    (None: one attempt at each deployment of the chain, at most
    :data:`MAX_RETRIES` extra).
    """

    public_name: str
    upstream: str = ""
    upstream_model: str = ""
    free: bool = False
    deployments: tuple[Deployment, ...] = ()
    fallbacks: tuple[str, ...] = ()
    retries: int | None = None

    def __post_init__(self) -> None:
        path = f"models.{_quote(self.public_name)}"
        deployments = tuple(self.deployments)
        if not deployments:
            if not self.upstream or not self.upstream_model:
                raise ConfigError(f"{path}: needs upstream and upstream_model, or deployments")
            deployments = (Deployment(self.upstream, self.upstream_model),)
        elif not self.upstream and not self.upstream_model:
            object.__setattr__(self, "upstream", deployments[0].upstream)
            object.__setattr__(self, "upstream_model", deployments[0].upstream_model)
        elif (self.upstream, self.upstream_model) != deployments[0].key:
            raise ConfigError(f"{path}.deployments: not with upstream and upstream_model; use one")
        object.__setattr__(self, "deployments", deployments)
        object.__setattr__(self, "fallbacks", tuple(self.fallbacks))
        for index, deployment in enumerate(deployments):
            weight = deployment.weight
            if (
                isinstance(weight, bool)
                or not isinstance(weight, int | float)
                or not 0 < weight < math.inf
            ):
                where = f"{path}.deployments[{index}].weight"
                raise ConfigError(f"{where}: expected a positive number, got {weight!r}")
        retries = self.retries
        if retries is not None and (
            isinstance(retries, bool)
            or not isinstance(retries, int)
            or not 0 <= retries <= MAX_RETRIES
        ):
            raise ConfigError(
                f"{path}.retries: expected a whole number from 0 to {MAX_RETRIES}, got {retries!r}"
            )


@dataclass(frozen=True, slots=True)
class Routing:
    """``[routing]``: when a deployment that keeps failing is left out for a while.

    ``cooldown_failures`` failures of one deployment within
    ``cooldown_window`` seconds take it out of choice for
    ``cooldown_seconds``; 0 failures turns cooldowns off.
    """

    cooldown_failures: int = 3
    cooldown_window: float = 30.0
    cooldown_seconds: float = 30.0

    def __post_init__(self) -> None:
        failures = self.cooldown_failures
        if isinstance(failures, bool) or not isinstance(failures, int) or not 0 <= failures <= 1000:
            raise ConfigError(
                f"routing.cooldown_failures: expected a whole number from 0 to 1000, "
                f"got {failures!r}"
            )
        for name in ("cooldown_window", "cooldown_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not 0 < value < math.inf:
                raise ConfigError(f"routing.{name}: expected a positive number, got {value!r}")


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
    routing: Routing = field(default_factory=Routing)  # [routing]: cooldowns
    # [accounting]: the usage database, a file, ":memory:" or a postgresql:// URL (which may
    # hold a password, hence no repr); None: no usage database
    database: str | None = field(default=None, repr=False)
    database_schema: str | None = None  # PostgreSQL only: the schema of its tables
    spill_dir: str | None = None  # the spill files' folder; None: beside the SQLite file
    retry_interval: float = 30.0  # seconds between imports of spilled records (and reconnects)
    log_level: str = "info"  # the per-request JSON log line's level
    log_destination: str = "-"  # "-" for stderr, "logging" for the stdlib logger, or a path
    # [limits]: rate limits kept in Redis, shared by processes (None: in this process's memory)
    redis_url: str | None = field(default=None, repr=False)  # the URL may hold a password
    redis_timeout: float = 0.05  # seconds; bounds every call to Redis
    on_redis_error: RedisErrorPolicy = "fail_open"
    redis_prefix: str = "trio-gateway:"
    workers: int = 1  # [server] workers: processes serving the one port

    def __post_init__(self) -> None:
        for route in self.models.values():
            for index, deployment in enumerate(route.deployments):
                if deployment.upstream not in self.upstreams:
                    where = "upstream"
                    if len(route.deployments) > 1:
                        where = f"deployments[{index}].upstream"
                    raise ConfigError(
                        f"models.{_quote(route.public_name)}.{where}: no upstream named "
                        f"{deployment.upstream!r} "
                        f"(known: {', '.join(sorted(self.upstreams)) or 'none'})"
                    )
        _check_fallbacks(self.models)
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
        if isinstance(self.workers, bool) or not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(
                f"server.workers: expected a whole number from 1 to {MAX_WORKERS}, "
                f"got {self.workers!r}"
            )
        # In-memory buckets are per process: N workers would admit N times each limit.
        limited = any(key.rpm is not None or key.tpm is not None for key in self.keys)
        if self.workers > 1 and limited and self.redis_url is None:
            raise ConfigError(
                f"limits: workers = {self.workers} needs [limits] redis_url; "
                "rate limits would be enforced per worker"
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


#: ``[accounting] database`` values that select PostgreSQL (libpq reads both).
_DATABASE_URL_SCHEMES: Final = ("postgresql://", "postgres://")
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _check_database_url(url: str) -> None:
    """Refuse a PostgreSQL URL that cannot be right; the message never echoes it (password).

    libpq reads the rest (and says what is wrong with it) when the gateway starts.
    """
    problem = (
        "accounting.database: expected postgresql://[USER[:PASSWORD]@][HOST][:PORT][/DBNAME]"
        "[?PARAMS]"
    )
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  # ValueError when not a number in 0..65535
    except ValueError:
        raise ConfigError(problem) from None
    if parts.fragment or re.search(r"\s", url):
        raise ConfigError(problem)


def _check_fallbacks(models: Mapping[str, ModelRoute]) -> None:
    """Each fallback names a model, once; no model falls back to itself, even through others."""
    for route in models.values():
        path = f"models.{_quote(route.public_name)}.fallbacks"
        seen: set[str] = set()
        for name in route.fallbacks:
            if name not in models:
                raise ConfigError(f"{path}: no model named {name!r}")
            if name in seen:
                raise ConfigError(f"{path}: {name!r} is listed twice")
            seen.add(name)
    done: set[str] = set()  # models from which no cycle can be reached
    for start in models:
        # Depth first, with the path from ``start``: a name met again on it closes a cycle.
        path_names: list[str] = []
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            name, index = stack.pop()
            if index == 0:
                if name in done:
                    continue
                if name in path_names:
                    cycle = [*path_names[path_names.index(name) :], name]
                    raise ConfigError(
                        f"models.{_quote(cycle[0])}.fallbacks: a cycle: "
                        + " -> ".join(repr(n) for n in cycle)
                    )
                path_names.append(name)
            fallbacks = models[name].fallbacks
            if index < len(fallbacks):
                stack.append((name, index + 1))
                stack.append((fallbacks[index], 0))
            else:
                done.add(path_names.pop())


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

    def whole(self, key: str, default: int) -> int:
        """A whole number, range-checked by the caller."""
        value = self._get(key, int, "a whole number")
        return default if value is None else int(value)

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

    def ordered_names(self, key: str) -> tuple[str, ...]:
        """A list of non-empty strings, in its order; empty when absent."""
        value = self._get(key, list, "a list of names")
        if value is None:
            return ()
        if not all(isinstance(item, str) and item for item in value):
            raise ConfigError(f"{self.key_path(key)}: expected a list of non-empty strings")
        return tuple(value)

    def positive(self, key: str, default: float) -> float:
        """A positive, finite number (not seconds: a weight)."""
        value = self._get(key, (int, float), "a positive number")
        if value is None:
            return default
        if not 0 < value < math.inf:
            raise ConfigError(f"{self.key_path(key)}: expected a positive number, got {value!r}")
        return float(value)

    def table(self, key: str) -> _Table:
        self.used.add(key)
        return _Table(self.data.get(key, {}), self.key_path(key))

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key_path(unknown[0])}: unknown key")


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _model_route(public_name: str, m: _Table, upstreams: Mapping[str, Upstream]) -> ModelRoute:
    """One ``[models."NAME"]`` table: the short form, or deployments (docs/routing.md)."""
    free = m.flag("free")
    fallbacks = m.ordered_names("fallbacks")
    retries = None
    if "retries" in m.data:
        retries = m.whole("retries", 0)
        if not 0 <= retries <= MAX_RETRIES:
            raise ConfigError(
                f"{m.key_path('retries')}: expected a whole number from 0 to {MAX_RETRIES}, "
                f"got {retries!r}"
            )
    if "deployments" not in m.data:
        upstream, upstream_model = m.text("upstream"), m.text("upstream_model")
        return ModelRoute(public_name, upstream, upstream_model, free, (), fallbacks, retries)
    m.used.add("deployments")
    where = m.key_path("deployments")
    if "upstream" in m.data or "upstream_model" in m.data:
        raise ConfigError(f"{where}: not with upstream and upstream_model; use one")
    raw = m.data["deployments"]
    if not isinstance(raw, list):
        raise ConfigError(
            f"{where}: expected an array of tables, written [{{ upstream = ..., "
            "upstream_model = ... }]"
        )
    if not raw:
        raise ConfigError(f"{where}: must not be empty")
    deployments = []
    for index, item in enumerate(raw):
        d = _Table(item, f"{where}[{index}]")
        upstream = d.text("upstream")
        if upstream not in upstreams:
            known = ", ".join(sorted(upstreams)) or "none"
            raise ConfigError(
                f"{d.key_path('upstream')}: no upstream named {upstream!r} (known: {known})"
            )
        deployment = Deployment(upstream, d.text("upstream_model"), d.positive("weight", 1.0))
        d.check_unknown()
        deployments.append(deployment)
    return ModelRoute(
        public_name, free=free, deployments=tuple(deployments), fallbacks=fallbacks, retries=retries
    )


def parse_config(
    data: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    *,
    base_dir: Path | None = None,
    workers: int | None = None,
) -> GatewayConfig:
    """Validate parsed TOML; read upstream keys from ``env`` (default: os.environ).

    Relative paths (the usage database, a log file) are taken from
    ``base_dir``, the config file's folder, or the working directory.
    ``workers``, when given, replaces ``[server] workers`` (``--workers``)
    before anything is checked.
    """
    env = os.environ if env is None else env
    root = _Table(dict(data), "")

    server = root.table("server")
    bind = server.text("bind", "127.0.0.1:8080")
    max_body = server.size("max_body_bytes", 32 * 1024 * 1024)
    max_upstream_body = server.size("max_upstream_body_bytes", 64 * 1024 * 1024)
    max_event = server.size("max_event_bytes", 16 * 1024 * 1024)
    in_file = server.whole("workers", 1)
    workers = in_file if workers is None else workers
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
        models[public_name] = _model_route(public_name, m, upstreams)
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
    is_url = database.startswith(_DATABASE_URL_SCHEMES)
    if is_url:
        _check_database_url(database)
    elif database != ":memory:":
        database = str(base / database)
    database_schema = accounting.text("schema") if "schema" in accounting.data else None
    if database_schema is not None and not is_url:
        raise ConfigError('accounting.schema: only for a PostgreSQL database ("postgresql://...")')
    if database_schema is not None and not _SCHEMA_NAME.fullmatch(database_schema):
        raise ConfigError(
            "accounting.schema: expected letters, digits and _ (at most 63, not a digit first)"
        )
    spill_dir = accounting.text("spill_dir") if "spill_dir" in accounting.data else None
    if spill_dir is not None and database == ":memory:":
        raise ConfigError("accounting.spill_dir: a database in memory has no spill files")
    if spill_dir is not None or is_url:
        spill_dir = str(base / (spill_dir or ""))  # a URL's spill files: beside the config
    retry_interval = accounting.seconds("retry_interval", 30.0)
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

    r = root.table("routing")
    defaults_routing = Routing()
    routing = Routing(
        cooldown_failures=r.whole("cooldown_failures", defaults_routing.cooldown_failures),
        cooldown_window=r.seconds("cooldown_window", defaults_routing.cooldown_window),
        cooldown_seconds=r.seconds("cooldown_seconds", defaults_routing.cooldown_seconds),
    )
    r.check_unknown()
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
        database_schema=database_schema,
        spill_dir=spill_dir,
        retry_interval=retry_interval,
        log_level=log_level,
        log_destination=log_destination,
        redis_url=redis_url,
        redis_timeout=redis_timeout,
        on_redis_error="fail_open" if on_redis_error == "fail_open" else "fail_closed",
        redis_prefix=redis_prefix,
        workers=workers,
        routing=routing,
    )


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None, *, workers: int | None = None
) -> GatewayConfig:
    """Read and validate a TOML config file; raise ConfigError naming the problem.

    ``workers``: as for :func:`parse_config`.
    """
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, env, base_dir=Path(path).resolve().parent, workers=workers)
