"""Configuration (server/config.py) and the ``promptcache`` command (promptcache/cli.py)."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from promptcache.cache.errors import ConfigError
from promptcache.cli import main, parser
from promptcache.server.config import (
    OPTIONS,
    Settings,
    add_arguments,
    build_settings,
    parse_bool,
    parse_size,
)
from tests.support.paths import ROOT

UPSTREAM = "http://upstream.test"
#: The documented example price table (--prices), which must stay valid.
PRICES = ROOT / "docs" / "prices.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PROMPTCACHE_* variable of the machine running the tests leaks into a test."""
    for name in list(os.environ):
        if name.startswith("PROMPTCACHE_"):
            monkeypatch.delenv(name)


def write_toml(tmp_path: Path, text: str, name: str = "promptcache.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def settings(flags: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
    return build_settings({"upstream": UPSTREAM} | (flags or {}), env or {})


# =============================================================================================
# precedence: flag > environment > TOML file > default
# =============================================================================================


def test_defaults_apply_when_nothing_else_is_given() -> None:
    s = settings()
    defaults = {f.name: f.default for f in fields(Settings) if f.name != "upstream"}
    assert {name: getattr(s, name) for name in defaults} == defaults
    assert s.upstream == UPSTREAM


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = 3\nhost = '10.0.0.3'\nkey_prefix = 'file:'\n")
    env = {"PROMPTCACHE_PORT": "2", "PROMPTCACHE_HOST": "10.0.0.2", "PROMPTCACHE_CONFIG": path}
    s = build_settings({"upstream": UPSTREAM, "port": "1"}, env)
    assert s.port == 1  # flag
    assert s.host == "10.0.0.2"  # env
    assert s.key_prefix == "file:"  # file
    assert s.log_level == "info"  # default


@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_every_option_can_come_from_each_source(source: str, tmp_path: Path) -> None:
    raw: dict[str, str] = {
        "upstream": "https://api.example.com/v1/",
        "host": "0.0.0.0",
        "port": "9000",
        "workers": "3",
        "redis_url": "redis://:pw@localhost:6390/2",
        "data_dir": "/var/lib/pc",
        "default_ttl": "60",
        "max_entry_bytes": "64KiB",
        "max_body_bytes": "2MB",
        "max_bytes": "512MB",
        "index_max_bytes": "64MiB",
        "flight_lease": "12.5",
        "flight_timeout": "7",
        "max_response_bytes": "1MiB",
        "max_ttl": "120",
        "shared_cache": "true",
        "anonymous_tenant": "yes",
        "credential_headers": "Authorization, X-Custom-Key",
        "credential_params": "key,api_key",
        "pass_credentials": "no",
        "upstream_api_key": "sk-up",
        "upstream_key_paths": "/v1/models,/v1/files/",
        "redis_max_connections": "64",
        "header_timeout": "5",
        "body_timeout": "9",
        "upstream_connect_timeout": "1.5",
        "upstream_read_timeout": "30",
        "redis_timeout": "0.5",
        "breaker_threshold": "5",
        "breaker_reset": "2",
        "semantic": "false",
        "similarity_threshold": "0.95",
        "length_relief": "0.02",
        "semantic_max_temperature": "0.5",
        "embedding_model": "/models/m",
        "embedding_tuning": "/models/t.safetensors",
        "index_kind": "sq8",
        "first_stage": "no",
        "index_warmup_wait": "3",
        "static_model_dir": "/models/static",
        "verifier_model": "none",
        "verify_numbers": "false",
        "verify_negation": "off",
        "verify_entities": "0",
        "verify_contrast": "no",
        "embed_window": "0.003",
        "embed_max_batch": "16",
        "embed_threads": "2",
        "embed_niceness": "5",
        "semantic_wait_budget": "0.02",
        "embed_timeout": "2",
        "embed_memo_bytes": "1MiB",
        "max_rss": "300MB",
        "near_cache_bytes": "8MiB",
        "embed_backend": "torch",
        "vector_backlog": "10",
        "context_match": "dependent",
        "audit_rate": "0.05",
        "max_false_hit_rate": "0.01",
        "audit_pairs": "/tmp/audited.jsonl",
        "key_prefix": "x:",
        "key_ignore": "user, metadata",
        "admin_token": "tok",
        "otel": "true",
        "log_level": "debug",
        "prices": str(PRICES),
    }
    assert set(raw) == {o.name for o in OPTIONS}  # a new option needs a line here
    if source == "flag":
        s = build_settings(raw, {})
    elif source == "env":
        s = build_settings({}, {f"PROMPTCACHE_{k.upper()}": v for k, v in raw.items()})
    else:
        lines = "".join(f'{k} = "{v}"\n' for k, v in raw.items())
        s = build_settings({"config": write_toml(tmp_path, lines)}, {})
    assert s == Settings(
        upstream="https://api.example.com/v1",  # trailing slash dropped
        host="0.0.0.0",
        port=9000,
        workers=3,
        redis_url="redis://:pw@localhost:6390/2",
        data_dir="/var/lib/pc",
        default_ttl=60.0,
        max_entry_bytes=65536,
        max_body_bytes=2_000_000,
        max_bytes=512_000_000,
        index_max_bytes=64 << 20,
        flight_lease=12.5,
        flight_timeout=7.0,
        max_response_bytes=1 << 20,
        max_ttl=120.0,
        shared_cache=True,
        anonymous_tenant=True,
        credential_headers=("authorization", "x-custom-key"),
        credential_params=("key", "api_key"),
        pass_credentials=False,
        upstream_api_key="sk-up",
        upstream_key_paths=("/v1/models", "/v1/files"),
        redis_max_connections=64,
        header_timeout=5.0,
        body_timeout=9.0,
        upstream_connect_timeout=1.5,
        upstream_read_timeout=30.0,
        redis_timeout=0.5,
        breaker_threshold=5,
        breaker_reset=2.0,
        semantic=False,
        similarity_threshold=0.95,
        length_relief=0.02,
        semantic_max_temperature=0.5,
        embedding_model="/models/m",
        embedding_tuning="/models/t.safetensors",
        index_kind="sq8",
        first_stage=False,
        index_warmup_wait=3.0,
        static_model_dir="/models/static",
        verifier_model="none",
        verify_numbers=False,
        verify_negation=False,
        verify_entities=False,
        verify_contrast=False,
        embed_window=0.003,
        embed_max_batch=16,
        embed_threads=2,
        embed_niceness=5,
        semantic_wait_budget=0.02,
        embed_timeout=2.0,
        embed_memo_bytes=1 << 20,
        max_rss=300_000_000,
        near_cache_bytes=8 << 20,
        embed_backend="torch",
        vector_backlog=10,
        context_match="dependent",
        audit_rate=0.05,
        max_false_hit_rate=0.01,
        audit_pairs="/tmp/audited.jsonl",
        key_prefix="x:",
        key_ignore=("user", "metadata"),
        admin_token="tok",
        otel=True,
        log_level="debug",
        prices=str(PRICES),
    )


def test_a_cluster_url_is_accepted_as_redis_url() -> None:
    assert settings({"redis_url": "redis+cluster://10.0.0.1:7000"}).redis_url == (
        "redis+cluster://10.0.0.1:7000")


def test_toml_keys_may_use_dashes_or_underscores(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path, 'max-entry-bytes = "1KiB"\nmax_body_bytes = 2048\nredis-timeout = 0.1\n'
    )
    s = settings({"config": path})
    assert (s.max_entry_bytes, s.max_body_bytes, s.redis_timeout) == (1024, 2048, 0.1)


def test_toml_options_may_sit_under_a_promptcache_table(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path, f'[promptcache]\nupstream = "{UPSTREAM}"\nshared-cache = true\nport = 81\n'
    )
    s = build_settings({"config": path}, {})
    assert (s.upstream, s.shared_cache, s.port) == (UPSTREAM, True, 81)


def test_config_file_can_be_named_by_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = 8181\n")
    assert settings(env={"PROMPTCACHE_CONFIG": path}).port == 8181


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    by_flag = write_toml(tmp_path, "port = 1111\n", "flag.toml")
    by_env = write_toml(tmp_path, "port = 2222\n", "env.toml")
    s = settings({"config": by_flag}, {"PROMPTCACHE_CONFIG": by_env})
    assert s.port == 1111


def test_upstream_may_come_from_the_file_alone(tmp_path: Path) -> None:
    path = write_toml(tmp_path, f'upstream = "{UPSTREAM}/"\n')
    assert build_settings({"config": path}, {}).upstream == UPSTREAM


def test_build_settings_accepts_an_argparse_namespace() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--upstream", UPSTREAM, "--max-entry-bytes", "2MiB", "--port", "0"])
    s = build_settings(args, {"PROMPTCACHE_PORT": "9"})
    assert (s.upstream, s.max_entry_bytes, s.port) == (UPSTREAM, 2 << 20, 0)


def test_flags_left_out_stay_none_so_lower_layers_apply() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = vars(p.parse_args([]))
    assert args == {"config": None} | {o.name: None for o in OPTIONS}


# =============================================================================================
# errors
# =============================================================================================


def test_missing_upstream_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--upstream is required"):
        build_settings({}, {})


@pytest.mark.parametrize("url", ["api.openai.com", "ftp://host", "http://", "", "localhost:8000"])
def test_bad_upstream_url_is_a_config_error_naming_the_flag(url: str) -> None:
    with pytest.raises(ConfigError, match="--upstream"):
        build_settings({"upstream": url}, {})


def test_bad_env_value_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="PROMPTCACHE_UPSTREAM"):
        build_settings({}, {"PROMPTCACHE_UPSTREAM": "not a url"})


