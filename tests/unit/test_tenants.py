"""Who a request belongs to and what else scopes its key (cache/request.py, cache/keys.py):
credential carriers, the variant (query string, version headers), retention, tenant tags."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from promptcache.cache.cache_control import CacheControl
from promptcache.cache.errors import RequestError
from promptcache.cache.keys import request_key, tenant_id, tenant_tag
from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.request import CREDENTIAL_HEADERS, credential, retention, variant_of
from promptcache.server.config import redact_url

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_every_default_carrier_is_read_and_none_means_no_credential() -> None:
    for name in ("Authorization", "x-api-key", "api-key", "x-goog-api-key"):
        got = credential(CIMultiDict({name: "secret"}), names=CREDENTIAL_HEADERS)
        assert got == f"{name.lower()}=secret"
    assert credential(CIMultiDict(), [("key", "s")], params=("key",)) == "?key=s"
    assert credential(CIMultiDict({"X-Other": "s"}), [("q", "1")], params=("key",)) is None


def test_credentials_from_different_carriers_are_different_tenants() -> None:
    a = credential(CIMultiDict({"api-key": "s"}))
    b = credential(CIMultiDict({"x-goog-api-key": "s"}))
    c = credential(CIMultiDict(), [("key", "s")], params=("key",))
    assert len({tenant_id(a), tenant_id(b), tenant_id(c)}) == 3


def test_a_credential_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(RequestError, match="UTF-8"):
        credential(CIMultiDict({"Authorization": "Bearer \udcff"}))


def test_variant_keys_query_and_version_headers_but_not_credential_params() -> None:
    plain = variant_of(CIMultiDict())
    assert plain == ""
    assert variant_of(CIMultiDict(), [("key", "secret")], params=("key",)) == ""
    a = variant_of(CIMultiDict(), [("api-version", "A")])
    b = variant_of(CIMultiDict(), [("api-version", "B")])
    v = variant_of(CIMultiDict({"anthropic-version": "2023-06-01"}))
    assert len({plain, a, b, v}) == 4
    # the order of parameters does not matter
    assert (variant_of(CIMultiDict(), [("a", "1"), ("b", "2")])
            == variant_of(CIMultiDict(), [("b", "2"), ("a", "1")]))
    keys = {request_key(CHAT, BODY, tenant="t", variant=x).digest for x in (plain, a, b, v)}
    assert len(keys) == 4


def test_a_digest_ends_with_its_tenants_tag_and_the_purge_pattern_finds_only_it() -> None:
    alice, bob = tenant_id("authorization=Bearer a"), tenant_id("authorization=Bearer b")
    da = request_key(CHAT, BODY, tenant=alice).digest
    db = request_key(CHAT, BODY, tenant=bob).digest
    assert len(da) == 32 and da.endswith(tenant_tag(alice)) and not db.endswith(tenant_tag(alice))
    layout = KeyLayout()
    entries, vectors = layout.patterns(None, tenant_tag(alice))
    assert entries.endswith(tenant_tag(alice)) and vectors.startswith("pc:v:")
    with pytest.raises(ValueError):
        layout.patterns(None, "*")


@pytest.mark.parametrize(("max_age", "default_ttl", "max_ttl", "expected"), [
    (10**9, 100, 0, 100),  # cut to the default TTL
    (50, 100, 0, 50),  # shorter stays
    (10**9, 100, 1000, 1000),  # the operator allows longer
    (10**9, 0, 0, 10**9),  # no expiry configured: nothing to bound by
    (None, 100, 0, None),
])
def test_retention_lets_max_age_only_shorten_the_configured_ttl(
    max_age: int | None, default_ttl: float, max_ttl: float, expected: int | None
) -> None:
    assert retention(CacheControl(max_age=max_age), default_ttl, max_ttl).max_age == expected


def test_redact_url_masks_user_info_and_secret_parameters() -> None:
    assert redact_url("redis://:pw@h:6379/0") == "redis://***@h:6379/0"
    assert redact_url("https://user:pw@api.x/v1?key=k&api-version=1") == (
        "https://***@api.x/v1?key=***&api-version=1")
    assert redact_url("unix:///tmp/r.sock?password=pw&db=1") == (
        "unix:///tmp/r.sock?password=***&db=1")
    assert redact_url("http://h:1/v1") == "http://h:1/v1"
