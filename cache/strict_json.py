"""Parsing request bodies strictly: a JSON document the cache can key, or a 400.

:func:`parse_body` (the cached routes) and :func:`parse_json_object` (the admin routes) parse
UTF-8 JSON as :func:`promptcache.cache.keys.loads_normalised` does (integral floats as ints,
so keys do not change), and raise :class:`~promptcache.cache.errors.RequestError`
(``param="body"``) for anything that could not be keyed safely or that two JSON parsers
could read differently:

- bytes that are not UTF-8, or text that is not JSON (a leading BOM included);
- ``NaN``, ``Infinity``, ``-Infinity``, and numbers that overflow a double (``1e999``);
- integer literals of more than :data:`MAX_INT_DIGITS` digits (Python refuses to convert
  very long ones, and no API parameter needs them; a float literal such as ``1e300`` is
  bounded by the double range and is kept, as an int, like any integral float);
- arrays and objects nested more than :data:`MAX_DEPTH` deep;
- lone UTF-16 surrogates (``"\\ud800"``) in strings or keys: they cannot be encoded;
- an object with the same key twice: this parser would key the last value while an upstream
  that keeps the first would answer another request (cache poisoning).

The depth is checked before parsing, by a scan that never recurses (10 MB of ``[`` is
refused in well under a second). Every step costs time linear in the body's size.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from itertools import accumulate
from typing import Any, Final, NoReturn

from promptcache.cache.errors import RequestError

#: The deepest nesting of arrays and objects accepted (``[[1]]`` is 2 deep).
MAX_DEPTH: Final = 64
#: The most digits an integer literal may have (a sign is not counted).
MAX_INT_DIGITS: Final = 40

# The depth scan reduces the body to its brackets outside strings with C-speed byte
# operations. It keeps quotes, brackets, backslashes and the characters that may follow a
# backslash in JSON, so each escape stays whole; drops escaped backslashes (pairs, left to
# right), then escaped quotes, so that plain quotes delimit every string; keeps only quotes
# and brackets; and drops what lies between the quotes. No step recurses or loops in Python
# over the body, except the final running sum over the brackets left outside strings.
_ESCAPES: Final = bytes(b for b in range(256) if b not in b'"[]{}\\/bfnrtu')
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b'"[]{}')
_OPEN_CLOSE: Final = bytes.maketrans(b"[]{}", b"()()")
_STEP: Final = tuple(1 if b == ord("(") else -1 for b in range(256))

_DIGITS_TO_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS: Final = b"0" * (MAX_INT_DIGITS + 1)

# A lone surrogate is an escape \uD800-\uDFFF that is not half of a high-low pair; after
# json.loads accepted the text, removing escaped backslashes and pairs (left to right) leaves
# only those. Text with no surrogate escape at all (nearly every body) skips that pass.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_BACKSLASH_OR_PAIR: Final = re.compile(
    r"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def parse_body(data: bytes) -> Any:
    """The JSON document in ``data``, normalised as ``loads_normalised`` does; RequestError
    (400, ``param="body"``) if it is not strict, keyable JSON (see the module docstring).

    The top-level value may be of any type: the shape of a request is checked elsewhere.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _reject(f"the request body is not UTF-8: {exc.reason} at byte {exc.start}", exc)
    _check_depth(data)
    # Integers are checked only if some run of digits is long enough to matter: calling a
    # Python hook for every integer would slow down bodies of token ids several-fold.
    long_digits = _LONG_DIGITS in data.translate(_DIGITS_TO_ZERO)
    try:
        doc = json.loads(text, parse_int=_integer if long_digits else None, parse_float=_float,
                         parse_constant=_constant, object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        _reject(f"the request body is not valid JSON: {exc}", exc)
    except RecursionError as exc:  # the depth scan should make this unreachable
        _reject(f"the request body nests arrays and objects more than {MAX_DEPTH} deep", exc)
    if _SURROGATE_ESCAPE.search(text):
        _check_surrogates(text)
    return doc


def parse_json_object(data: bytes) -> dict[str, Any]:
    """:func:`parse_body` for a body that must be a JSON object (the admin routes)."""
    doc = parse_body(data)
    if not isinstance(doc, dict):
        raise RequestError("the body must be a JSON object", param="body")
    return doc


def _reject(message: str, cause: BaseException | None = None) -> NoReturn:
    raise RequestError(message, param="body") from cause


def _check_depth(data: bytes) -> None:
    """RequestError if arrays and objects nest deeper than :data:`MAX_DEPTH`, counting only
    brackets outside strings (exact for valid JSON; invalid JSON fails to parse anyway)."""
    skeleton = data.translate(None, _ESCAPES)
    if skeleton.count(b"[") + skeleton.count(b"{") <= MAX_DEPTH:
        return
    if b'\\"' in skeleton:
        skeleton = skeleton.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Removing two adjacent quotes (a string without brackets) keeps every other character
    # inside or outside a string as it was.
    skeleton = skeleton.translate(None, _NOT_BRACKETS).replace(b'""', b"")
    if b'"' in skeleton:
        skeleton = b"".join(skeleton.split(b'"')[::2])
    brackets = skeleton.translate(_OPEN_CLOSE)
    if brackets.count(b"(") <= MAX_DEPTH:
        return
    depths: Iterator[int] = accumulate(map(_STEP.__getitem__, brackets))
    if next(filter(MAX_DEPTH.__lt__, depths), None) is not None:
        _reject(f"the request body nests arrays and objects more than {MAX_DEPTH} deep")


def _integer(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        _reject(f"the request body has an integer of {len(text.lstrip('-'))} digits; "
                f"at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def _float(text: str) -> int | float:
    value = float(text)
    if not math.isfinite(value):
        _reject(f"the request body has a number too large for a double: {text[:40]}")
    return int(value) if value.is_integer() else value


def _constant(name: str) -> NoReturn:
    _reject(f"the request body has {name}, which is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                _reject(f"the request body has the key {_short(key)} twice in one object")
            seen.add(key)
    return obj


def _short(key: str) -> str:
    return repr(key) if len(key) <= 60 else repr(key[:60]) + "..."


def _check_surrogates(text: str) -> None:
    """RequestError if a string or key of ``text`` (valid JSON) holds a lone surrogate escape
    (a pair such as ``\\ud83d\\ude00`` is one character and is fine)."""
    lone = _SURROGATE_ESCAPE.search(_BACKSLASH_OR_PAIR.sub("", text))
    if lone is not None:
        _reject(f"the request body has a lone surrogate {lone.group().lower()} in a string; "
                "strings must be valid Unicode")
