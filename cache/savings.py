"""What the cache saved: the tokens of every answer served from it, and what they would
have cost, by model, namespace and tenant; less what the cache made callers spend.

A hit (HIT or SEMANTIC-HIT) saved the upstream call that made the stored answer: its
``usage`` (:func:`usage_of`: OpenAI's ``prompt_tokens``/``completion_tokens``, Anthropic's
and the Responses API's ``input_tokens``/``output_tokens``, the embeddings API's
``prompt_tokens``) priced by the operator's :class:`PriceTable` (``--prices FILE``, TOML; see
``docs/prices.example.toml``; no price is ever fetched from anywhere). Calls the cache
itself caused count against the savings (:meth:`Savings.spent`): a single-flight
follower that waited for a leader and then called upstream after all, and every call of
the false-hit audit (:mod:`promptcache.cache.semantic.audit`), which re-asks the upstream.

Reading a hit's usage costs one JSON parse per entry, not per hit: the model and usage of
recent entries are memoised by digest (a bounded dict). Every label set is bounded too
(:class:`BoundedLabels`: at most ``max_labels`` models, namespaces, tenants and
model-namespace pairs; the rest are counted under ``other``), so hostile traffic cannot grow
memory or the metrics' cardinality without bound.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from promptcache.cache.entry import Answer
from promptcache.cache.errors import ConfigError
from promptcache.cache.keys import TENANT_TAG_LEN
from promptcache.cache.options import read_toml

if TYPE_CHECKING:  # the price table is read by the configuration, which loads no engine
    from promptcache.cache.request import Prepared

#: The bucket of label values past the bound.
OTHER: Final = "other"
#: Distinct values kept per dimension (models, namespaces, tenants, model-namespace pairs).
MAX_LABELS: Final = 1000
#: Entries whose model and usage are memoised.
MEMO_ENTRIES: Final = 4096
#: Longest model name kept as a label (a longer one is cut).
MAX_MODEL_CHARS: Final = 128
DEFAULT_CURRENCY: Final = "USD"
#: The model of an answer and request that name none.
UNKNOWN: Final = "unknown"
_PRICE_KEYS: Final = ("input_per_million", "output_per_million", "cached_input_per_million")
_REQUIRED: Final = ("input_per_million", "output_per_million")


# -- the price table -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices, per million tokens; cached input at the input price if unset."""

    input_per_million: float
    output_per_million: float
    cached_input_per_million: float | None = None

    def cost(self, usage: Usage) -> float:
        cached = min(usage.cached, usage.input)
        cached_price = (self.input_per_million if self.cached_input_per_million is None
                        else self.cached_input_per_million)
        return ((usage.input - cached) * self.input_per_million + cached * cached_price
                + usage.output * self.output_per_million) / 1e6


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Prices by model name: matched exactly, else by the longest name in the table that
    the model's name starts with (``gpt-4o-mini`` prices ``gpt-4o-mini-2024-07-18``)."""

    models: Mapping[str, Price]
    currency: str = DEFAULT_CURRENCY

    def lookup(self, model: str) -> Price | None:
        price = self.models.get(model)
        if price is not None:
            return price
        best = max((name for name in self.models if model.startswith(name)), key=len,
                   default=None)
        return None if best is None else self.models[best]


def load_prices(path: str) -> PriceTable:
    """The price table in the TOML file ``path``; ConfigError (naming the file, and the
    line or key) if it cannot be read or is not a valid table."""
    return parse_prices(read_toml(path, "price table"), source=path)


def parse_prices(data: Mapping[str, Any], *, source: str = "price table") -> PriceTable:
    """A :class:`PriceTable` from parsed TOML: ``currency = "USD"`` and a ``[models."NAME"]``
    table per model with ``input_per_million``, ``output_per_million`` and optionally
    ``cached_input_per_million``. Anything else is a ConfigError naming the key."""
    unknown = set(data) - {"currency", "models"}
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))} (expected "
                          "currency and [models.\"NAME\"] tables)")
    currency = data.get("currency", DEFAULT_CURRENCY)
    if not isinstance(currency, str) or not currency.strip() or len(currency) > 16:
        raise ConfigError(f"{source}: currency must be a short name such as \"USD\", got "
                          f"{currency!r}")
    models = data.get("models", {})
    if not isinstance(models, Mapping):
        raise ConfigError(f"{source}: models must be a table of [models.\"NAME\"] tables")
    return PriceTable({name: _price(source, name, entry) for name, entry in models.items()},
                      currency.strip())


