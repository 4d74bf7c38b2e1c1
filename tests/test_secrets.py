"""The secret scan: keys appear on no output channel of a real ``trio-gateway serve``.

One gateway process in front of a mock provider that echoes its own key
everywhere it can (stream events, JSON answers, error bodies, a 401, a
header). Clients send good keys, wrong keys and malformed credentials.
Afterwards every channel is searched for every key: the bodies and headers
clients got, the gateway's stdout and stderr, the request log, the usage
database files, ``/metrics``, and what the provider received.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import trio

from tests.helpers import serve_command
from trio_gateway._core.config import hash_key
from trio_gateway.testing.mock_upstream import MockRequest, MockUpstream, Script

UPSTREAM_KEY = "sk-upstream-SCAN-5d1e9c0b7a"
CLIENT_KEY = "client-SCAN-key-3f8b2a61"
WRONG_KEY = "client-SCAN-wrong-9e4c7d"
MODEL = "scan/free-model"
TIME_LIMIT = 60


def echoing_script(request: MockRequest) -> Script:
    """A provider that quotes its key back, in the way the request's ``user`` field asks."""
    how = (request.json or {}).get("user")
    event = b"data: " + orjson.dumps({"choices": [{"delta": {"content": UPSTREAM_KEY}}]})
    if how == "stream":
        return Script(chunks=(event + b"\n\n", b"data: key=" + UPSTREAM_KEY.encode() + b"\n\n"))
    if how == "json":
        body = {"id": "x", "model": "m", "choices": [], "echo": f"Bearer {UPSTREAM_KEY}"}
        return Script(chunks=(orjson.dumps(body),))
    if how == "error":
        return Script(
            status=400, error_body=b'{"error":{"message":"bad key ' + UPSTREAM_KEY.encode() + b'"}}'
        )
    if how == "refused":
        return Script(status=401, error_body=UPSTREAM_KEY.encode())
    if how == "html":
        return Script(
            status=502, content_type="text/html", error_body=b"<p>" + UPSTREAM_KEY.encode()
        )
    return Script(tokens=5)


def files_named(folder: Path, prefix: str) -> bytes:
    return b"".join(path.read_bytes() for path in folder.iterdir() if path.name.startswith(prefix))


def config_text(base_url: str) -> str:
    return f"""
[upstreams.mock]
base_url = "{base_url}"
api_key_env = "SCAN_UPSTREAM_KEY"

[models."{MODEL}"]
upstream = "mock"
upstream_model = "vendor/model:free"
free = true

[[keys]]
name = "scanner"
sha256 = "{hash_key(CLIENT_KEY)}"

[accounting]
database = "usage.db"

[log]
destination = "requests.log"
level = "debug"
"""


async def test_no_key_reaches_any_output_channel(tmp_path: Path, nursery: trio.Nursery):
    mock = MockUpstream(echoing_script, api_key=UPSTREAM_KEY)
    with trio.fail_after(TIME_LIMIT):
        await nursery.start(mock.serve)
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(mock.base_url))
    seen: list[bytes] = []  # everything clients received, heads included
    statuses: list[int] = []

    def note(response: httpx.Response) -> httpx.Response:
        seen.append(repr(response.headers.raw).encode() + response.content)
        statuses.append(response.status_code)
        return response

    with trio.fail_after(TIME_LIMIT):
        async with (
            serve_command(config, {"SCAN_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=20) as client,
        ):
            good = {"authorization": f"Bearer {CLIENT_KEY}"}
            chat = {"model": MODEL, "messages": []}
            for echo in ("plain", "stream", "json", "error", "refused", "html"):
                for path, extra in (
                    ("/v1/chat/completions", {"stream": echo in ("plain", "stream")}),
                    ("/v1/messages", {"max_tokens": 5, "stream": echo == "stream"}),
                ):
                    # Client headers that must stay behind, key included.
                    headers = {**good, "cookie": f"s={CLIENT_KEY}", "x-echo": CLIENT_KEY}
                    payload = {**chat, **extra, "user": echo}
                    note(await client.post(path, json=payload, headers=headers))
            for credentials in (
                {"authorization": f"Bearer {WRONG_KEY}"},
                {"x-api-key": WRONG_KEY},
                {"authorization": f"Basic {WRONG_KEY}"},
                {"authorization": f"Bearer {CLIENT_KEY}", "x-api-key": WRONG_KEY},
            ):
                note(await client.post("/v1/chat/completions", json=chat, headers=credentials))
            note(await client.get("/v1/models", headers=good))
            metrics = note(await client.get("/metrics"))
            assert b"trio_gateway_requests_total" in metrics.content
    assert gateway.status == 0
    # plain, stream, json: 200; error: 400; refused (our key): 502; html: 502 x 2 kinds;
    # then three wrong credentials, the right one, /v1/models and /metrics.
    assert statuses == [200] * 6 + [400] * 2 + [502] * 4 + [401] * 3 + [200] * 3
    assert b"[redacted]" in b"".join(seen), "the provider's echo reached the gateway"

    channels = {
        "client answers": b"\n".join(seen),
        "gateway stdout and stderr": bytes(gateway.output),
        "request log": (tmp_path / "requests.log").read_bytes(),
        "usage database": files_named(tmp_path, "usage.db"),  # with -wal, -shm, .spill.jsonl
    }
    # Routed: 6 answers x 2 kinds, and the request whose Authorization (which
    # wins) held the right key beside a wrong x-api-key.
    assert channels["request log"].count(b"\n") == 13
    assert b"scanner" in channels["usage database"]
    for name, data in channels.items():
        for secret in (UPSTREAM_KEY, CLIENT_KEY, WRONG_KEY):
            assert secret.encode() not in data, f"{secret} leaked into the {name}"

    upstream_saw = b"".join(
        repr(request.headers).encode() + request.body for request in mock.requests
    )
    assert UPSTREAM_KEY.encode() in upstream_saw  # the upstream gets its own key ...
    for secret in (CLIENT_KEY, WRONG_KEY):
        assert secret.encode() not in upstream_saw  # ... and never a client's
    assert len(mock.requests) == 13
