"""Configuration: parse_config's checks, load_config's file handling, and secrecy."""

from __future__ import annotations

import copy
import hashlib
import hmac
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from trio_gateway._core.config import (
    ConfigError,
    GatewayConfig,
    KeyEntry,
    ModelRoute,
    RedisTarget,
    Timeouts,
    Upstream,
    hash_key,
    load_config,
    parse_config,
    split_redis_url,
)

SECRET = "sk-or-v1-0123456789abcdef-very-secret"
ENV = {"OPENROUTER_API_KEY": SECRET}
ALICE = hash_key("alice-key")

EXAMPLE_TOML = f"""
[server]
bind = "0.0.0.0:8080"

[timeouts]
connect = 10
first_byte = 120
idle = 300
keepalive = 15

[upstreams.openrouter]
base_url = "https://openrouter.ai/api/v1/"
api_key_env = "OPENROUTER_API_KEY"
auth = "bearer"

[models."kilo/free-model"]
upstream = "openrouter"
upstream_model = "vendor/model:free"
free = true

[models."kilo/paid-model"]
upstream = "openrouter"
upstream_model = "vendor/model"

[[keys]]
name = "alice"
sha256 = "{ALICE}"

[[keys]]
name = "bob"
sha256 = "{hash_key("bob-key").upper()}"
"""


def example() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE_TOML)


def error_of(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, ENV if env is None else env)
    message = str(info.value)
    assert SECRET not in message
    assert "\n" not in message
    return message


def test_full_example_parses():
    config = parse_config(example(), ENV)
    assert config.bind == "0.0.0.0:8080"
    assert config.timeouts == Timeouts(connect=10.0, first_byte=120.0, idle=300.0, keepalive=15.0)
    assert isinstance(config.timeouts.connect, float)
    assert config.upstreams == {
        "openrouter": Upstream("openrouter", "https://openrouter.ai/api/v1", SECRET, "bearer")
    }
    assert config.models == {
        "kilo/free-model": ModelRoute(
            "kilo/free-model", "openrouter", "vendor/model:free", free=True
        ),
        "kilo/paid-model": ModelRoute("kilo/paid-model", "openrouter", "vendor/model", free=False),
    }
    assert config.keys == (
        KeyEntry("alice", ALICE),
        KeyEntry("bob", hash_key("bob-key")),  # stored lower-case
    )
    assert config.allow_anonymous is False
    assert config.find_key("alice-key") == config.keys[0]
    assert config.find_key("bob-key") == config.keys[1]
    assert config.find_key("eve-key") is None
    assert config.find_key("") is None


def test_defaults():
    data = example()
    del data["server"]
    del data["timeouts"]
    config = parse_config(data, ENV)
    assert config.bind == "127.0.0.1:8080"
    assert config.timeouts == Timeouts()
    assert config.max_body_bytes == 32 * 1024 * 1024


def test_x_api_key_auth_and_float_timeouts():
    data = example()
    data["upstreams"]["openrouter"]["auth"] = "x-api-key"
    data["timeouts"]["idle"] = 2.5
    config = parse_config(data, ENV)
    assert config.upstreams["openrouter"].auth == "x-api-key"
    assert config.timeouts.idle == 2.5


@pytest.mark.parametrize("key", ["idle", "keepalive", "client_stall"])
def test_zero_turns_an_optional_timeout_off(key: str):
    data = example()
    data["timeouts"][key] = 0
    assert getattr(parse_config(data, ENV).timeouts, key) == math.inf


@pytest.mark.parametrize("key", ["connect", "first_byte", "shutdown"])
def test_zero_is_refused_for_a_required_timeout(key: str):
    data = example()
    data["timeouts"][key] = 0
    message = error_of(data)
    assert message.startswith(f"timeouts.{key}:")
    assert "positive" in message


def test_allow_anonymous_without_keys():
    data = example()
    del data["keys"]
    data["auth"] = {"allow_anonymous": True}
    config = parse_config(data, ENV)
    assert config.allow_anonymous is True
    assert config.keys == ()


def test_repr_never_shows_the_upstream_key_or_hashes():
    config = parse_config(example(), ENV)
    for text in (repr(config), str(config), repr(config.upstreams), repr(config.keys)):
        assert SECRET not in text
        assert ALICE not in text
    assert "openrouter" in repr(config)


def test_hash_key_matches_hashlib():
    for key in ("secret", "sk-ünïcode-ключ", ""):
        assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()


def test_find_key_returns_the_matching_entry():
    config = GatewayConfig(
        upstreams={"u": Upstream("u", "https://u.invalid", SECRET)},
        models={},
        keys=(KeyEntry("first", hash_key("k1")), KeyEntry("second", hash_key("k2"))),
    )
    assert config.find_key("k1") == config.keys[0]
    assert config.find_key("k2") == config.keys[1]
    assert config.find_key("k3") is None
    assert config.find_key(hash_key("k1")) is None  # the hash itself is not a key


# --- one test per validation error ---------------------------------------------------------