def _price(source: str, name: str, entry: Any) -> Price:
    where = f"{source}: models.{json.dumps(name)}"
    if not name:
        raise ConfigError(f"{where}: a model name must not be empty")
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a table with input_per_million and "
                          "output_per_million")
    unknown = set(entry) - set(_PRICE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (expected "
                          f"{', '.join(_PRICE_KEYS)})")
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    values: dict[str, float] = {}
    for key, value in entry.items():
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or value < 0):
            raise ConfigError(f"{where}.{key} must be a number >= 0 (a price per million "
                              f"tokens), got {value!r}")
        values[key] = float(value)
    return Price(**values)


# -- usage -----------------------------------------------------------------------------------


class Usage(NamedTuple):
    """Tokens of one answer: ``input`` (including ``cached``, the prompt-cache reads) and
    ``output``."""

    input: int
    output: int
    cached: int = 0


NO_USAGE: Final = Usage(0, 0)


def _count(doc: Mapping[str, Any], key: str) -> int:
    value = doc.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_of(api: str, doc: Any) -> Usage:
    """The tokens in a (non-streaming) answer's ``usage``; zero where it has none.

    OpenAI chat/completions: ``prompt_tokens`` (``prompt_tokens_details.cached_tokens`` of
    them cached) and ``completion_tokens``; embeddings: ``prompt_tokens``; Anthropic
    messages: ``input_tokens`` plus ``cache_read_input_tokens`` (cached) and
    ``cache_creation_input_tokens``, and ``output_tokens``; the Responses API:
    ``input_tokens`` (``input_tokens_details.cached_tokens`` cached) and ``output_tokens``.
    """
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return NO_USAGE
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        details = usage.get("prompt_tokens_details")
        cached = _count(details, "cached_tokens") if isinstance(details, dict) else 0
        return Usage(_count(usage, "prompt_tokens"), _count(usage, "completion_tokens"),
                     cached)
    if api == "messages":  # input_tokens leaves out the prompt cache's reads and writes
        read = _count(usage, "cache_read_input_tokens")
        return Usage(_count(usage, "input_tokens") + read
                     + _count(usage, "cache_creation_input_tokens"),
                     _count(usage, "output_tokens"), read)
    details = usage.get("input_tokens_details")
    cached = _count(details, "cached_tokens") if isinstance(details, dict) else 0
    return Usage(_count(usage, "input_tokens"), _count(usage, "output_tokens"), cached)


