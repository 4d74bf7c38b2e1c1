"""The contenders: what sits between the load generator and the mock upstream.

* ``direct``: nothing; the client talks to the mock itself.
* ``bare``: :mod:`bench._bare`, a hypercorn + httpx pass-through (our stack's floor).
* ``gateway``: ``trio-gateway serve`` with a free-model alias, so every event is rewritten.
* ``litellm``: the LiteLLM proxy, when a ``litellm`` executable is found
  (``$TRIO_GATEWAY_BENCH_LITELLM``, else ``PATH``).
* ``nginx``: nginx with ``proxy_buffering off``, when an ``nginx`` executable is
  found (``$TRIO_GATEWAY_BENCH_NGINX``, else ``PATH``).

A missing optional peer is skipped with a note, never replaced by anything.
Each contender serves on a free loopback port, in its own process, with its
output in the run's work folder.

Two variables change how the gateway runs (for the chaos and soak scenarios):
``$TRIO_GATEWAY_BENCH_GATEWAY_SOURCE`` is a folder holding another copy of
the ``trio_gateway`` package (``git archive HEAD | tar -x -C DIR``, say),
which the gateway then runs from, while the mock and the suite stay this
clone's; ``$TRIO_GATEWAY_BENCH_TRACEMALLOC`` is a folder: the gateway then
runs under :mod:`bench._traced_gateway`, which traces its allocations and
writes a snapshot there on each SIGUSR1.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from bench._procs import Server, free_port, running
from trio_gateway._core.config import hash_key

__all__ = [
    "CLIENT_KEY",
    "PUBLIC_MODEL",
    "UPSTREAM_MODEL",
    "Contender",
    "Endpoint",
    "all_contenders",
    "bench_env",
]

CLIENT_KEY = "bench-client-key"
# LiteLLM refuses to start without a master key that looks strong: "sk-" and 64 hex digits.
_LITELLM_KEY = "sk-" + hash_key(CLIENT_KEY)
PUBLIC_MODEL = "bench/free-model"
UPSTREAM_MODEL = "mock-vendor/model:free"
_UPSTREAM_KEY_ENV = "TRIO_GATEWAY_BENCH_UPSTREAM_KEY"
SOURCE_ENV = "TRIO_GATEWAY_BENCH_GATEWAY_SOURCE"
B_SOURCE_ENV = "TRIO_GATEWAY_BENCH_B_SOURCE"  # a folder: the gateway-b contender runs its code
TRACEMALLOC_ENV = "TRIO_GATEWAY_BENCH_TRACEMALLOC"
PROFILE_ENV = "TRIO_GATEWAY_BENCH_PROFILE"  # a folder: the gateway runs under cProfile
_ALL_KINDS = frozenset({"chat", "messages", "responses"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the load generator sends requests, and the process to watch (None for direct)."""

    port: int
    model: str
    server: Server | None
    key: str = CLIENT_KEY
    database: Path | None = None
    """The gateway's usage database."""


class Contender(Protocol):
    """One way of serving the mock's streams to the client."""

    name: str
    kinds: frozenset[str]
    """The API kinds it is measured on."""

    def missing(self) -> str | None:
        """Why it cannot run here, or None when it can."""

    def start(
        self, mock_port: int, workdir: Path, timeouts: Mapping[str, float] | None = None
    ) -> AbstractAsyncContextManager[Endpoint]:
        """Start it in front of the mock; stop it on exit. Entering is a checkpoint.

        ``timeouts`` are the gateway's ``[timeouts]`` settings; the others ignore them.
        """


class _Ours:
    """A contender this repository provides: always there, measured on every kind."""

    kinds = _ALL_KINDS

    def missing(self) -> str | None:
        return None


class _Peer:
    """An optional peer: the ``program`` found through ``$variable``, else ``PATH``."""

    program: ClassVar[str]
    variable: ClassVar[str]

    def __init__(self) -> None:
        self.executable = os.environ.get(self.variable) or shutil.which(self.program)

    def missing(self) -> str | None:
        if self.executable is None:
            return f"no {self.program} executable (${self.variable} or PATH)"
        return None


class Direct(_Ours):
    name = "direct"

    @asynccontextmanager
    async def start(
        self, mock_port: int, workdir: Path, timeouts: Mapping[str, float] | None = None
    ) -> AsyncIterator[Endpoint]:
        yield Endpoint(mock_port, UPSTREAM_MODEL, None)


class Bare(_Ours):
    name = "bare"

    @asynccontextmanager
    async def start(
        self, mock_port: int, workdir: Path, timeouts: Mapping[str, float] | None = None
    ) -> AsyncIterator[Endpoint]:
        port = free_port()
        argv = [sys.executable, "-m", "bench._bare", "--port", str(port)]
        argv += ["--upstream", f"http://127.0.0.1:{mock_port}"]
        async with running(self.name, argv, port, workdir, env=bench_env()) as server:
            yield Endpoint(port, UPSTREAM_MODEL, server)