def test_unknown_top_level_key():
    data = example()
    data["serverr"] = {"bind": "x"}
    assert error_of(data) == "serverr: unknown key"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("server",), "server.bnid: unknown key"),
        (("timeouts",), "timeouts.bnid: unknown key"),
        (("upstreams", "openrouter"), "upstreams.openrouter.bnid: unknown key"),
        (("models", "kilo/free-model"), 'models."kilo/free-model".bnid: unknown key'),
    ],
)
def test_unknown_key_in_a_table(path: tuple[str, ...], expected: str):
    data = example()
    table = data
    for part in path:
        table = table[part]
    table["bnid"] = 1
    assert error_of(data) == expected


def test_unknown_key_in_keys_and_auth():
    data = example()
    data["keys"][1]["sha"] = "x"
    assert error_of(data) == "keys[1].sha: unknown key"
    data = example()
    data["auth"] = {"allow_anonymus": True}
    assert error_of(data) == "auth.allow_anonymus: unknown key"


@pytest.mark.parametrize(
    ("table", "key", "value", "label"),
    [
        ("timeouts", "connect", "10", "a number of seconds"),
        ("timeouts", "idle", True, "a number of seconds"),
        ("timeouts", "keepalive", False, "a number of seconds"),
        ("timeouts", "first_byte", [1], "a number of seconds"),
        ("server", "bind", 8080, "a string"),
        ("server", "max_body_bytes", 1.5, "a whole number of bytes"),
        ("server", "max_body_bytes", True, "a whole number of bytes"),
        ("auth", "allow_anonymous", "yes", "true or false"),
    ],
)
def test_wrong_type(table: str, key: str, value: Any, label: str):
    data = example()
    data.setdefault(table, {})[key] = value
    message = error_of(data)
    assert message.startswith(f"{table}.{key}: expected {label}")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("upstreams", "openrouter", "base_url"), 5),
        (("upstreams", "openrouter", "api_key_env"), 5),
        (("models", "kilo/free-model", "upstream_model"), 5),
        (("models", "kilo/free-model", "free"), "true"),
    ],
)
def test_wrong_type_in_nested_tables(path: tuple[str, ...], value: Any):
    data = example()
    table = data
    for part in path[:-1]:
        table = table[part]
    table[path[-1]] = value
    message = error_of(data)
    name = ".".join(f'"{p}"' if "/" in p else p for p in path)
    assert message.startswith(f"{name}: expected")


def test_wrong_type_in_keys():
    data = example()
    data["keys"][0]["name"] = 7
    assert error_of(data).startswith("keys[0].name: expected a string")


@pytest.mark.parametrize("value", [-1, -0.5, math.inf, math.nan])
def test_negative_or_infinite_timeout(value: float):
    data = example()
    data["timeouts"]["connect"] = value
    message = error_of(data)
    assert message.startswith("timeouts.connect: expected a positive number")


def test_negative_optional_timeout_mentions_zero():
    data = example()
    data["timeouts"]["keepalive"] = -1
    message = error_of(data)
    assert message.startswith("timeouts.keepalive:")
    assert "0 turns it off" in message


def test_non_positive_size():
    data = example()
    data["server"]["max_body_bytes"] = 0
    assert error_of(data).startswith("server.max_body_bytes: must be at least 1")


@pytest.mark.parametrize("env", [{}, {"OPENROUTER_API_KEY": ""}, {"OTHER": SECRET}])
def test_missing_api_key_env_variable(env: dict[str, str]):
    message = error_of(example(), env)
    assert message.startswith("upstreams.openrouter.api_key_env:")
    assert "OPENROUTER_API_KEY" in message


@pytest.mark.parametrize("value", ["sk-or-v1-0123456789abcdef", "MY KEY", "1ABC"])
def test_api_key_env_must_name_a_variable_and_is_never_echoed(value: str):
    data = example()
    data["upstreams"]["openrouter"]["api_key_env"] = value
    message = error_of(data)
    assert message == "upstreams.openrouter.api_key_env: expected an environment variable name"
    assert value not in message


def test_missing_api_key_env_setting():
    data = example()
    del data["upstreams"]["openrouter"]["api_key_env"]
    assert error_of(data) == "upstreams.openrouter.api_key_env: required"


def test_api_key_in_the_file_is_refused():
    data = example()
    data["upstreams"]["openrouter"]["api_key"] = SECRET
    message = error_of(data)
    assert message.startswith("upstreams.openrouter.api_key:")
    assert "api_key_env" in message


def test_api_key_instead_of_api_key_env_names_api_key():
    data = example()
    upstream = data["upstreams"]["openrouter"]
    del upstream["api_key_env"]
    upstream["api_key"] = SECRET
    message = error_of(data)
    assert message.startswith("upstreams.openrouter.api_key:")


@pytest.mark.parametrize("auth", ["Bearer", "basic", "x-api-key ", ""])
def test_bad_auth_value(auth: str):
    data = example()
    data["upstreams"]["openrouter"]["auth"] = auth
    assert error_of(data).startswith("upstreams.openrouter.auth:")


@pytest.mark.parametrize("url", ["openrouter.ai/api", "ftp://x.invalid", "https://", "http:// x"])
def test_bad_base_url(url: str):
    data = example()
    data["upstreams"]["openrouter"]["base_url"] = url
    assert error_of(data).startswith("upstreams.openrouter.base_url:")