def test_bad_file_value_is_a_config_error_naming_file_and_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'port = "eighty"\n')
    with pytest.raises(ConfigError) as info:
        settings({"config": path})
    assert path in str(info.value)
    assert "port" in str(info.value)


@pytest.mark.parametrize("size", ["lots", "12XB", "-5", "1.2.3MB"])
def test_bad_size_is_a_config_error_naming_the_option(size: str) -> None:
    with pytest.raises(ConfigError, match="--max-entry-bytes"):
        settings({"max_entry_bytes": size})
    with pytest.raises(ConfigError, match="PROMPTCACHE_MAX_BODY_BYTES"):
        settings(env={"PROMPTCACHE_MAX_BODY_BYTES": size})


def test_bad_redis_url_is_a_config_error_naming_the_option() -> None:
    with pytest.raises(ConfigError, match="--redis-url"):
        settings({"redis_url": "http://localhost:6379"})


def test_bad_bool_is_a_config_error_naming_the_option() -> None:
    with pytest.raises(ConfigError, match="PROMPTCACHE_SHARED_CACHE"):
        settings(env={"PROMPTCACHE_SHARED_CACHE": "maybe"})


def test_unknown_toml_key_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = 1\nmax-entry-size = 5\n")
    with pytest.raises(ConfigError, match="max_entry_size"):
        settings({"config": path})


