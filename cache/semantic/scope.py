"""What a semantic match may differ in: only the wording of the final user message.

:func:`semantic_view` splits a request into its *scope* (a digest of everything else:
tenant, namespace, endpoint, variant (query string, version headers), model, every
generation parameter, tools, the system prompt and all earlier turns) and its *text*
(the final user message). Two requests can share a semantic entry only if their scopes
are identical; only their texts are compared by meaning. Requests whose final turn is
not plain user text (an image, a tool result, a list of prompts, an embeddings call) get
no view: they are cached exactly or not at all. For the Responses API the text is
``input`` when it is a string, else its last item when that is a user message of text;
``instructions``, like a system prompt, stays in the scope.

The earlier turns of a chat (or Anthropic messages) enter the scope byte for byte in
``strict`` mode, the default. In ``dependent`` mode (:data:`CONTEXT_MODES`) the leading
system messages still do, but the other turns, when all are plain user or assistant text,
are replaced: by a ``standalone`` marker when the final message does not depend on them,
else by the facts it depends on (:func:`~.context.context_facts`: each user turn's numbers,
names and negations as the verifier's rules read them, each assistant turn's words, small
talk left out); and the text is the final message without a leading acknowledgement
("Thanks! ..."). Requests without earlier turns get the same view in both modes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

from promptcache.cache.api import Api
from promptcache.cache.keys import canonical_json, keyed_fields
from promptcache.cache.semantic.context import (
    context_facts,
    depends_on_history,
    without_acknowledgement,
)

_SCOPE_VERSION: Final = b"promptcache/scope/v2"
#: How the earlier turns of a multi-turn chat enter the scope: ``strict``, byte for byte;
#: ``dependent``, not at all when the final message stands alone, else their facts
#: (:mod:`.context`).
CONTEXT_MODES: Final = ("strict", "dependent")
#: The APIs' default sampling temperature, for requests that do not set one.
DEFAULT_TEMPERATURE: Final = 1.0


#: Content part types that hold only text: chat's and Anthropic's ``text``, the Responses
#: API's ``input_text``.
_TEXT_PARTS: Final = frozenset({"text", "input_text"})


@dataclass(frozen=True, slots=True)
class SemanticView:
    """What a request may be matched on: its scope digest and its final user text."""

    scope: str  # 32 hex digits
    text: str


def _text_of(content: Any) -> str | None:
    """Plain text of a message's content; None if it holds anything but text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") in _TEXT_PARTS
                    and isinstance(part.get("text"), str)
                    and set(part) <= {"type", "text", "cache_control"}):
                return None
            parts.append(part["text"])
        return "\n".join(parts)
    return None


def _history(earlier: list[Any], text: str) -> list[Any] | None:
    """The ``dependent`` form of a chat's earlier messages: leading system messages as they
    are, then one marker for the rest (standalone, or the facts the final ``text`` depends
    on); None (strict) when any of the rest is not a plain user or assistant text."""
    lead = 0
    while lead < len(earlier) and isinstance(earlier[lead], dict) \
            and earlier[lead].get("role") in ("system", "developer"):
        lead += 1
    turns = []
    for m in earlier[lead:]:
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant")
                and set(m) <= {"role", "content"}):
            return None
        turn = _text_of(m.get("content"))
        if turn is None:
            return None
        turns.append((str(m["role"]), turn))
    if not turns:
        return None
    if not depends_on_history(text, [t for _, t in turns]):
        return [*earlier[:lead], {"context": "standalone"}]
    return [*earlier[:lead], {"context": context_facts(turns, text)}]


def _split(api: Api, body: dict[str, Any], ignore: Collection[str] = (),
           context: str = "strict") -> tuple[dict[str, Any], str] | None:
    rest = keyed_fields(body, ignore)
    if api in ("chat", "messages"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "user":
            return None
        text = _text_of(last.get("content"))
        if text is None:
            return None
        shape = {k: v for k, v in last.items() if k != "content"}
        earlier = _history(messages[:-1], text) if context == "dependent" else None
        rest["messages"] = [*(earlier or messages[:-1]), shape]
        return rest, text if earlier is None else without_acknowledgement(text)
    if api == "completions":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        del rest["prompt"]
        return rest, prompt
    if api == "responses":
        return _split_input(body.get("input"), rest)
    return None


def _split_input(items: Any, rest: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """A Responses API request's final user text: ``input`` itself if a string, else its
    last item if a user message (``type: "message"`` or none) of text; ``rest`` keeps the
    earlier items and the last one's shape."""
    if isinstance(items, str):
        rest.pop("input", None)
        return rest, items
    if not isinstance(items, list) or not items:
        return None
    last = items[-1]
    if not (isinstance(last, dict) and last.get("role") == "user"
            and last.get("type", "message") == "message"):
        return None
    text = _text_of(last.get("content"))
    if text is None:
        return None
    rest["input"] = [*items[:-1], {k: v for k, v in last.items() if k != "content"}]
    return rest, text


def semantic_view(api: Api, endpoint: str, body: dict[str, Any], *, tenant: str,
                  namespace: str, variant: str = "", normalised: bool = False,
                  ignore: Collection[str] = (), context: str = "strict"
                  ) -> SemanticView | None:
    """The scope and text of a request, or None if it cannot be matched by meaning;
    ``variant`` and ``ignore`` as for :func:`~promptcache.cache.keys.request_key`;
    ``context`` one of :data:`CONTEXT_MODES` (chat and Anthropic messages only)."""
    split = _split(api, body, ignore, context)
    if split is None:
        return None
    rest, text = split
    if not text.strip():
        return None
    h = hashlib.sha256(_SCOPE_VERSION)
    for part in (tenant.encode(), namespace.encode(), endpoint.encode(), variant.encode()):
        h.update(b"\0" + part)
    h.update(b"\0" + canonical_json(rest, normalised=normalised))
    return SemanticView(h.hexdigest()[:32], text)


def temperature(body: dict[str, Any]) -> float:
    t = body.get("temperature")
    return float(t) if isinstance(t, int | float) and not isinstance(t, bool) else \
        DEFAULT_TEMPERATURE