def test_model_pointing_at_an_unknown_upstream():
    data = example()
    data["models"]["kilo/free-model"]["upstream"] = "openrouterr"
    message = error_of(data)
    assert message.startswith('models."kilo/free-model".upstream:')
    assert "openrouterr" in message


def test_model_without_upstream_model():
    data = example()
    del data["models"]["kilo/free-model"]["upstream_model"]
    assert error_of(data) == 'models."kilo/free-model".upstream_model: required'


@pytest.mark.parametrize(
    "digest",
    ["abc", ALICE[:-1], ALICE + "0", "g" * 64, ALICE[:32] + " " + ALICE[33:], ""],
)
def test_bad_sha256(digest: str):
    data = example()
    data["keys"][0]["sha256"] = digest
    assert error_of(data).startswith("keys[0].sha256:")


def test_keys_must_be_an_array_of_tables():
    data = example()
    data["keys"] = {"name": "alice", "sha256": ALICE}
    assert error_of(data).startswith("keys:")
    data["keys"] = ["alice"]
    assert error_of(data).startswith("keys[0]: expected a table")


@pytest.mark.parametrize("anonymous", [None, False])
def test_no_keys_without_allow_anonymous(anonymous: bool | None):
    data = example()
    del data["keys"]
    if anonymous is not None:
        data["auth"] = {"allow_anonymous": anonymous}
    message = error_of(data)
    assert message.startswith("keys:")
    assert "allow_anonymous" in message


@pytest.mark.parametrize(
    "bind", ["8080", "localhost", "localhost:", ":8080", "host:70000", "a b:80", "::1:80"]
)
def test_bad_bind(bind: str):
    data = example()
    data["server"]["bind"] = bind
    message = error_of(data)
    assert message.startswith("server.bind:")
    assert repr(bind) in message


@pytest.mark.parametrize("bind", ["127.0.0.1:0", "[::1]:8080", "localhost:65535"])
def test_good_bind(bind: str):
    data = example()
    data["server"]["bind"] = bind
    assert parse_config(data, ENV).bind == bind


@pytest.mark.parametrize("table", ["server", "timeouts", "upstreams", "models", "auth"])
def test_table_that_is_not_a_table(table: str):
    data = example()
    data[table] = 5
    assert error_of(data) == f"{table}: expected a table"


def test_parse_config_does_not_modify_its_input():
    data = example()
    before = copy.deepcopy(data)
    parse_config(data, ENV)
    assert data == before


def test_parse_config_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", "from-the-environment")
    config = parse_config(example())
    assert config.upstreams["openrouter"].api_key == "from-the-environment"


# --- load_config -----------------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path):
    path = tmp_path / "gateway.toml"
    path.write_text(EXAMPLE_TOML, encoding="utf-8")
    assert load_config(path, ENV) == parse_config(example(), ENV, base_dir=tmp_path)
    assert load_config(str(path), ENV).bind == "0.0.0.0:8080"
    assert load_config(path, ENV).database == str(tmp_path / "usage.db")


def test_load_config_not_toml(tmp_path: Path):
    path = tmp_path / "gateway.toml"
    path.write_text("[server\nbind = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV)
    assert str(info.value).startswith(f"{path}: not valid TOML")


def test_load_config_missing_file(tmp_path: Path):
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_load_config_directory(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, ENV)


def test_load_config_not_utf8(tmp_path: Path):
    path = tmp_path / "gateway.toml"
    path.write_bytes(b'[server]\nbind = "\xff:80"\n')
    with pytest.raises(ConfigError):
        load_config(path, ENV)


def test_load_config_error_never_shows_the_key(tmp_path: Path):
    path = tmp_path / "gateway.toml"
    path.write_text(EXAMPLE_TOML.replace('auth = "bearer"', 'auth = "nope"'), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV)
    assert SECRET not in str(info.value)
    assert str(info.value).startswith("upstreams.openrouter.auth:")


def test_timeouts_built_in_code_treat_zero_as_off_for_optional_ones_only():
    timeouts = Timeouts(idle=0, keepalive=0, client_stall=0)
    assert (timeouts.idle, timeouts.keepalive, timeouts.client_stall) == (math.inf,) * 3
    with pytest.raises(ConfigError, match=r"timeouts\.connect"):
        Timeouts(connect=0)
    with pytest.raises(ConfigError, match=r"timeouts\.idle"):
        Timeouts(idle=-1)


def test_accounting_and_log_paths_are_taken_beside_the_config(tmp_path: Path):
    data = example()
    data["accounting"] = {"database": "data/usage.db"}
    data["log"] = {"level": "WARNING", "destination": "requests.log"}
    config = parse_config(data, ENV, base_dir=tmp_path)
    assert config.database == str(tmp_path / "data" / "usage.db")
    assert config.log_level == "warning"
    assert config.log_destination == str(tmp_path / "requests.log")
    memory = parse_config({**example(), "accounting": {"database": ":memory:"}}, ENV)
    assert memory.database == ":memory:"
    assert memory.log_destination == "-"


def test_bad_log_level_is_named():
    data = {**example(), "log": {"level": "loud"}}
    assert error_of(data).startswith("log.level: expected one of")


def test_key_limits_and_allowlist_parse():
    data = example()
    data["keys"][0].update(models=["kilo/free-model"], rpm=60, tpm=100_000)
    config = parse_config(data, ENV)
    alice, bob = config.keys
    assert alice.models == frozenset({"kilo/free-model"})
    assert (alice.rpm, alice.tpm) == (60, 100_000)
    assert alice.allows("kilo/free-model")
    assert not alice.allows("kilo/paid-model")
    assert (bob.models, bob.rpm, bob.tpm) == (None, None, None)
    assert bob.allows("kilo/paid-model")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("rpm", 0, "keys[0].rpm: must be at least 1, got 0"),
        ("tpm", -5, "keys[0].tpm: must be at least 1, got -5"),
        ("rpm", 1.5, "keys[0].rpm: expected a whole number, got 1.5"),
        ("rpm", True, "keys[0].rpm: expected a whole number, got True"),
        ("models", "kilo/free-model", "keys[0].models: expected a list of names"),
        ("models", ["kilo/free-model", 3], "keys[0].models: expected a list of non-empty strings"),
        ("models", [""], "keys[0].models: expected a list of non-empty strings"),
        ("models", ["kilo/typo"], "keys[0].models: no model named 'kilo/typo'"),
    ],
)
def test_bad_key_limits_are_named(field: str, value: Any, expected: str):
    data = example()
    data["keys"][0][field] = value
    assert error_of(data).startswith(expected)