def test_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="nope.toml"):
        settings({"config": missing})


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        settings({"config": path})


@pytest.mark.parametrize(
    ("flags", "option"),
    [
        ({"default_ttl": "-1"}, "--default-ttl"),
        ({"default_ttl": "nan"}, "--default-ttl"),
        ({"port": "70000"}, "--port"),
        ({"port": "-1"}, "--port"),
        ({"max_entry_bytes": "0"}, "--max-entry-bytes"),
        ({"max_body_bytes": "0"}, "--max-body-bytes"),
        ({"redis_timeout": "0"}, "--redis-timeout"),
        ({"breaker_threshold": "0"}, "--breaker-threshold"),
        ({"breaker_reset": "0"}, "--breaker-reset"),
        ({"upstream_connect_timeout": "-1"}, "--upstream-connect-timeout"),
        ({"upstream_read_timeout": "0"}, "--upstream-read-timeout"),
        ({"log_level": "loud"}, "--log-level"),
        ({"port": "80.5"}, "--port"),
        ({"breaker_threshold": "three"}, "--breaker-threshold"),
    ],
)
def test_out_of_range_values_are_config_errors_naming_the_option(
    flags: dict[str, str], option: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(option)):
        settings(flags)


def test_negative_ttl_in_the_file_is_a_config_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "default-ttl = -5\n")
    with pytest.raises(ConfigError, match="default-ttl"):
        settings({"config": path})