class Gateway(_Ours):
    name = "gateway"

    @asynccontextmanager
    async def start(
        self, mock_port: int, workdir: Path, timeouts: Mapping[str, float] | None = None
    ) -> AsyncIterator[Endpoint]:
        port = free_port()
        config = workdir / f"gateway-{port}.toml"
        config.write_text(gateway_config(mock_port, port, workdir, timeouts))
        argv = [sys.executable, "-m", "trio_gateway", "serve", "--config", str(config)]
        if traces := os.environ.get(TRACEMALLOC_ENV):
            argv[1:3] = ["-m", "bench._traced_gateway", "--snapshots", traces]
        elif profiles := os.environ.get(PROFILE_ENV):
            # serve exits normally on SIGTERM, so cProfile writes its file then.
            output = Path(profiles) / f"gateway-{port}.prof"
            argv[1:1] = ["-m", "cProfile", "-o", str(output)]
        env = bench_env() | {_UPSTREAM_KEY_ENV: "bench-upstream-key"}
        if source := self.source():
            env["PYTHONPATH"] = os.pathsep.join([source, env["PYTHONPATH"]])
        async with running(self.name, argv, port, workdir, env=env) as server:
            yield Endpoint(port, PUBLIC_MODEL, server, database=usage_database(workdir, port))

    def source(self) -> str | None:
        """The folder whose ``trio_gateway`` runs, if not this clone's."""
        return os.environ.get(SOURCE_ENV)


class GatewayB(Gateway):
    """A second gateway, from the folder ``$TRIO_GATEWAY_BENCH_B_SOURCE`` names.

    For judging a lever: the two gateways run in the same rounds, in
    alternating order with bare, so "gateway-b / bare" and "gateway / bare"
    are read off the same machine state. Left out when the variable is unset.
    """

    name = "gateway-b"

    def missing(self) -> str | None:
        if not os.environ.get(B_SOURCE_ENV):
            return f"no second source (${B_SOURCE_ENV})"
        return None

    def source(self) -> str | None:
        return os.environ.get(B_SOURCE_ENV)


def usage_database(workdir: Path, port: int) -> Path:
    """The usage database of the gateway serving on ``port``."""
    return workdir / f"usage-{port}.db"


def gateway_config(
    mock_port: int, port: int, workdir: Path, timeouts: Mapping[str, float] | None = None
) -> str:
    """The gateway's TOML: defaults everywhere except a short shutdown and files in ``workdir``.

    Accounting and the request log stay on, as in production, each in a
    file of its own for this server. ``timeouts`` replace or add
    ``[timeouts]`` settings.
    """
    settings = {"shutdown": 2.0, **(timeouts or {})}
    timeout_lines = "\n".join(f"{name} = {value:g}" for name, value in settings.items())
    return f"""\
[server]
bind = "127.0.0.1:{port}"

[timeouts]
{timeout_lines}

[upstreams.mock]
base_url = "http://127.0.0.1:{mock_port}/v1"
api_key_env = "{_UPSTREAM_KEY_ENV}"

[models."{PUBLIC_MODEL}"]
upstream = "mock"
upstream_model = "{UPSTREAM_MODEL}"
free = true

[[keys]]
name = "bench"
sha256 = "{hash_key(CLIENT_KEY)}"

[accounting]
database = "{usage_database(workdir, port)}"

[log]
destination = "{workdir / f"requests-{port}.log"}"
"""


class LiteLLM(_Peer):
    name = "litellm"
    program = "litellm"
    variable = "TRIO_GATEWAY_BENCH_LITELLM"
    kinds = frozenset({"chat"})  # it would translate the others to chat: not the same work

    @asynccontextmanager
    async def start(
        self, mock_port: int, workdir: Path, timeouts: Mapping[str, float] | None = None
    ) -> AsyncIterator[Endpoint]:
        assert self.executable is not None
        port = free_port()
        config = workdir / f"litellm-{port}.yaml"
        config.write_text(f"""\
model_list:
  - model_name: {PUBLIC_MODEL}
    litellm_params:
      model: openai/{UPSTREAM_MODEL}
      api_base: http://127.0.0.1:{mock_port}/v1
      api_key: bench-upstream-key
general_settings:
  master_key: {_LITELLM_KEY}
""")
        argv = [self.executable, "--config", str(config), "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--num_workers", "1"]
        # No network: the bundled model cost map, no telemetry.
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
        env |= {"LITELLM_TELEMETRY": "False", "NO_COLOR": "1"}
        async with running(self.name, argv, port, workdir, env=env, ready_timeout=120) as server:
            yield Endpoint(port, PUBLIC_MODEL, server, _LITELLM_KEY)


class Nginx(_Peer):
    name = "nginx"
    program = "nginx"
    variable = "TRIO_GATEWAY_BENCH_NGINX"
    kinds = _ALL_KINDS

    @asynccontextmanager
    async def start(
        self, mock_port: int, workdir: Path, timeouts: Mapping[str, float] | None = None
    ) -> AsyncIterator[Endpoint]:
        assert self.executable is not None
        port = free_port()
        prefix = workdir / f"nginx-{port}"
        prefix.mkdir()
        config = prefix / "nginx.conf"
        config.write_text(nginx_config(mock_port, port, prefix))
        argv = [self.executable, "-p", str(prefix), "-c", str(config), "-e", "stderr"]
        async with running(self.name, argv, port, workdir) as server:
            yield Endpoint(port, UPSTREAM_MODEL, server)


def nginx_config(mock_port: int, port: int, prefix: Path) -> str:
    """One nginx process (no master) proxying to the mock, unbuffered both ways."""
    return f"""\
daemon off;
master_process off;
worker_rlimit_nofile 8192;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    upstream mock {{ server 127.0.0.1:{mock_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def all_contenders() -> list[Contender]:
    """Every contender, in table order: the baselines, ours, then the peers."""
    return [Direct(), Bare(), Gateway(), GatewayB(), LiteLLM(), Nginx()]


def bench_env() -> dict[str, str]:
    """Put this clone first on the path of ``python -m``, whatever the working folder.

    So ``bench.<module>`` imports, and the gateway and mock measured are this
    clone's code even when ``trio_gateway`` is installed elsewhere (not editable).
    """
    root = str(Path(__file__).resolve().parent.parent)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