@pytest.mark.parametrize("field", ["name", "sha256"])
def test_repeated_key_name_or_hash_is_refused(field: str):
    data = example()
    data["keys"][1][field] = data["keys"][0][field]
    assert error_of(data) == f"keys[1].{field}: the same as keys[0]"


def test_find_key_compares_against_every_entry_in_constant_time(monkeypatch: pytest.MonkeyPatch):
    """No early exit and no ``==``: every digest goes through hmac.compare_digest."""
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    config = GatewayConfig(
        upstreams={},
        models={},
        keys=tuple(KeyEntry(f"k{i}", hash_key(f"key-{i}")) for i in range(5)),
    )
    assert config.find_key("key-0") == config.keys[0]
    assert len(compared) == 5, "kept comparing after the match"
    compared.clear()
    assert config.find_key("nobody") is None
    assert [b for _, b in compared] == [key.sha256 for key in config.keys]
    assert all(a == hash_key("nobody") for a, _ in compared), "only digests are compared"


def test_client_headers_and_request_body_defaults():
    config = parse_config(example(), ENV)  # the example's [timeouts] names neither
    assert (config.timeouts.client_headers, config.timeouts.request_body) == (10.0, 60.0)
    assert (Timeouts().client_headers, Timeouts().request_body) == (10.0, 60.0)


def test_client_headers_and_request_body_parse():
    data = example()
    data["timeouts"].update(client_headers=0.5, request_body=30)
    timeouts = parse_config(data, ENV).timeouts
    assert (timeouts.client_headers, timeouts.request_body) == (0.5, 30.0)


def test_request_body_zero_turns_it_off_and_client_headers_zero_is_refused():
    data = example()
    data["timeouts"]["request_body"] = 0
    assert parse_config(data, ENV).timeouts.request_body == math.inf
    data["timeouts"]["client_headers"] = 0
    assert error_of(data) == "timeouts.client_headers: expected a positive number, got 0"
    assert Timeouts(request_body=0).request_body == math.inf
    with pytest.raises(ConfigError, match=r"^timeouts\.client_headers: expected a positive"):
        Timeouts(client_headers=0)


@pytest.mark.parametrize("value", [-1, math.inf, math.nan, True, "10"])
def test_bad_client_headers_or_request_body_is_named(value: Any):
    for key in ("client_headers", "request_body"):
        data = example()
        data["timeouts"][key] = value
        message = error_of(data)
        assert message.startswith(f"timeouts.{key}: expected a")
        numeric = not isinstance(value, bool | str)
        assert ("0 turns it off" in message) == (key == "request_body" and numeric)


# --- [limits]: rate limits shared through Redis ----------------------------------------------

REDIS_PASSWORD = "hunter2-redis-password"


def with_limits(**limits: Any) -> dict[str, Any]:
    data = example()
    data["limits"] = limits
    return data


def test_limits_defaults_keep_the_limits_in_memory():
    config = parse_config(example(), ENV)
    assert config.redis_url is None
    assert config.redis_timeout == 0.05
    assert config.on_redis_error == "fail_open"
    assert config.redis_prefix == "trio-gateway:"