@pytest.mark.parametrize(
    "text", ["upstream = 8080\n", f'upstream = "{UPSTREAM}"\nredis_url = 6379\n']
)
def test_non_string_url_in_the_file_is_a_config_error(text: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        build_settings({"config": write_toml(tmp_path, text)}, {})


@pytest.mark.parametrize("ttl", ["inf", "1e20"])
def test_default_ttl_redis_cannot_express_is_a_config_error(ttl: str) -> None:
    with pytest.raises(ConfigError, match="--default-ttl"):
        settings({"default_ttl": ttl})


# =============================================================================================
# parse_size / parse_bool
# =============================================================================================


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MB", 512_000_000),
        ("64KiB", 65_536),
        ("1m", 1_000_000),
        ("1MiB", 1_048_576),
        ("1mi", 1_048_576),
        ("2k", 2_000),
        ("1GiB", 1 << 30),
        ("1.5KiB", 1_536),
        ("10b", 10),
        (" 7 kb ", 7_000),
        ("1048576", 1_048_576),
        ("0", 0),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "-1", "1 2", "1PB", "1.5.5", "ten"])
def test_parse_size_rejects_non_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_parse_size_rejects_bool() -> None:
    with pytest.raises(ValueError):
        parse_size(True)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("Yes", True), ("ON", True), (True, True),
     ("0", False), ("false", False), ("no", False), ("off", False), ("", False), (False, False)],
)
def test_parse_bool(text: str | bool, value: bool) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["2", "maybe", "yess"])
def test_parse_bool_rejects_other_words(text: str) -> None:
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool(text)


# =============================================================================================
# Settings.public
# =============================================================================================


def test_public_masks_secrets() -> None:
    s = settings({"admin_token": "admin-secret", "upstream_api_key": "sk-secret"})
    public = s.public()
    assert public["admin_token"] == "***"
    assert public["upstream_api_key"] == "***"
    assert "secret" not in repr(public)
    assert public["upstream"] == UPSTREAM
    assert public["port"] == 8080


def test_public_shows_unset_secrets_as_none() -> None:
    public = settings().public()
    assert public["admin_token"] is None
    assert public["upstream_api_key"] is None


def test_public_lists_every_setting() -> None:
    assert set(settings().public()) == {f.name for f in fields(Settings)}


# =============================================================================================
# the command line
# =============================================================================================


def serve_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def option_blocks(help_text: str) -> dict[str, str]:
    """``--flag`` -> its help entry with whitespace collapsed (entries may wrap)."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        m = re.match(r"^  (--[a-z-]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = ""
        elif not line.startswith("  "):
            current = None
        if current:
            blocks[current] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def test_serve_help_lists_every_option_with_env_var_and_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = option_blocks(serve_help(monkeypatch, capsys))
    assert "--config" in blocks and "PROMPTCACHE_CONFIG" in blocks["--config"]
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        assert flag in blocks, flag
        assert f"PROMPTCACHE_{o.name.upper()}" in blocks[flag], flag
        assert "default:" in blocks[flag], flag


def test_serve_help_shows_the_real_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The help text is generated from the same table the defaults come from."""
    blocks = option_blocks(serve_help(monkeypatch, capsys))
    defaults = {f.name: f.default for f in fields(Settings)}
    for o in OPTIONS:
        if o.name in ("upstream", "data_dir"):
            continue
        shown = re.search(r"default: (\S+)", blocks["--" + o.name.replace("_", "-")])
        assert shown is not None, o.name
        default = defaults[o.name]
        expected = ("(none)" if default in (None, ()) else ",".join(default)
                    if isinstance(default, tuple) else str(default))
        assert shown.group(1) == expected, o.name
    assert str(Settings(upstream=UPSTREAM).resolved_data_dir) in blocks["--data-dir"]


def test_serve_without_upstream_prints_an_error_and_returns_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert "PROMPTCACHE_UPSTREAM" not in os.environ
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptcache: error:")
    assert "--upstream is required" in err


def test_serve_with_bad_option_prints_an_error_and_returns_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--upstream", UPSTREAM, "--max-entry-bytes", "huge"]) == 2
    assert "--max-entry-bytes" in capsys.readouterr().err


def test_serve_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The env layer is os.environ: a bad PROMPTCACHE_ value there is reported."""
    monkeypatch.setenv("PROMPTCACHE_UPSTREAM", UPSTREAM)
    monkeypatch.setenv("PROMPTCACHE_PORT", "not-a-port")
    assert main(["serve"]) == 2
    assert "PROMPTCACHE_PORT" in capsys.readouterr().err


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("promptcache 0.")
