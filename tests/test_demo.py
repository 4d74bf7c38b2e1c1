"""`trio-gateway demo`: the README's first command, end to end on loopback."""

from __future__ import annotations

import io
import signal
import subprocess
import sys

import trio

from trio_gateway._demo import DEMO_MODEL, run_demo
from trio_gateway.testing.mock_upstream import Script, expected_text


async def test_demo_streams_a_rewritten_answer():
    out = io.StringIO()
    with trio.fail_after(20):
        await run_demo("127.0.0.1:0", once=True, out=out)
    text = out.getvalue()
    assert expected_text(Script(tokens=24)) in text
    assert f"model as the client saw it: {DEMO_MODEL}" in text
    assert '"completion_tokens":24' in text
    usage_line = next(line for line in text.splitlines() if line.startswith("usage"))
    usage = usage_line.split(": ", 1)[1]
    assert '"prompt_tokens":42' in usage
    assert "cost" not in usage
    assert "is_byok" not in usage


def test_demo_command_runs_and_exits_with_once():
    result = subprocess.run(
        [sys.executable, "-m", "trio_gateway", "demo", "--bind", "127.0.0.1:0", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"model as the client saw it: {DEMO_MODEL}" in result.stdout


def test_demo_refuses_a_bad_bind():
    result = subprocess.run(
        [sys.executable, "-m", "trio_gateway", "demo", "--bind", "nonsense"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "server.bind" in result.stderr


def test_demo_serves_until_sigterm_then_exits_cleanly():
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_gateway", "demo", "--bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:  # the sample stream, then the snippets
            lines.append(line)
            if "from anthropic import Anthropic" in line:
                break
        assert any(f"model as the client saw it: {DEMO_MODEL}" in line for line in lines)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