def test_limits_parse():
    url = f"rediss://gateway:{REDIS_PASSWORD}@redis.internal:6380/2"
    config = parse_config(
        with_limits(
            redis_url=url,
            redis_timeout=0.2,
            on_redis_error="fail_closed",
            redis_prefix="eu-1:",
        ),
        ENV,
    )
    assert config.redis_url == url
    assert config.redis_timeout == 0.2
    assert config.on_redis_error == "fail_closed"
    assert config.redis_prefix == "eu-1:"
    assert parse_config(with_limits(redis_timeout=1), ENV).redis_timeout == 1.0


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://127.0.0.1", RedisTarget("127.0.0.1")),
        ("redis://localhost:6379/0", RedisTarget("localhost")),
        ("redis://[::1]:7000/", RedisTarget("::1", 7000)),
        ("rediss://h:6380/15", RedisTarget("h", 6380, 15, tls=True)),
        ("redis://:p%40ss@h", RedisTarget("h", password="p@ss")),
        ("redis://me:secret@h/3", RedisTarget("h", db=3, username="me", password="secret")),
    ],
)
def test_redis_url_forms(url: str, target: RedisTarget):
    assert split_redis_url(url) == target


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (
            {"redis_url": "http://127.0.0.1:6379"},
            "limits.redis_url: expected redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] or rediss://...",
        ),
        ({"redis_url": "redis://"}, "limits.redis_url: expected redis://"),
        ({"redis_url": "redis://h:99999"}, "limits.redis_url: expected redis://"),
        ({"redis_url": "redis://h:0"}, "limits.redis_url: expected redis://"),
        ({"redis_url": "redis://h:port"}, "limits.redis_url: expected redis://"),
        ({"redis_url": "redis://h/0?ssl=true"}, "limits.redis_url: expected redis://"),
        ({"redis_url": "redis://h /0"}, "limits.redis_url: expected redis://"),
        ({"redis_url": "127.0.0.1:6379"}, "limits.redis_url: expected redis://"),
        (
            {"redis_url": "redis://h/zero"},
            "limits.redis_url: the database must be a number, as in redis://HOST/0",
        ),
        (
            {"redis_url": "redis://admin@h"},
            "limits.redis_url: a user name needs a password, as in USER:PASSWORD@",
        ),
        ({"redis_url": ""}, "limits.redis_url: must not be empty"),
        ({"redis_url": 6379}, "limits.redis_url: expected a string, got 6379"),
        ({"redis_timeout": 0}, "limits.redis_timeout: expected a positive number, got 0"),
        ({"redis_timeout": -1}, "limits.redis_timeout: expected a positive number, got -1"),
        ({"redis_timeout": math.inf}, "limits.redis_timeout: expected a positive number, got inf"),
        (
            {"redis_timeout": "50ms"},
            "limits.redis_timeout: expected a number of seconds, got '50ms'",
        ),
        (
            {"on_redis_error": "open"},
            'limits.on_redis_error: expected "fail_open" or "fail_closed"',
        ),
        ({"on_redis_error": True}, "limits.on_redis_error: expected a string, got True"),
        ({"redis_prefix": ""}, "limits.redis_prefix: must not be empty"),
        ({"redis_host": "h"}, "limits.redis_host: unknown key"),
    ],
)
def test_bad_limits_are_named(limits: dict[str, Any], expected: str):
    assert error_of(with_limits(**limits)).startswith(expected)


def test_limits_that_is_not_a_table():
    data = example()
    data["limits"] = "redis://127.0.0.1"
    assert error_of(data) == "limits: expected a table"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{REDIS_PASSWORD}@h:99999",
        f"redis://u:{REDIS_PASSWORD}@h/db",
        f"http://u:{REDIS_PASSWORD}@h",
        f"redis://u:{REDIS_PASSWORD}@h/0#frag",
    ],
)
def test_redis_url_errors_never_show_the_url_or_its_password(url: str):
    message = error_of(with_limits(redis_url=url))
    assert message.startswith("limits.redis_url: ")
    assert REDIS_PASSWORD not in message
    assert url not in message


def test_repr_never_shows_the_redis_url_or_its_password():
    url = f"redis://gateway:{REDIS_PASSWORD}@redis.internal:6379/0"
    config = parse_config(with_limits(redis_url=url), ENV)
    target = split_redis_url(url)
    assert target.password == REDIS_PASSWORD
    for text in (repr(config), str(config), repr(target), str(target)):
        assert REDIS_PASSWORD not in text
        assert url not in text


def test_limits_built_in_code_are_checked_too():
    base = parse_config(example(), ENV)
    with pytest.raises(ConfigError, match=r"^limits\.redis_url: expected redis://"):
        GatewayConfig(base.upstreams, base.models, base.keys, redis_url="redis//nowhere")
    with pytest.raises(ConfigError, match=r"^limits\.redis_timeout: expected a positive number"):
        GatewayConfig(base.upstreams, base.models, base.keys, redis_timeout=0)


# --- [accounting]: PostgreSQL, spill files, retries -------------------------------------------

DATABASE_PASSWORD = "pg-pass-0123456789"


def with_accounting(**accounting: Any) -> dict[str, Any]:
    data = example()
    data["accounting"] = accounting
    return data


def test_accounting_defaults_spill_beside_the_database_and_retry_every_30_s(tmp_path: Path):
    config = parse_config(example(), ENV, base_dir=tmp_path)
    assert config.database == str(tmp_path / "usage.db")
    assert (config.database_schema, config.spill_dir, config.retry_interval) == (None, None, 30.0)