def read_answer(api: str, body: bytes) -> tuple[str | None, Usage]:
    """The model an answer names (None if none) and its usage; (None, no usage) for a body
    that is not a JSON object."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, NO_USAGE
    if not isinstance(doc, dict):
        return None, NO_USAGE
    model = doc.get("model")
    return (model if isinstance(model, str) else None), usage_of(api, doc)


# -- the tallies -----------------------------------------------------------------------------


class BoundedLabels:
    """At most ``cap`` distinct label values; every value past them is :data:`OTHER`."""

    __slots__ = ("cap", "_seen")

    def __init__(self, cap: int = MAX_LABELS) -> None:
        self.cap = cap
        self._seen: set[Any] = set()

    def __call__(self, value: Any, other: Any = OTHER) -> Any:
        if value in self._seen:
            return value
        if len(self._seen) >= self.cap:
            return other
        self._seen.add(value)
        return value

    def __len__(self) -> int:
        return len(self._seen)


class Tally:
    """Saved and spent figures of one label (or of everything)."""

    __slots__ = ("hits", "input", "output", "cost", "calls", "spent_input", "spent_output",
                 "spent_cost")

    def __init__(self) -> None:
        self.hits = self.input = self.output = 0
        self.calls = self.spent_input = self.spent_output = 0
        self.cost = self.spent_cost = 0.0

    def save(self, usage: Usage, cost: float) -> None:
        self.hits += 1
        self.input += usage.input
        self.output += usage.output
        self.cost += cost

    def spend(self, usage: Usage, cost: float) -> None:
        self.calls += 1
        self.spent_input += usage.input
        self.spent_output += usage.output
        self.spent_cost += cost

    def as_dict(self) -> dict[str, Any]:
        """The shape of ``/stats`` ``savings`` (and of each of its ``by_*`` values)."""
        return {
            "hits_counted": self.hits,
            "tokens_saved": {"input": self.input, "output": self.output},
            "cost_saved": round(self.cost, 6),
            "spent": {"calls": self.calls,
                      "tokens": {"input": self.spent_input, "output": self.spent_output},
                      "cost": round(self.spent_cost, 6)},
            "net_cost_saved": round(self.cost - self.spent_cost, 6),
        }


class Savings:
    """The savings of one sidecar (or in-process cache): fed by the cache flow
    (:meth:`hit`, :meth:`spent`), read by ``/stats`` (:meth:`stats`) and ``/metrics``
    (:meth:`series`)."""

    def __init__(self, prices: PriceTable | None = None, *, max_labels: int = MAX_LABELS,
                 memo_entries: int = MEMO_ENTRIES) -> None:
        self.prices = prices or PriceTable({})
        self.total = Tally()
        self._models, self._namespaces, self._tenants, self._pairs = (
            BoundedLabels(max_labels) for _ in range(4))
        self.by_model: dict[str, Tally] = {}
        self.by_namespace: dict[str, Tally] = {}
        self.by_tenant: dict[str, Tally] = {}
        self.by_pair: dict[tuple[str, str], Tally] = {}
        self._priced: dict[str, Price | None] = {}  # model -> price, for labelled models
        self._memo: dict[tuple[str, int, bool], tuple[str | None, Usage]] = {}
        self._memo_entries = memo_entries

    def hit(self, req: Prepared, answer: Answer, digest: str | None = None) -> None:
        """``req`` was answered from the entry ``digest`` (its own key's, if None)."""
        memo_key = (digest or req.key.digest, len(answer.body), answer.deflated)
        read = self._memo.get(memo_key)
        if read is None:
            read = self._read(req, answer)
            if len(self._memo) >= self._memo_entries:
                del self._memo[next(iter(self._memo))]  # the oldest
            self._memo[memo_key] = read
        model, usage = read
        tallies, price = self._tallies(req, model)
        cost = price.cost(usage) if price is not None else 0.0
        for tally in tallies:
            tally.save(usage, cost)

    def spent(self, req: Prepared, answer: Answer | None) -> None:
        """An upstream call the cache made ``req`` make (a single-flight follower's
        fallback; an audit's call): counted against the savings. ``answer``, the call's
        answer (None if it failed), says its tokens."""
        model, usage = self._read(req, answer) if answer is not None else (None, NO_USAGE)
        tallies, price = self._tallies(req, model)
        cost = price.cost(usage) if price is not None else 0.0
        for tally in tallies:
            tally.spend(usage, cost)

    def _read(self, req: Prepared, answer: Answer) -> tuple[str | None, Usage]:
        body = answer.body
        if answer.deflated:
            try:
                body = zlib.decompress(body)
            except zlib.error:
                return None, NO_USAGE
        return read_answer(req.api, body)

    def _tallies(self, req: Prepared, answer_model: str | None
                 ) -> tuple[tuple[Tally, ...], Price | None]:
        """The tallies one event adds to (everything, its model, namespace, tenant and
        model-namespace pair), and the price of its model. The model is the one the answer
        names (a dated snapshot, say), else the one the request asked for."""
        model = answer_model or req.body.get("model")
        model = model[:MAX_MODEL_CHARS] if isinstance(model, str) and model else UNKNOWN
        m = self._models(model)
        ns = self._namespaces(req.key.namespace)
        tenant = self._tenants(req.key.digest[-TENANT_TAG_LEN:])
        pair = self._pairs((m, ns), (OTHER, OTHER))
        return (self.total, _tally(self.by_model, m), _tally(self.by_namespace, ns),
                _tally(self.by_tenant, tenant), _tally(self.by_pair, pair)), self._price(model)

    def _price(self, model: str) -> Price | None:
        if model in self._priced:
            return self._priced[model]
        price = self.prices.lookup(model)
        if len(self._priced) < self._models.cap:
            self._priced[model] = price
        return price

    def unpriced(self) -> list[str]:
        """The models seen that the price table does not price (their tokens are counted,
        at no cost)."""
        return sorted(m for m in self.by_model
                      if m != OTHER and self._price(m) is None)

    def stats(self) -> dict[str, Any]:
        """``/stats`` ``savings``."""
        return {
            **self.total.as_dict(),
            "currency": self.prices.currency,
            "by_model": {k: t.as_dict() for k, t in self.by_model.items()},
            "by_namespace": {k: t.as_dict() for k, t in self.by_namespace.items()},
            "by_tenant": {k: t.as_dict() for k, t in self.by_tenant.items()},
            "unpriced_models": self.unpriced(),
        }

    def series(self) -> Iterator[tuple[str, str, Tally]]:
        """(model, namespace, tally) of every model-namespace pair, for ``/metrics``."""
        for (model, namespace), tally in self.by_pair.items():
            yield model, namespace, tally



def _tally(table: dict[Any, Tally], label: Any) -> Tally:
    tally = table.get(label)
    if tally is None:
        tally = table[label] = Tally()
    return tally
