"""``--key-ignore``: named top-level body fields left out of the exact key and the semantic
scope (cache/keys.py, cache/semantic/scope.py), opt-in, never the fields that are asked."""

from __future__ import annotations

from typing import Any

import pytest

from promptcache.cache.errors import ConfigError
from promptcache.cache.keys import UNIGNORABLE_FIELDS, check_key_ignore, request_key, tenant_id
from promptcache.cache.semantic.scope import semantic_view
from promptcache.server.config import build_settings

CHAT = "/v1/chat/completions"
TENANT = tenant_id("sk-test")


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi there"}],
            **extra}


def key(b: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    return request_key(CHAT, b, tenant=TENANT, ignore=ignore).digest


def scope(b: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    view = semantic_view("chat", CHAT, b, tenant=TENANT, namespace="", ignore=ignore)
    assert view is not None
    return view.scope


def test_by_default_every_body_field_is_part_of_the_key() -> None:
    assert key(body(user="alice")) != key(body(user="bob")) != key(body())
    assert scope(body(user="alice")) != scope(body(user="bob"))


def test_an_ignored_field_no_longer_changes_the_key_or_the_scope() -> None:
    ignore = ("user", "metadata")
    keys = {key(body(user="alice"), ignore), key(body(user="bob"), ignore), key(body(), ignore),
            key(body(user="bob", metadata={"trace": "x"}), ignore)}
    assert keys == {key(body())}  # as if the field had never been sent
    assert scope(body(user="alice"), ignore) == scope(body(), ignore) == scope(body())


def test_fields_not_ignored_still_change_the_key() -> None:
    ignore = ("user",)
    assert key(body(temperature=0), ignore) != key(body(temperature=1), ignore)
    assert scope(body(temperature=0), ignore) != scope(body(temperature=1), ignore)


def test_ignoring_is_top_level_only() -> None:
    """A nested field of the same name (in a message) still changes the key."""
    a = {"model": "m", "messages": [{"role": "user", "content": "x", "user": "a"}]}
    b = {"model": "m", "messages": [{"role": "user", "content": "x", "user": "b"}]}
    assert key(a, ("user",)) != key(b, ("user",))


@pytest.mark.parametrize("field", sorted(UNIGNORABLE_FIELDS))
def test_fields_that_are_the_question_are_refused(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        check_key_ignore(["user", field])
    with pytest.raises(ConfigError, match=f"--key-ignore.*{field}"):
        build_settings({"upstream": "http://x", "key_ignore": ["user", field]}, {})


def test_the_option_takes_a_repeated_flag_a_comma_list_or_a_toml_list() -> None:
    up = {"upstream": "http://x"}
    assert build_settings(up | {"key_ignore": ["user", "metadata"]}, {}).key_ignore == (
        "user", "metadata")
    assert build_settings(up | {"key_ignore": ["user,metadata", "user"]}, {}).key_ignore == (
        "user", "metadata")
    assert build_settings(up, {"PROMPTCACHE_KEY_IGNORE": "user, metadata"}).key_ignore == (
        "user", "metadata")
    assert build_settings(up, {}).key_ignore == ()
    with pytest.raises(ConfigError, match="key-ignore"):
        build_settings(up | {"key_ignore": 3}, {})


def test_the_flag_repeats_on_the_command_line() -> None:
    from promptcache.cli import parser

    argv = ["serve", "--upstream", "http://x", "--key-ignore", "user", "--key-ignore",
            "metadata"]
    args = parser(argv).parse_args(argv)
    assert build_settings(vars(args) | {"command": None}, {}).key_ignore == ("user", "metadata")