def test_a_postgres_url_is_kept_and_its_spill_files_go_beside_the_config(tmp_path: Path):
    url = f"postgresql://gateway:{DATABASE_PASSWORD}@db.internal:5432/usage?sslmode=require"
    config = parse_config(with_accounting(database=url, schema="eu_1"), ENV, base_dir=tmp_path)
    assert config.database == url
    assert config.database_schema == "eu_1"
    assert config.spill_dir == str(tmp_path)
    short = parse_config(with_accounting(database="postgres://db/usage"), ENV, base_dir=tmp_path)
    assert (short.database, short.database_schema) == ("postgres://db/usage", None)


def test_spill_dir_and_retry_interval_parse(tmp_path: Path):
    config = parse_config(
        with_accounting(database="postgresql://db/usage", spill_dir="spill", retry_interval=5),
        ENV,
        base_dir=tmp_path,
    )
    assert (config.spill_dir, config.retry_interval) == (str(tmp_path / "spill"), 5.0)
    sqlite = parse_config(with_accounting(spill_dir="/var/spool/gw"), ENV, base_dir=tmp_path)
    assert (sqlite.database, sqlite.spill_dir) == (str(tmp_path / "usage.db"), "/var/spool/gw")


@pytest.mark.parametrize(
    ("accounting", "expected"),
    [
        (
            {"database": "postgresql://db:port/usage"},
            "accounting.database: expected postgresql://[USER[:PASSWORD]@][HOST][:PORT][/DBNAME]"
            "[?PARAMS]",
        ),
        (
            {"database": "postgresql://db:99999/usage"},
            "accounting.database: expected postgresql://",
        ),
        ({"database": "postgresql://db/us age"}, "accounting.database: expected postgresql://"),
        ({"database": "postgresql://db/usage#x"}, "accounting.database: expected postgresql://"),
        ({"database": ""}, "accounting.database: must not be empty"),
        (
            {"schema": "eu"},
            'accounting.schema: only for a PostgreSQL database ("postgresql://...")',
        ),
        (
            {"database": "postgresql://db/usage", "schema": "1eu"},
            "accounting.schema: expected letters, digits and _ (at most 63, not a digit first)",
        ),
        (
            {"database": "postgresql://db/usage", "schema": "eu-1"},
            "accounting.schema: expected letters, digits and _",
        ),
        (
            {"database": "postgresql://db/usage", "schema": ""},
            "accounting.schema: must not be empty",
        ),
        (
            {"database": ":memory:", "spill_dir": "spill"},
            "accounting.spill_dir: a database in memory has no spill files",
        ),
        ({"spill_dir": 3}, "accounting.spill_dir: expected a string, got 3"),
        ({"retry_interval": 0}, "accounting.retry_interval: expected a positive number, got 0"),
        ({"retry_interval": "30s"}, "accounting.retry_interval: expected a number of seconds"),
        ({"url": "postgresql://db"}, "accounting.url: unknown key"),
    ],
)
def test_bad_accounting_is_named(accounting: dict[str, Any], expected: str):
    assert error_of(with_accounting(**accounting)).startswith(expected)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://gateway:{DATABASE_PASSWORD}@db:port/usage",
        f"postgresql://gateway:{DATABASE_PASSWORD}@db/usage#fragment",
        f"postgres://gateway:{DATABASE_PASSWORD}@db:70000/usage",
    ],
)
def test_database_url_errors_never_show_the_url_or_its_password(url: str):
    message = error_of(with_accounting(database=url))
    assert message.startswith("accounting.database: ")
    assert DATABASE_PASSWORD not in message


def test_repr_never_shows_the_database_url_or_its_password():
    url = f"postgresql://gateway:{DATABASE_PASSWORD}@db.internal/usage"
    config = parse_config(with_accounting(database=url), ENV)
    for text in (repr(config), str(config)):
        assert DATABASE_PASSWORD not in text


# -- [server] workers (tests/test_workers.py runs them) ------------------------------


def with_workers(workers: Any, *, rpm: int | None = None, **limits: Any) -> dict[str, Any]:
    data = example()
    data["server"]["workers"] = workers
    if rpm is not None:
        data["keys"][0]["rpm"] = rpm
    if limits:
        data["limits"] = limits
    return data


def test_workers_default_to_one_and_parse():
    assert parse_config(example(), ENV).workers == 1
    assert parse_config(with_workers(4), ENV).workers == 4
    assert parse_config(with_workers(64), ENV).workers == 64


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        (0, "server.workers: expected a whole number from 1 to 64, got 0"),
        (-2, "server.workers: expected a whole number from 1 to 64, got -2"),
        (65, "server.workers: expected a whole number from 1 to 64, got 65"),
        (2.0, "server.workers: expected a whole number, got 2.0"),
        ("2", "server.workers: expected a whole number, got '2'"),
        (True, "server.workers: expected a whole number, got True"),
    ],
)
def test_bad_workers_are_named(workers: Any, expected: str):
    assert error_of(with_workers(workers)) == expected


