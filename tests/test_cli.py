"""The command line: --version, help, hash-key, and serve's config errors."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import pytest

from trio_gateway import __version__
from trio_gateway._cli import main

SECRET = "sk-or-v1-cli-test-secret"


def test_version(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == f"trio-gateway {__version__}"


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: trio-gateway")
    for command in ("serve", "demo", "hash-key"):
        assert command in out


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "stdin", ["secret\n", "secret\r\n", "secret", "secret\nsecond line\n", "  secret \t\n"]
)
def test_hash_key_reads_stdin(
    stdin: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["hash-key"]) == 0
    captured = capsys.readouterr()
    assert captured.out == hashlib.sha256(b"secret").hexdigest() + "\n"
    assert "secret" not in captured.out + captured.err


@pytest.mark.parametrize("stdin", ["", "\n", "\r\n", "   \n"])
def test_hash_key_empty_stdin_exits_2(
    stdin: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["hash-key"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no key" in captured.err


def _one_line_config_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trio-gateway: config error: ")
    return lines[0]


def test_serve_missing_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--config", "missing.toml"]) == 2
    captured = capsys.readouterr()
    line = _one_line_config_error(captured.err)
    assert "missing.toml" in line
    assert captured.out == ""


def test_serve_config_without_its_env_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.delenv("TRIO_GATEWAY_TEST_KEY", raising=False)
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[upstreams.u]\nbase_url = "https://u.invalid"\napi_key_env = "TRIO_GATEWAY_TEST_KEY"\n'
        "[auth]\nallow_anonymous = true\n",
        encoding="utf-8",
    )
    assert main(["serve", "--config", str(path)]) == 2
    line = _one_line_config_error(capsys.readouterr().err)
    assert "TRIO_GATEWAY_TEST_KEY" in line


def test_serve_bad_bind_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("TRIO_GATEWAY_TEST_KEY", SECRET)
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[upstreams.u]\nbase_url = "https://u.invalid"\napi_key_env = "TRIO_GATEWAY_TEST_KEY"\n'
        "[auth]\nallow_anonymous = true\n",
        encoding="utf-8",
    )
    assert main(["serve", "--config", str(path), "--bind", "nowhere"]) == 2
    err = capsys.readouterr().err
    line = _one_line_config_error(err)
    assert "'nowhere'" in line
    assert SECRET not in err


def test_serve_needs_config(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as info:
        main(["serve"])
    assert info.value.code == 2
    assert "--config" in capsys.readouterr().err
