"""Metrics and the usage database, seen from outside: through the gateway and the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anthropic
import httpx
import openai
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import STALL, AsgiCall, FakeResponse, make_gateway, serve_command
from tests.test_pipeline import request_for, stream_bytes
from trio_gateway._core.config import hash_key
from trio_gateway.testing.mock_upstream import MockUpstream, Script

CLIENT_KEY = "observability-client-key"
UPSTREAM_KEY = "observability-upstream-secret"
MODEL = "obs/free-model"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_what_went_through(autojump_clock: trio.testing.MockClock):
    def respond(request: httpx.Request) -> FakeResponse:
        if b'"messages"' in request.content and request.url.path.endswith("/messages"):
            return FakeResponse(body=[stream_bytes("messages")])
        return FakeResponse(body=[stream_bytes("chat")[:500], httpx.ReadError("reset")])

    gateway, _ = make_gateway(respond)
    for _ in range(3):
        await request_for("messages").run(gateway)
    await request_for("chat").run(gateway)
    cancelled = request_for("messages")
    gateway_slow, _ = make_gateway(FakeResponse(body=[b"data: {}\n\n", STALL]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled.run, gateway_slow)
        await trio.sleep(1)
        cancelled.disconnect()

    scrape = await AsgiCall(method="GET", path="/metrics").run(gateway)
    assert scrape.status == 200
    found = samples(scrape.text.decode())
    messages = (("kind", "messages"), ("model", "kilo/free-model"), ("status", "200"))
    chat = (("kind", "chat"), ("model", "kilo/free-model"), ("status", "200"))
    assert found[("trio_gateway_requests_total", messages)] == 3
    assert found[("trio_gateway_requests_total", chat)] == 1
    model = (("kind", "messages"), ("model", "kilo/free-model"))
    assert found[("trio_gateway_input_tokens_total", model)] == 3 * 42
    assert found[("trio_gateway_output_tokens_total", model)] == 3 * 5
    failure = (("kind", "chat"), ("model", "kilo/free-model"), ("type", "upstream_reset"))
    assert found[("trio_gateway_request_failures_total", failure)] == 1
    assert found[("trio_gateway_active_streams", ())] == 0
    assert found[("trio_gateway_request_duration_seconds_count", model)] == 3
    # The other gateway saw the cancellation, this one did not.
    other = samples((await AsgiCall(method="GET", path="/metrics").run(gateway_slow)).text.decode())
    assert other[("trio_gateway_client_cancellations_total", model)] == 1
    assert ("trio_gateway_client_cancellations_total", model) not in found or (
        found[("trio_gateway_client_cancellations_total", model)] == 0
    )


async def test_serve_records_every_request_and_usage_reports_them(
    tmp_path: Path, nursery: trio.Nursery
):
    """`serve` with a database: SDK requests, SIGTERM, then `usage --json` on the file."""
    mock = MockUpstream(Script(tokens=6), api_key=UPSTREAM_KEY)
    with trio.fail_after(30):
        await nursery.start(mock.serve)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[upstreams.mock]
base_url = "{mock.base_url}"
api_key_env = "OBS_UPSTREAM_KEY"

[models."{MODEL}"]
upstream = "mock"
upstream_model = "vendor/model:free"
free = true

[[keys]]
name = "alice"
sha256 = "{hash_key(CLIENT_KEY)}"

[accounting]
database = "data.db"

[log]
destination = "requests.log"
"""
    )
    with trio.fail_after(30):
        async with serve_command(config, {"OBS_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway:
            url = gateway.url

            def use_it() -> None:
                with openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0) as oa:
                    list(oa.chat.completions.create(model=MODEL, stream=True, messages=[]))
                    oa.responses.create(model=MODEL, input="hi")
                with anthropic.Anthropic(base_url=url, api_key=CLIENT_KEY, max_retries=0) as an:
                    an.messages.create(model=MODEL, max_tokens=9, messages=[])

            await trio.to_thread.run_sync(use_it)
    assert gateway.status == 0  # SIGTERM: drained and stopped cleanly
    database = str(tmp_path / "data.db")
    usage_command = [sys.executable, "-m", "trio_gateway", "usage", "--database", database]
    with trio.fail_after(30):
        report = await trio.run_process(
            [*usage_command, "--json", "--by", "key"], capture_stdout=True
        )
    (alice,) = json.loads(report.stdout)
    assert alice["key"] == "alice"
    assert alice["requests"] == 3
    assert alice["errors"] == 0
    assert alice["output_tokens"] == 3 * 6
    assert alice["input_tokens"] == 3 * 42
    log_lines = (tmp_path / "requests.log").read_text().splitlines()
    assert len(log_lines) == 3
    assert {json.loads(line)["kind"] for line in log_lines} == {"chat", "responses", "messages"}
    assert UPSTREAM_KEY not in (tmp_path / "requests.log").read_text()
    assert CLIENT_KEY not in (tmp_path / "requests.log").read_text()


async def test_requests_refused_before_routing_are_counted(autojump_clock: trio.testing.MockClock):
    gateway, _ = make_gateway(FakeResponse())
    await AsgiCall.json({"model": "nope"}).run(gateway)  # 404
    await AsgiCall(body=b"{}", headers=[(b"content-type", b"application/json")]).run(gateway)
    found = samples((await AsgiCall(method="GET", path="/metrics").run(gateway)).text.decode())
    chat = (("kind", "chat"), ("model", "none"))
    assert found[("trio_gateway_requests_total", (*chat, ("status", "404")))] == 1
    assert found[("trio_gateway_requests_total", (*chat, ("status", "401")))] == 1