@pytest.mark.parametrize("limit", ["rpm", "tpm"])
def test_workers_with_rate_limits_need_a_shared_store(limit: str):
    data = with_workers(2)
    data["keys"][1][limit] = 100
    assert error_of(data) == (
        "limits: workers = 2 needs [limits] redis_url; rate limits would be enforced per worker"
    )
    data["limits"] = {"redis_url": "redis://127.0.0.1:6379/0"}
    assert parse_config(data, ENV).workers == 2


def test_one_worker_or_no_limits_need_no_shared_store():
    assert parse_config(with_workers(1, rpm=10), ENV).keys[0].rpm == 10
    assert parse_config(with_workers(3), ENV).redis_url is None


def test_the_workers_override_replaces_the_file_before_the_checks():
    data = with_workers(2, rpm=10)
    assert parse_config(data, ENV, workers=1).workers == 1
    with pytest.raises(ConfigError, match=r"^limits: workers = 3 needs \[limits\] redis_url;"):
        parse_config(with_workers(1, rpm=10), ENV, workers=3)
    with pytest.raises(ConfigError, match=r"^server\.workers: expected a whole number, got '2'"):
        parse_config(with_workers("2"), ENV, workers=1)  # the file's value is still checked


def test_workers_built_in_code_are_checked_too():
    base = parse_config(example(), ENV)
    with pytest.raises(ConfigError, match=r"^server\.workers: expected a whole number from 1"):
        GatewayConfig(base.upstreams, base.models, base.keys, workers=0)
    limited = (KeyEntry("k", ALICE, rpm=5),)
    with pytest.raises(ConfigError, match=r"^limits: workers = 2 needs"):
        GatewayConfig(base.upstreams, base.models, limited, workers=2)


# --- [models] deployments, fallbacks and retries; [routing] (docs/routing.md) -----------------


def with_routing(models: dict[str, Any], routing: dict[str, Any] | None = None) -> dict[str, Any]:
    data = example()
    data["upstreams"]["direct"] = {"base_url": "https://direct.invalid/v1", "api_key_env": "DIRECT"}
    data["models"] = models
    if routing is not None:
        data["routing"] = routing
    return data


ROUTING_ENV = {**ENV, "DIRECT": "sk-direct"}
SMART_MODELS: dict[str, Any] = {
    "kilo/smart": {
        "deployments": [
            {"upstream": "openrouter", "upstream_model": "vendor/a", "weight": 3},
            {"upstream": "direct", "upstream_model": "a-2025", "weight": 0.5},
        ],
        "fallbacks": ["kilo/cheap"],
        "retries": 2,
    },
    "kilo/cheap": {"upstream": "direct", "upstream_model": "cheap-1", "free": True},
}


def routing_error(models: dict[str, Any], routing: dict[str, Any] | None = None) -> str:
    return error_of(with_routing(models, routing), ROUTING_ENV)


def test_deployments_fallbacks_and_retries_parse():
    config = parse_config(with_routing(copy.deepcopy(SMART_MODELS)), ROUTING_ENV)
    smart = config.models["kilo/smart"]
    assert [(d.upstream, d.upstream_model, d.weight) for d in smart.deployments] == [
        ("openrouter", "vendor/a", 3.0),
        ("direct", "a-2025", 0.5),
    ]
    # The first deployment also answers to the short form's names.
    assert (smart.upstream, smart.upstream_model) == ("openrouter", "vendor/a")
    assert (smart.fallbacks, smart.retries, smart.free) == (("kilo/cheap",), 2, False)
    cheap = config.models["kilo/cheap"]
    assert [(d.upstream, d.upstream_model, d.weight) for d in cheap.deployments] == [
        ("direct", "cheap-1", 1.0)
    ]
    assert (cheap.fallbacks, cheap.retries) == ((), None)


def test_the_short_form_is_one_deployment_of_weight_1():
    route = parse_config(example(), ENV).models["kilo/paid-model"]
    assert route == ModelRoute("kilo/paid-model", "openrouter", "vendor/model")
    assert [(d.upstream, d.upstream_model, d.weight) for d in route.deployments] == [
        ("openrouter", "vendor/model", 1.0)
    ]


def test_routing_defaults_and_settings():
    routing = parse_config(example(), ENV).routing
    assert (routing.cooldown_failures, routing.cooldown_window, routing.cooldown_seconds) == (
        3,
        30.0,
        30.0,
    )
    settings = {"cooldown_failures": 0, "cooldown_window": 2.5, "cooldown_seconds": 60}
    routing = parse_config(with_routing(copy.deepcopy(SMART_MODELS), settings), ROUTING_ENV).routing
    assert (routing.cooldown_failures, routing.cooldown_window, routing.cooldown_seconds) == (
        0,
        2.5,
        60.0,
    )


def _smart(**changes: Any) -> dict[str, Any]:
    models = copy.deepcopy(SMART_MODELS)
    models["kilo/smart"].update(changes)
    return models


