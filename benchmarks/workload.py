"""Workloads for ``bench load``, built from real prompts.

Each request is one of:

- ``fresh``: a prompt not sent before (the next one of the prompt file);
- ``exact``: a prompt already sent, byte for byte (the exact tier's case);
- ``paraphrase``: a prompt already sent, rewritten by surface rules: a polite lead-in or
  closing ("Please, ...", "... Thanks!"), a phrase swap from a small table ("how do i" ->
  "how can i", "explain" -> "describe", "can you" -> "could you", ...), or changed final
  punctuation and spacing. Rules, not a model: what they make reads like a rephrasing
  and keeps every number, name and negation, so the verifier has no reason to refuse it;
  whether the semantic tier answers it is what the benchmark measures.

Repeats (exact and paraphrase) pick an earlier prompt with a skew toward the first ones
sent (the i-th of n with index ``n * u**2``, u uniform), as popular prompts recur more.
A ``stream`` share of requests asks for a streamed answer. Everything comes from a seeded
``random.Random``, so a workload is the same on every run.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from promptcache.cache.errors import ConfigError

KINDS = ("fresh", "exact", "paraphrase")
_LEAD_INS = ("Please, ", "Quick question: ", "Hi! ", "Could you help? ")
_CLOSINGS = (" Thanks!", " Thank you.", " Please answer briefly.", " Thanks in advance.")
_SWAPS = (("how do i", "how can I"), ("how can i", "how do I"), ("can you", "could you"),
          ("could you", "can you"), ("explain", "describe"), ("write", "compose"),
          ("what is", "what's"), ("what's", "what is"), ("tell me", "let me know"),
          ("give me", "provide"), ("create", "make"), ("i want", "I would like"))


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a replayed workload, and what kind of repeat it is."""

    kind: str  # one of KINDS
    text: str
    stream: bool

    def body(self, model: str = "gpt-4o-mini") -> bytes:
        payload = {"model": model, "temperature": 0, "stream": self.stream,
                   "messages": [{"role": "user", "content": self.text}]}
        return json.dumps(payload).encode()


@dataclass(frozen=True, slots=True)
class Mix:
    """The shares of repeats, paraphrases and streamed requests in a workload."""

    exact: float = 0.3
    paraphrase: float = 0.2
    stream: float = 0.2

    def __post_init__(self) -> None:
        shares = (self.exact, self.paraphrase, self.stream)
        if any(not 0 <= s <= 1 for s in shares) or self.exact + self.paraphrase > 1:
            raise ConfigError("shares must be in 0..1 and exact + paraphrase at most 1")

    @property
    def fresh(self) -> float:
        return 1.0 - self.exact - self.paraphrase


#: The real chat prompts of the shared datasets, beside the repository (run from its root).
DEFAULT_PROMPTS = "../shared/datasets/chat_prompts.jsonl.gz"


def load_prompts(path: str | Path, *, max_chars: int = 1000, min_chars: int = 8) -> list[str]:
    """Distinct prompts of a JSON-lines file (gzip or plain) with a ``prompt`` field."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"prompt file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    seen: dict[str, None] = {}
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                text = str(json.loads(line).get("prompt", "")).strip()
                if min_chars <= len(text) <= max_chars:
                    seen.setdefault(text)
    return list(seen)


def paraphrase(text: str, variant: int) -> str:
    """A surface rewrite of ``text``; different ``variant`` values give different rewrites,
    and none equals ``text``."""
    out = text
    lowered = text.casefold()
    swaps = [(a, b) for a, b in _SWAPS if re.search(rf"\b{re.escape(a)}\b", lowered)]
    if swaps and variant % 2 == 0:
        a, b = swaps[(variant // 2) % len(swaps)]
        out = re.sub(rf"\b{re.escape(a)}\b",
                     lambda m: b[0].upper() + b[1:] if m.group(0)[0].isupper() else b,
                     out, count=1, flags=re.IGNORECASE)
    style = variant % 3
    if style == 0:
        out = out.rstrip() + _CLOSINGS[variant % len(_CLOSINGS)]
    elif style == 1 and out[:1].isupper() and not out[:2].isupper():
        out = _LEAD_INS[variant % len(_LEAD_INS)] + out[0].lower() + out[1:]
    else:
        out = out.rstrip(" ?.!") + ("?" if variant % 2 else " ?")
    return out if out != text else text + " Thanks!"


def build(prompts: list[str], n: int, mix: Mix, seed: int = 0) -> list[Request]:
    """``n`` requests in the shares of ``mix``. The first request is always fresh."""
    rng = random.Random(seed)
    fresh = iter(prompts)
    sent: list[str] = []
    variants: dict[str, int] = {}
    out: list[Request] = []
    for _ in range(n):
        u = rng.random()
        kind = ("exact" if u < mix.exact else
                "paraphrase" if u < mix.exact + mix.paraphrase else "fresh")
        if not sent:
            kind = "fresh"
        if kind == "fresh":
            text = next(fresh, None)
            if text is None:
                raise ConfigError(f"{len(prompts)} prompts are too few for {n} requests with "
                                  f"a fresh share of {mix.fresh:.0%}")
            sent.append(text)
        else:
            base = sent[int(len(sent) * rng.random() ** 2)]
            if kind == "exact":
                text = base
            else:
                variants[base] = variants.get(base, -1) + 1
                text = paraphrase(base, variants[base] + rng.randrange(1000))
        out.append(Request(kind, text, rng.random() < mix.stream))
    return out
