"""The benchmark suite (bench/) runs, and its result file holds what docs/benchmarks.md reads.

The smoke runs are real time: two scenarios at ``--quick`` scale, three
contenders, one run; then chaos, chaos-sigterm and soak with a few dozen
requests each; each in a subprocess bounded by its own timeout. They check
the structure and that the numbers are sane, never how fast anything is,
nor the chaos targets (those depend on the gateway, not on the suite).
The fault plans and the verdicts are pure, and are tested with plain data.
"""

from __future__ import annotations

import json
import os
import pstats
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench._contenders import B_SOURCE_ENV, UPSTREAM_MODEL, GatewayB
from bench._faults import Answer, Outcome, classify, layout, make_plans
from bench._micro import main as micro
from bench._report import summarize, within_runs
from bench._soak import late_slope
from trio_gateway.testing.mock_upstream import Script, StreamKind, render_json, render_stream

ROOT = Path(__file__).resolve().parent.parent


def _ratio(a: float, b: float) -> float:
    return a / b


def test_ratios_are_taken_within_each_run_then_medianed() -> None:
    runs = [
        {"gateway": {"cpu": 2.0}, "bare": {"cpu": 1.0}},
        {"gateway": {"cpu": 9.0}, "bare": {"cpu": 3.0}},
        {"gateway": {"cpu": 4.0}, "bare": {"cpu": 4.0}},
        {"gateway": {"cpu": 5.0}},  # bare failed in this run: no ratio from it
    ]
    assert within_runs(runs, "gateway", "bare", "cpu", _ratio) == 2.0
    summary = summarize(runs, ["bare", "gateway"])
    assert summary["median"] == {"bare": {"cpu": 3.0}, "gateway": {"cpu": 4.5}}
    assert summary["ratio_to_bare"] == {"gateway": {"cpu": 2.0}}


def test_gateway_b_runs_only_with_a_second_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(B_SOURCE_ENV, raising=False)
    assert GatewayB().missing() == f"no second source (${B_SOURCE_ENV})"
    monkeypatch.setenv(B_SOURCE_ENV, "/somewhere/else")
    assert GatewayB().missing() is None
    assert GatewayB().source() == "/somewhere/else"


def test_instruction_counts_are_repeatable_and_sane() -> None:
    """``python -m bench._instructions --quick``: bare and the gateway, each load twice over
    for bare; both counts of the same server agree, and the gateway does more work."""
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        reason = f"not installed: {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_GATEWAY_BENCH_")}
    command = [sys.executable, "-m", "bench._instructions", "--quick"]
    command += ["--contenders", "bare,gateway,bare"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr.decode()
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in done.stdout.decode().splitlines()[2:]
    ]
    by_load: dict[str, list[list[str]]] = {}
    for row in rows:
        by_load.setdefault(row[0], []).append(row)
    assert by_load.keys() == {"stream", "short"}
    expected_events = {"stream": 34, "short": 110}  # 30 deltas + 4; ten 11-event streams
    for load, (bare, gateway, bare_again) in by_load.items():
        assert [bare[1], gateway[1], bare_again[1]] == ["bare", "gateway", "bare"]
        for row in (bare, gateway, bare_again):
            assert row[6:] == [str(expected_events[load]), "0"], row
        loop = [int(row[2].replace(",", "")) for row in (bare, gateway, bare_again)]
        assert loop[0] > 0
        assert abs(loop[2] - loop[0]) <= 0.01 * loop[0], (load, loop)  # the same work again
        assert 1.0 < float(gateway[5]) < 2.0, gateway  # the gateway parses and rewrites
        assert float(bare_again[5]) == pytest.approx(1.0, abs=0.01)