def _deployment(**changes: Any) -> dict[str, Any]:
    return _smart(deployments=[{"upstream": "direct", "upstream_model": "m", **changes}])


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        (
            _deployment(upstream="zz"),
            """models."kilo/smart".deployments[0].upstream: no upstream named 'zz' """
            "(known: direct, openrouter)",
        ),
        (
            _smart(fallbacks=["kilo/typo"]),
            """models."kilo/smart".fallbacks: no model named 'kilo/typo'""",
        ),
        (
            _smart(fallbacks=["kilo/cheap", "kilo/cheap"]),
            """models."kilo/smart".fallbacks: 'kilo/cheap' is listed twice""",
        ),
        (
            _smart(fallbacks="kilo/cheap"),
            """models."kilo/smart".fallbacks: expected a list of names, got 'kilo/cheap'""",
        ),
        (
            _smart(fallbacks=["kilo/smart"]),
            """models."kilo/smart".fallbacks: a cycle: 'kilo/smart' -> 'kilo/smart'""",
        ),
        (
            _deployment(weight=0),
            """models."kilo/smart".deployments[0].weight: expected a positive number, got 0""",
        ),
        (
            _deployment(weight=-2.5),
            """models."kilo/smart".deployments[0].weight: expected a positive number, got -2.5""",
        ),
        (
            _deployment(weight=math.inf),
            """models."kilo/smart".deployments[0].weight: expected a positive number, got inf""",
        ),
        (
            _deployment(weight="3"),
            """models."kilo/smart".deployments[0].weight: expected a positive number, got '3'""",
        ),
        (
            _deployment(weight=True),
            """models."kilo/smart".deployments[0].weight: expected a positive number, got True""",
        ),
        (
            _smart(upstream="openrouter"),
            """models."kilo/smart".deployments: not with upstream and upstream_model; use one""",
        ),
        (_smart(deployments=[]), """models."kilo/smart".deployments: must not be empty"""),
        (
            _smart(deployments={"upstream": "direct"}),
            """models."kilo/smart".deployments: expected an array of tables, written """
            "[{ upstream = ..., upstream_model = ... }]",
        ),
        (
            _smart(deployments=["direct"]),
            """models."kilo/smart".deployments[0]: expected a table""",
        ),
        (
            _deployment(region="eu"),
            """models."kilo/smart".deployments[0].region: unknown key""",
        ),
        (
            _smart(deployments=[{"upstream": "direct"}]),
            """models."kilo/smart".deployments[0].upstream_model: required""",
        ),
        (
            _smart(retries=-1),
            """models."kilo/smart".retries: expected a whole number from 0 to 10, got -1""",
        ),
        (
            _smart(retries=11),
            """models."kilo/smart".retries: expected a whole number from 0 to 10, got 11""",
        ),
        (
            _smart(retries=1.5),
            """models."kilo/smart".retries: expected a whole number, got 1.5""",
        ),
        (
            _smart(retries=True),
            """models."kilo/smart".retries: expected a whole number, got True""",
        ),
    ],
)
def test_bad_deployments_fallbacks_and_retries_are_named(models: dict[str, Any], expected: str):
    assert routing_error(models) == expected


def test_an_indirect_fallback_cycle_is_refused():
    models = copy.deepcopy(SMART_MODELS)
    models["kilo/cheap"]["fallbacks"] = ["kilo/other"]
    models["kilo/other"] = {
        "upstream": "direct",
        "upstream_model": "o",
        "fallbacks": ["kilo/smart"],
    }
    assert routing_error(models) == (
        """models."kilo/smart".fallbacks: a cycle: 'kilo/smart' -> 'kilo/cheap' -> """
        "'kilo/other' -> 'kilo/smart'"
    )


@pytest.mark.parametrize(
    ("routing", "expected"),
    [
        (
            {"cooldown_failures": -1},
            "routing.cooldown_failures: expected a whole number from 0 to 1000, got -1",
        ),
        ({"cooldown_failures": 2.5}, "routing.cooldown_failures: expected a whole number, got 2.5"),
        ({"cooldown_window": 0}, "routing.cooldown_window: expected a positive number, got 0"),
        ({"cooldown_seconds": -5}, "routing.cooldown_seconds: expected a positive number, got -5"),
        ({"cooldown": 30}, "routing.cooldown: unknown key"),
    ],
)
def test_bad_routing_settings_are_named(routing: dict[str, Any], expected: str):
    assert routing_error(copy.deepcopy(SMART_MODELS), routing) == expected


def test_routes_built_in_code_are_checked_too():
    base = parse_config(example(), ENV)
    looped = {
        **base.models,
        "kilo/free-model": ModelRoute(
            "kilo/free-model", "openrouter", "vendor/model:free", fallbacks=("kilo/paid-model",)
        ),
        "kilo/paid-model": ModelRoute(
            "kilo/paid-model", "openrouter", "vendor/model", fallbacks=("kilo/free-model",)
        ),
    }
    with pytest.raises(ConfigError, match=r'^models\."kilo/free-model"\.fallbacks: a cycle'):
        GatewayConfig(base.upstreams, looped, base.keys)
    with pytest.raises(ConfigError, match=r'^models\."kilo/x"\.retries: expected a whole'):
        ModelRoute("kilo/x", "openrouter", "m", retries=-1)
