"""Strict parsing of request bodies (cache/strict_json.py): keyable JSON, or a 400 naming why."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.cache.errors import RequestError
from promptcache.cache.keys import loads_normalised
from promptcache.cache.strict_json import MAX_DEPTH, MAX_INT_DIGITS, parse_body, parse_json_object

CHAT = {"model": "gpt-4o", "temperature": 0.5, "max_tokens": 100,
        "messages": [{"role": "user", "content": "Café [1] {x} \"q\" \\ \n 😀 東京"}]}


def rejected(data: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_body(data)
    assert info.value.status == 400
    assert info.value.param == "body"
    return info.value


def nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


def nested_objects(depth: int) -> bytes:
    return ('{"a":' * depth + "1" + "}" * depth).encode()


# -- valid bodies: the same document as loads_normalised ---------------------------------------

VALID = [
    json.dumps(CHAT).encode(),
    json.dumps(CHAT, ensure_ascii=False).encode(),
    json.dumps(CHAT, indent=2).encode(),
    b'{"temperature": 1.0, "n": 2.0, "top_p": 0.5, "x": -0.0, "y": 1e300, "z": 1E-400}',
    b'{"seed": -' + b"9" * MAX_INT_DIGITS + b'}',
    b'["\\ud83d\\ude00", "\\uD83D\\uDE00", "\\u00e9", "\\\\ud800", "\\\\\\\\"]',
    b'{"s": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}',
    b'{"s": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\""}',
    b'  [1, 2.5, true, false, null, "a", {}, []]  ',
    nested(MAX_DEPTH),
    nested_objects(MAX_DEPTH),
    b'[{"a": ' * (MAX_DEPTH // 2) + b"1" + b"}]" * (MAX_DEPTH // 2),
]


@pytest.mark.parametrize("data", VALID)
def test_a_valid_body_parses_to_what_loads_normalised_gives(data: bytes) -> None:
    assert parse_body(data) == loads_normalised(data)


def test_integral_floats_become_ints_so_keys_stay_as_they_were() -> None:
    doc = parse_body(b'{"temperature": 1.0, "max_tokens": 1e2, "top_p": 0.5}')
    assert doc == {"temperature": 1, "max_tokens": 100, "top_p": 0.5}
    assert type(doc["temperature"]) is int and type(doc["max_tokens"]) is int


@pytest.mark.parametrize("data, value", [(b"[1]", [1]), (b'"s"', "s"), (b"3", 3),
                                         (b"null", None), (b"2.0", 2)])
def test_the_top_level_value_keeps_its_type(data: bytes, value: Any) -> None:
    assert parse_body(data) == value


# -- malformed bodies: a 400 whose message names the problem -----------------------------------

MALFORMED = {
    "not utf-8": (b'{"a": "\xff"}', r"not UTF-8: invalid start byte at byte 7"),
    "utf-8 encoded surrogate": (b'"\xed\xa0\x80"', r"not UTF-8"),
    "utf-16": ('{"a": 1}'.encode("utf-16"), r"not UTF-8"),
    "bom": (b'\xef\xbb\xbf{"a": 1}', r"not valid JSON: Unexpected UTF-8 BOM"),
    "empty": (b"", r"not valid JSON: Expecting value"),
    "truncated": (b'{"model": "x", "messages": [', r"not valid JSON"),
    "trailing data": (b'{"a": 1} {"a": 2}', r"not valid JSON: Extra data"),
    "NaN": (b'{"model": "x", "metadata": {"v": [NaN]}}', r"NaN, which is not a JSON number"),
    "Infinity": (b'{"x": Infinity}', r"Infinity, which is not a JSON number"),
    "-Infinity": (b'[-Infinity]', r"-Infinity, which is not a JSON number"),
    "1e999": (b'{"logit_bias": {"1": 1e999}}', r"too large for a double: 1e999"),
    "-1e999": (b'[-1e999]', r"too large for a double: -1e999"),
    "41-digit integer": (b'{"seed": ' + b"1" * 41 + b'}', r"integer of 41 digits"),
    "5000-digit integer": (b'[-' + b"7" * 5000 + b']', r"integer of 5000 digits"),
    "65 arrays deep": (nested(MAX_DEPTH + 1), r"more than 64 deep"),
    "65 objects deep": (nested_objects(MAX_DEPTH + 1), r"more than 64 deep"),
    "deep after a string": (b'["\\\\", ' + nested(MAX_DEPTH) + b']', r"more than 64 deep"),
    "lone high surrogate": (b'{"content": "a\\ud800b"}', r"lone surrogate \\ud800"),
    "lone low surrogate": (b'["\\udc80"]', r"lone surrogate \\udc80"),
    "surrogate in a key": (b'{"\\uDBFF": 1}', r"lone surrogate \\udbff"),
    "pair reversed": (b'["\\ude00\\ud83d"]', r"lone surrogate \\ude00"),
    "high twice": (b'["\\ud83d\\ud83d\\ude00"]', r"lone surrogate \\ud83d"),
    "after escaped backslash": (b'["\\\\\\ud800"]', r"lone surrogate \\ud800"),
    "low after literal text": (b'["\\\\ud83d\\udc00"]', r"lone surrogate \\udc00"),
    "duplicate key": (b'{"model": "a", "model": "b"}', r"key 'model' twice in one object"),
    "nested duplicate key": (b'{"messages": [{"role": "user", "content": "a", "content": "b"}]}',
                             r"key 'content' twice"),
}


@pytest.mark.parametrize("data, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_body_is_a_400_naming_the_problem(data: bytes, message: str) -> None:
    assert re.search(message, rejected(data).message)


def test_the_message_for_a_long_duplicate_key_is_short() -> None:
    key = "k" * 10_000
    assert len(rejected(json.dumps({key: 1}).replace("}", f', "{key}": 2}}').encode()).message
               ) < 200


def test_brackets_inside_strings_do_not_count_towards_the_depth() -> None:
    inside = "[" * 1000 + "{" * 1000
    body = json.dumps({"s": inside, "t": f'"{inside}\\', "u": ["\\"] * 100}).encode()
    assert parse_body(body)["s"] == inside


def test_escapes_before_a_quote_are_read_as_the_parser_reads_them() -> None:
    # "\\" ends the string, so the brackets after it count; "\"" does not end it.
    counted = b'["a\\\\", ' + nested(MAX_DEPTH) + b"]"
    assert "deep" in rejected(counted).message
    not_counted = b'["a\\"' + b"[" * 100 + b'\\n\\t\\u0022\\/"]'
    assert parse_body(not_counted) == loads_normalised(not_counted)


# -- cost: linear, and pathological bodies are refused fast ------------------------------------

def elapsed(data: bytes) -> float:
    started = time.perf_counter()
    try:
        parse_body(data)
    except RequestError:
        pass
    return time.perf_counter() - started


@pytest.mark.parametrize("data", [b"[" * 10_000_000, b'{"a":' * 2_000_000,
                                  b"[" * 10_000_000 + b"]" * 10_000_000],
                         ids=["10 MB of [", "10 MB of {\"a\":", "20 MB balanced"])
def test_a_10_mb_body_nested_too_deep_is_refused_in_well_under_a_second(data: bytes) -> None:
    assert "deep" in rejected(data).message
    assert elapsed(data) < 0.5


@pytest.mark.parametrize("data", [
    json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 10_000_000}]}),
    '["' + '\\"' * 5_000_000 + '"]',
    '["' + "\\\\" * 5_000_000 + '"]',
    '["' + "\\ud83d\\ude00" * 800_000 + '"]',
    '["' + "\\u0041" * 1_600_000 + '"]',
    "[" + "1," * 5_000_000 + "1]",
], ids=["one long string", "escaped quotes", "escaped backslashes", "surrogate pairs",
        "unicode escapes", "many numbers"])
def test_a_10_mb_valid_body_parses_in_linear_time(data: str) -> None:
    """Each takes 0.03-0.6 s here (json.loads alone: 0.01-0.45 s); quadratic would be minutes."""
    raw = data.encode()
    assert parse_body(raw) == loads_normalised(raw)
    assert elapsed(raw) < 2.0


# -- the admin routes' variant -----------------------------------------------------------------

def test_parse_json_object_returns_an_object() -> None:
    assert parse_json_object(b'{"namespace": "docs", "n": 1.0}') == {"namespace": "docs", "n": 1}


@pytest.mark.parametrize("data", [b"[]", b'"docs"', b"null", b"1"])
def test_parse_json_object_refuses_anything_but_an_object(data: bytes) -> None:
    with pytest.raises(RequestError, match="must be a JSON object") as info:
        parse_json_object(data)
    assert info.value.status == 400


def test_parse_json_object_refuses_what_parse_body_refuses() -> None:
    with pytest.raises(RequestError, match="twice"):
        parse_json_object(b'{"namespace": "a", "namespace": "b"}')


# -- properties: agree with json.loads wherever the body is acceptable -------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(10**MAX_INT_DIGITS) + 1, max_value=10**MAX_INT_DIGITS - 1)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(json_values, st.booleans())
def test_any_serialised_json_value_parses_as_loads_normalised_does(value: Any, ascii_: bool
                                                                    ) -> None:
    data = json.dumps(value, ensure_ascii=ascii_).encode()
    assert parse_body(data) == loads_normalised(data)


# Pieces of string content that are hard on an escape-aware scan.
PIECES = ["a", "[", "{", "]", "}", '\\"', "\\\\", "\\n", "\\u005c", "\\u0022", "u", "d800",
          "\\ud83d", "\\ude00", "\\udbff", "\\udc00", "\\u00e9", "é"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=8), min_size=1, max_size=6),
       st.integers(min_value=MAX_DEPTH - 3, max_value=MAX_DEPTH + 3))
def test_depth_and_surrogates_are_judged_as_the_parser_reads_the_strings(
        strings: list[list[str]], depth: int) -> None:
    """Exact against a reference: json.loads' own reading of the same text."""
    items = ['"' + "".join(strings[i % len(strings)]) + '"' for i in range(depth)]
    text = "".join(f"[{s}, " for s in items[:-1]) + f"[{items[-1]}]" + "]" * (depth - 1)
    doc = json.loads(text)
    lone = any(0xD800 <= ord(c) <= 0xDFFF for c in json.dumps(doc, ensure_ascii=False))
    if depth > MAX_DEPTH:
        assert "deep" in rejected(text.encode()).message
    elif lone:
        assert "lone surrogate" in rejected(text.encode()).message
    else:
        assert parse_body(text.encode()) == doc