def test_quick_run_writes_a_sane_result_file(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_GATEWAY_BENCH_")}
    env[B_SOURCE_ENV] = str(ROOT)  # gateway-b: this clone's code again, for a lever's A/B
    profiles = tmp_path / "profiles"
    command = [sys.executable, "-m", "bench", "trickle", "short", "cancel", "--quick", "--runs"]
    command += ["1", "--contenders", "direct,bare,gateway,gateway-b", "--out", str(out)]
    command += ["--profile", str(profiles)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(out.read_text())

    assert result["settings"] == {
        "runs": 1,
        "quick": True,
        "scenarios": ["trickle", "short", "cancel"],
    }
    assert result["contenders"]["litellm"] == "not selected (--contenders)"
    assert {"cpu", "cores", "memory_gib", "kernel", "python"} <= result["machine"].keys()
    trickle, cancel = result["scenarios"]["trickle"], result["scenarios"]["cancel"]
    assert trickle["failures"] == cancel["failures"] == []
    (run,) = trickle["runs"]
    assert run.keys() == {"direct", "bare", "gateway", "gateway-b"}
    for name, figures in run.items():
        assert figures["errors"] == 0, name
        assert figures["events"] == figures["events_expected"] > 0, name
        assert figures["mock_cpu_s"] > 0, name
    for name in ("bare", "gateway", "gateway-b"):
        assert run[name]["server_cpu_s"] > 0
        assert run[name]["cpu_us_per_event"] > 0
        assert run[name]["peak_rss_mib"] > 1
    assert run["direct"]["server_cpu_s"] is None  # no process in the middle
    assert trickle["ratio_to_bare"]["gateway"]["cpu_us_per_event"] > 0
    assert trickle["ratio_to_bare"]["gateway-b"]["cpu_us_per_event"] > 0
    for figures in cancel["runs"][0].values():
        assert figures["errors"] == figures["missed"] == 0
        assert 0 <= figures["close_p50_ms"] <= figures["close_p99_ms"] < 1000
    short = result["scenarios"]["short"]["runs"][0]
    assert short["gateway"]["errors"] == 0
    assert short["gateway"]["cpu_us_per_request"] > 0
    # --profile: the gateway ran under cProfile, one readable file per server it started.
    found = sorted(profiles.glob("gateway-*.prof"))
    assert found
    assert all(pstats.Stats(str(p)).total_calls > 0 for p in found)  # type: ignore[attr-defined]
    targets = {t["target"]: t["status"] for t in result["targets"]}
    assert len(targets) == 21
    assert set(targets.values()) <= {"met", "missed", "not measured"}
    assert targets["burst streams per second, gateway / bare"] == "not measured"


# --- chaos and soak -------------------------------------------------------------------------------

KINDS: tuple[StreamKind, ...] = ("chat", "messages", "responses")


def stream_answer(body: bytes) -> Answer:
    return Answer(status=200, content_type="text/event-stream", body=bytearray(body), ended="end")


def test_plans_are_a_function_of_the_seed() -> None:
    first = make_plans(7, 300, model=UPSTREAM_MODEL)
    assert first == make_plans(7, 300, model=UPSTREAM_MODEL)
    assert first != make_plans(8, 300, model=UPSTREAM_MODEL)
    assert {plan.fault for plan in first} >= {"none", "eof-chunked", "reset", "garbage-cut"}
    assert {(plan.kind, plan.streamed) for plan in first} == {
        (kind, streamed) for kind in KINDS for streamed in (True, False)
    }
    assert all(not plan.harmful for plan in first if plan.fault == "none")
    assert all(plan.harmful for plan in first if plan.fault == "before-head")


@pytest.mark.parametrize("kind", KINDS)
def test_the_layout_knows_where_the_answer_becomes_complete(kind: StreamKind) -> None:
    where = layout(kind, 5, UPSTREAM_MODEL, streamed=True)
    body = b"".join(render_stream(kind, Script(tokens=5), UPSTREAM_MODEL))
    assert where.size == len(body)
    # Cut there, the decoder's final event (terminated by the gateway) completes the answer;
    # one byte earlier, the end event's data is cut.
    whole = classify(kind, stream_answer(body[: where.complete_at] + b"\n\n"))
    cut = classify(kind, stream_answer(body[: where.complete_at - 1] + b"\n\n"))
    assert whole.outcome is Outcome.COMPLETE
    assert not whole.garbage
    assert cut.outcome is not Outcome.COMPLETE or cut.garbage
    assert classify(kind, stream_answer(body[: where.end_start])).outcome is Outcome.CUT


def test_verdicts_on_streams() -> None:
    finish = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'
    content = b'data: {"choices":[{"delta":{"content":"x"},"finish_reason":null}]}\n\n'
    error = b'data: {"error":{"code":502,"message":"m","type":"upstream_truncated"}}\n\n'
    assert classify("chat", stream_answer(content + finish + usage)).outcome is Outcome.COMPLETE
    assert (
        classify("chat", stream_answer(content + b"data: [DONE]\n\n")).outcome is Outcome.COMPLETE
    )
    assert classify("chat", stream_answer(finish + content)).outcome is Outcome.CUT
    finished = classify("chat", stream_answer(content + finish + b"da\n\n"))
    assert (finished.outcome, finished.fragment) == (Outcome.COMPLETE, True)
    assert classify("chat", stream_answer(content)).outcome is Outcome.CUT
    verdict = classify("chat", stream_answer(content + error))
    assert (verdict.outcome, verdict.error_code, verdict.after_error) == (
        Outcome.ERROR,
        "upstream_truncated",
        False,
    )
    assert classify("chat", stream_answer(error + content)).after_error
    garbage = classify("chat", stream_answer(b"data: }{ not json\n\n" + content + finish))
    assert (garbage.outcome, garbage.garbage) == (Outcome.COMPLETE, True)

    stop = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    anthropic_error = b'event: error\ndata: {"type":"error","error":{"type":"api_error"}}\n\n'
    assert classify("messages", stream_answer(stop)).outcome is Outcome.COMPLETE
    assert classify("messages", stream_answer(stop[:-2])).outcome is Outcome.CUT  # unterminated
    assert classify("messages", stream_answer(anthropic_error)).outcome is Outcome.ERROR
    bare_stop = classify("messages", stream_answer(b"event: message_stop\n\n"))
    assert (bare_stop.outcome, bare_stop.garbage) == (Outcome.CUT, True)  # no data: no event
    piece = classify("messages", stream_answer(b"eve\n\n" + anthropic_error))
    assert (piece.outcome, piece.garbage, piece.fragment) == (Outcome.ERROR, False, True)

    completed = b'event: response.completed\ndata: {"type":"response.completed"}\n\n'
    responses_error = (
        b'event: error\ndata: {"type":"error","sequence_number":3,'
        b'"error":{"type":"server_error","code":"upstream_invalid"}}\n\n'
    )
    assert classify("responses", stream_answer(completed)).outcome is Outcome.COMPLETE
    verdict = classify("responses", stream_answer(responses_error))
    assert (verdict.outcome, verdict.error_code) == (Outcome.ERROR, "upstream_invalid")


def test_verdicts_on_json_and_on_connections() -> None:
    body = render_json("chat", Script(), "m")
    ok = Answer(status=200, content_type="application/json", body=bytearray(body), ended="end")
    assert classify("chat", ok).outcome is Outcome.COMPLETE
    failed = Answer(
        status=502, body=bytearray(b'{"error":{"code":"upstream_invalid"}}'), ended="end"
    )
    assert classify("chat", failed).error_code == "upstream_invalid"
    assert classify("chat", failed).outcome is Outcome.ERROR
    half = Answer(status=200, body=bytearray(body[:20]), ended="closed")
    assert classify("chat", half).outcome is Outcome.CUT
    junk = Answer(status=200, body=bytearray(b"}{"), ended="end")
    assert (classify("chat", junk).outcome, classify("chat", junk).garbage) == (Outcome.CUT, True)
    assert classify("chat", Answer(ended="reset")).outcome is Outcome.CUT
    assert classify("chat", Answer(ended="left")).outcome is Outcome.LEFT
    assert classify("chat", Answer(ended="refused")).outcome is Outcome.REFUSED


def test_late_slope() -> None:
    flat = [{"requests": n * 1000.0, "rss_mib": 40.0 + min(n, 5)} for n in range(12)]
    growing = [{"requests": n * 1000.0, "rss_mib": 40.0 + n / 2} for n in range(12)]
    assert late_slope(flat) == 0
    assert late_slope(growing) == pytest.approx(0.5)
    assert late_slope(flat[:1]) is None


def test_chaos_and_soak_smoke(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_GATEWAY_BENCH_")}
    command = [sys.executable, "-m", "bench", "chaos", "chaos-sigterm", "soak", "--quick"]
    command += ["--requests", "60", "--seed", "5", "--contenders", "gateway", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(out.read_text())
    assert result["settings"]["seed"] == 5
    scenarios = result["scenarios"]
    for name in ("chaos", "chaos-sigterm", "soak"):
        data = scenarios[name]
        assert data["failures"] == [], name
        assert data["params"]["seed"] == 5
        (run,) = data["runs"]
        figures = run["gateway"]
        assert figures["requests"] == 60
        outcomes = ("complete", "error", "cut", "left", "refused")
        assert sum(figures[o] for o in outcomes) == 60, name
        assert figures["complete"] + figures["error"] > 0, name
        (details,) = data["details"]
        assert details["gateway"]["seed"] == 5
    chaos = scenarios["chaos"]["runs"][0]["gateway"]
    assert chaos["records"] > 0
    assert {"upstream_busy_end", "upstream_open_after_exit", "model_leaks"} <= chaos.keys()
    breakdown = scenarios["chaos"]["details"][0]["gateway"]["breakdown"]
    assert sum(row["requests"] for key, row in breakdown.items() if key.startswith("fault ")) == 60
    sigterm = scenarios["chaos-sigterm"]["runs"][0]["gateway"]
    assert sigterm["inflight_at_sigterm"] > 0
    soak = scenarios["soak"]["details"][0]["gateway"]["samples"]
    assert len(soak) >= 3
    assert soak[0]["requests"] == 0
    assert soak[-1]["requests"] == 60
    assert all(sample["rss_mib"] > 1 and sample["fds"] > 0 for sample in soak)
    assert "#### soak: the series" in done.stdout.decode()
    statuses = {t["target"]: t["status"] for t in result["targets"]}
    assert statuses["burst streams per second, gateway / bare"] == "not measured"
    assert statuses["chaos: cut or corrupted answers passed as complete"] in {"met", "missed"}


def test_micro_prints_every_piece(capsys: pytest.CaptureFixture[str]) -> None:
    assert micro(["--number", "50", "--repeat", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    pieces = {row.split(" | ")[0][2:]: float(row.split(" | ")[1].rstrip(" |")) for row in rows}
    assert len(pieces) == 15
    assert "request: the watchdog task (spawn, sleep, cancel)" in pieces
    assert all(value > 0 for name, value in pieces.items() if "hand-over" not in name)
