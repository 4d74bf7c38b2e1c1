"""The benchmark suite (bench/) runs, and its result file holds what docs/benchmarks.md reads.

The smoke run is real time: two scenarios at ``--quick`` scale, three
contenders, one run, in a subprocess bounded by its own timeout. It checks
the structure and that the numbers are sane, never how fast anything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench._report import summarize, within_runs

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


def test_quick_run_writes_a_sane_result_file(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_GATEWAY_BENCH_")}
    command = [sys.executable, "-m", "bench", "trickle", "cancel", "--quick", "--runs", "1"]
    command += ["--contenders", "direct,bare,gateway", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(out.read_text())

    assert result["settings"] == {"runs": 1, "quick": True, "scenarios": ["trickle", "cancel"]}
    assert result["contenders"]["litellm"] == "not selected (--contenders)"
    assert {"cpu", "cores", "memory_gib", "kernel", "python"} <= result["machine"].keys()
    trickle, cancel = result["scenarios"]["trickle"], result["scenarios"]["cancel"]
    assert trickle["failures"] == cancel["failures"] == []
    (run,) = trickle["runs"]
    assert run.keys() == {"direct", "bare", "gateway"}
    for name, figures in run.items():
        assert figures["errors"] == 0, name
        assert figures["events"] == figures["events_expected"] > 0, name
        assert figures["mock_cpu_s"] > 0, name
    for name in ("bare", "gateway"):
        assert run[name]["server_cpu_s"] > 0
        assert run[name]["cpu_us_per_event"] > 0
        assert run[name]["peak_rss_mib"] > 1
    assert run["direct"]["server_cpu_s"] is None  # no process in the middle
    assert trickle["ratio_to_bare"]["gateway"]["cpu_us_per_event"] > 0
    for figures in cancel["runs"][0].values():
        assert figures["errors"] == figures["missed"] == 0
        assert 0 <= figures["close_p50_ms"] <= figures["close_p99_ms"] < 1000
    targets = {t["target"]: t["status"] for t in result["targets"]}
    assert len(targets) == 7
    assert set(targets.values()) <= {"met", "missed", "not measured"}
    assert targets["burst streams per second, gateway / bare"] == "not measured"
