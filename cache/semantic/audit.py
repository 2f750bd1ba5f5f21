"""The false-hit audit: a sampled share of hits re-asked upstream, off the request path.

::

    flow, after a hit is served -> Auditor.offer(req, answer, exact)   O(1), never awaits
        sampled at --audit-rate R (exact hits too, as the control, while they are fewer
        than the semantic audits); a full queue drops the audit (counted ``dropped``)
    worker (Auditor.run) -> ask(req, origin): the request sent upstream again (the front
        end's callable: with the operator's key where one is configured) -> spent(req, fresh)
        -> Judge.disagree(api, served, fresh) -> the tallies (per namespace and overall)
        -> the bound (--max-false-hit-rate) -> the pair, labelled, to --audit-pairs

The default judge (:class:`AnswerJudge`) compares the two answers' texts (:func:`answer_text`,
per API shape): the tier's embedder on both (cosine under ``threshold``: they differ) and the
rules of :mod:`.rules` (numbers, names, negation) on them. An LLM judge asked through the
upstream is another :class:`Judge`; none ships (see the README's False-hit audit).

The estimate: of n audited semantic hits the judge disagreed on k; on the control (exact hits,
the same answer by construction) it disagreed on a share p0 (sampling noise at temperature
> 0, or the judge's own error). The false-hit rate is (k/n - p0) / (1 - p0), clipped to [0, 1],
its 95% interval the Wilson interval of k/n corrected the same way (the upper end with the
control's lower end, the lower end with its upper end, so the control's own noise widens it).

The bound: with ``max_rate`` F, once a namespace has enough audits at its present floor that a
clean record could show it under F (z^2 (1 - F) / F of them, 381 for F = 0.01), an upper end
over F (or, after 30, a lower end over F) raises its similarity floor by ``step`` (and past
``cap`` turns the tier off there); an
upper end under F lowers it a step. Each change starts the namespace's evidence afresh, is
logged, and is listed in :meth:`Auditor.stats`. A namespace turned off gets no hits, so no
evidence: after ``hold`` seconds it is tried again at the top floor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np

from promptcache.cache.entry import Answer
from promptcache.cache.savings import BoundedLabels
from promptcache.cache.semantic.rules import CHECKS, RULES

if TYPE_CHECKING:
    from promptcache.cache.request import Prepared
    from promptcache.cache.semantic.embedding import BatchingEmbedder

log = logging.getLogger(__name__)

#: z of a two-sided 95% interval.
Z95: Final = 1.959964
#: Audits waiting for the worker, at most; past it an offer is dropped (never queued behind).
QUEUE: Final = 64
#: Characters of an answer the judge's embedder reads (a prefix of a longer one).
JUDGE_CHARS: Final = 2000
#: Audits in a namespace's window before its lower end alone may raise the floor.
MIN_AUDITS: Final = 30
#: Changes of the bound kept for /stats.
CHANGES_KEPT: Final = 50

#: Sends ``req`` upstream again and returns its answer (None if the call failed). ``origin`` is
#: what the front end passed to :meth:`Auditor.offer` with it (the sidecar: its exchange, for
#: the caller's headers when no operator key is configured).
Ask = Callable[["Prepared", Any], Awaitable[Answer | None]]
#: Counts an audit's upstream call against the savings (:meth:`Savings.spent`).
Spent = Callable[["Prepared", Answer | None], None]


class Judge(Protocol):
    """Decides whether a fresh answer disagrees with the one served."""

    async def disagree(self, api: str, served: Answer, fresh: Answer) -> bool: ...


def _json(answer: Answer) -> Any:
    body = zlib.decompress(answer.body) if answer.deflated else answer.body
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def answer_text(api: str, answer: Answer) -> str | None:
    """The generated text of an answer (chat, completions, Anthropic messages, Responses);
    None for a body of another shape (an embeddings answer, an error)."""
    doc = _json(answer)
    if not isinstance(doc, dict):
        return None
    parts: list[str] = []
    if api in ("chat", "completions"):
        for choice in doc.get("choices") or []:
            if isinstance(choice, dict):
                msg = choice.get("message")
                text = msg.get("content") if isinstance(msg, dict) else choice.get("text")
                if isinstance(text, str):
                    parts.append(text)
    elif api == "messages":
        parts = [b["text"] for b in doc.get("content") or []
                 if isinstance(b, dict) and isinstance(b.get("text"), str)]
    elif api == "responses":
        for item in doc.get("output") or []:
            for c in (item.get("content") or []) if isinstance(item, dict) else []:
                if isinstance(c, dict) and isinstance(c.get("text"), str):
                    parts.append(c["text"])
    return "\n".join(parts) if parts else None


class AnswerJudge:
    """The default judge: the answers' texts differ if their embeddings' cosine is under
    ``threshold`` or a rule (numbers, names, negation) says they differ; bodies without a
    text are compared byte for byte."""

    def __init__(self, embedder: BatchingEmbedder, *, threshold: float = 0.9,
                 rules: tuple[str, ...] = RULES) -> None:
        self.embedder = embedder
        self.threshold = threshold
        self.rules = rules

    async def disagree(self, api: str, served: Answer, fresh: Answer) -> bool:
        a, b = answer_text(api, served), answer_text(api, fresh)
        if a is None or b is None:
            return (a, served.body if a is None else b"") != (b, fresh.body if b is None
                                                              else b"")
        if a == b:
            return False
        vectors = await self.embedder.embed_background([a[:JUDGE_CHARS], b[:JUDGE_CHARS]])
        if float(np.dot(vectors[0], vectors[1])) < self.threshold:
            return True
        return not await asyncio.to_thread(self._rules_agree, a, b)

    def _rules_agree(self, a: str, b: str) -> bool:
        return all(CHECKS[name](a, b) for name in self.rules)


# -- the estimator ---------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials ((0, 1) for none)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def corrected(p: float, p0: float) -> float:
    """A disagreement rate less the control's: (p - p0) / (1 - p0), clipped to [0, 1]."""
    if p0 >= 1:
        return 0.0
    return min(1.0, max(0.0, (p - p0) / (1 - p0)))


@dataclass(slots=True)
class Tally:
    """Audits and disagreements."""

    audited: int = 0
    disagreed: int = 0

    def add(self, disagreed: bool) -> None:
        self.audited += 1
        self.disagreed += int(disagreed)


@dataclass(frozen=True, slots=True)
class Estimate:
    """A false-hit rate corrected for the control, with its 95% interval."""

    rate: float | None
    low: float
    high: float


def estimate(t: Tally, control: Tally) -> Estimate:
    """The corrected false-hit rate of ``t`` (see the module doc)."""
    if t.audited == 0:
        return Estimate(None, 0.0, 1.0)
    lo, hi = wilson(t.disagreed, t.audited)
    c_lo, c_hi = wilson(control.disagreed, control.audited) if control.audited else (0.0, 0.0)
    p0 = control.disagreed / control.audited if control.audited else 0.0
    return Estimate(corrected(t.disagreed / t.audited, p0), corrected(lo, c_hi),
                    corrected(hi, c_lo))


def enough(max_rate: float, z: float = Z95) -> int:
    """Audits after which a clean record's Wilson upper end is under ``max_rate``."""
    return math.ceil(z * z * (1 - max_rate) / max_rate)


# -- the auditor -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Namespace:
    total: Tally = field(default_factory=Tally)
    window: Tally = field(default_factory=Tally)  # since the floor last changed
    level: int = 0  # steps above the configured floor; past the cap: off
    off_since: float = 0.0


@dataclass(frozen=True, slots=True)
class _Job:
    req: Prepared
    served: Answer
    exact: bool
    origin: Any
    query: str
    candidate: str | None


class Auditor:
    """Samples hits, re-asks them upstream in the background, keeps the estimate and the bound.

    ``threshold`` is the configured similarity floor; ``max_rate`` the bound (None: none);
    ``pairs`` a file audited pairs are appended to as ``{"a", "b", "label"}`` lines.
    :meth:`connect` gives it the front end's upstream call; until then offers are ignored.
    """

    def __init__(self, rate: float, judge: Judge, *, threshold: float,
                 max_rate: float | None = None, pairs: str | None = None, step: float = 0.02,
                 cap: float = 0.999, hold: float = 600.0, queue: int = QUEUE,
                 timeout: float = 120.0, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.judge, self.threshold = rate, judge, threshold
        self.max_rate, self.step, self.cap, self.hold = max_rate, step, cap, hold
        self.pairs = Path(pairs) if pairs else None
        self.timeout = timeout
        self._rng = rng or random.Random()
        self._clock = clock
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue)
        self._ask: Ask | None = None
        self._spent: Spent | None = None
        self._labels = BoundedLabels()
        self.namespaces: dict[str, _Namespace] = {}
        self.overall = Tally()
        self.control = Tally()
        self.counts = {"offered": 0, "queued": 0, "dropped": 0, "asked": 0, "failed": 0,
                       "pairs": 0}
        self.changes: deque[dict[str, Any]] = deque(maxlen=CHANGES_KEPT)

    def connect(self, ask: Ask, spent: Spent | None = None) -> None:
        """The front end's upstream call (and where its cost is counted)."""
        self._ask, self._spent = ask, spent

    # -- the request path: O(1) ---------------------------------------------------------

    def offer(self, req: Prepared, served: Answer, *, exact: bool, origin: Any = None,
              candidate: str | None = None) -> None:
        """A hit was served: sample it for an audit (never waits: a full queue drops it).
        ``candidate`` is the matched entry's prompt, for the pairs file."""
        if self._ask is None or req.view is None and not exact:
            return
        self.counts["offered"] += 1
        if self._rng.random() >= self.rate:
            return
        if exact and self.control.audited + self._queue.qsize() > max(50, self.overall.audited):
            return  # the control costs at most as many calls as the semantic audits
        job = _Job(req, served, exact, origin, req.view.text if req.view else "", candidate)
        try:
            self._queue.put_nowait(job)
            self.counts["queued"] += 1
        except asyncio.QueueFull:
            self.counts["dropped"] += 1

    def floor(self, namespace: str, requested: float | None) -> float | None:
        """The similarity floor of a lookup in ``namespace`` (the request's own, if higher);
        None: the semantic tier is off there."""
        ns = self.namespaces.get(namespace)
        base = self.threshold if requested is None else max(requested, self.threshold)
        if ns is None or ns.level == 0:
            return base
        raised = self.threshold + ns.level * self.step
        if raised > self.cap:
            if self._clock() - ns.off_since < self.hold:
                return None
            self._change(namespace, ns, ns.level - 1, "tried again after hold")
            raised = self.threshold + ns.level * self.step
        return max(base, raised)

    # -- the worker ---------------------------------------------------------------------

    async def run(self) -> None:
        """Audit queued hits one at a time, until cancelled."""
        while True:
            job = await self._queue.get()
            try:
                await self.audit(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.counts["failed"] += 1
                log.exception("audit failed")

    async def audit(self, job: _Job) -> None:
        assert self._ask is not None
        self.counts["asked"] += 1
        try:
            async with asyncio.timeout(self.timeout):
                fresh = await self._ask(job.req, job.origin)
        except TimeoutError:
            fresh = None
        if self._spent is not None:
            self._spent(job.req, fresh)
        if fresh is None or not 200 <= fresh.status < 300:
            self.counts["failed"] += 1
            return
        disagreed = await self.judge.disagree(job.req.api, job.served, fresh)
        self.record(job.req.key.namespace, disagreed, exact=job.exact)
        if self.pairs is not None and not job.exact and job.candidate is not None:
            await asyncio.to_thread(self._write_pair, job.query, job.candidate, disagreed)

    def record(self, namespace: str, disagreed: bool, *, exact: bool) -> None:
        """One audit's verdict; the bound is checked after a semantic one."""
        if exact:
            self.control.add(disagreed)
            return
        self.overall.add(disagreed)
        name = self._labels(namespace)
        ns = self.namespaces.setdefault(name, _Namespace())
        ns.total.add(disagreed)
        ns.window.add(disagreed)
        if self.max_rate is not None:
            self._bound(name, ns, self.max_rate)

    def _bound(self, name: str, ns: _Namespace, f: float) -> None:
        if ns.window.audited < MIN_AUDITS:
            return
        est = estimate(ns.window, self.control)
        if est.low > f:  # over F beyond doubt: no need to wait for a full record
            self._change(name, ns, ns.level + 1, f"lower end {est.low:.4f} over {f}")
        elif ns.window.audited < enough(f):
            return
        elif est.high > f:
            self._change(name, ns, ns.level + 1, f"upper end {est.high:.4f} over {f}")
        elif ns.level > 0:
            self._change(name, ns, ns.level - 1, f"upper end {est.high:.4f} under {f}")

    def _change(self, name: str, ns: _Namespace, level: int, why: str) -> None:
        if self.threshold + ns.level * self.step > self.cap and level > ns.level:
            return  # off already
        ns.level, ns.window = level, Tally()
        raised = self.threshold + level * self.step
        off = raised > self.cap
        if off:
            ns.off_since = self._clock()
        change = {"at": time.time(), "namespace": name, "level": level,
                  "floor": None if off else round(raised, 4), "off": off, "why": why}
        self.changes.append(change)
        log.warning("false-hit bound: namespace %r %s (%s)", name,
                    "semantic tier off" if off else f"similarity floor {raised:.4f}", why)

    def _write_pair(self, query: str, candidate: str, disagreed: bool) -> None:
        assert self.pairs is not None
        row = {"a": candidate, "b": query, "label": 0 if disagreed else 1}
        with self.pairs.open("a", encoding="utf-8") as out:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.counts["pairs"] += 1

    # -- reports ------------------------------------------------------------------------

    def exceeded(self, namespace: str) -> bool:
        """Whether the bound holds ``namespace`` above its configured floor (or off)."""
        ns = self.namespaces.get(namespace)
        return ns is not None and ns.level > 0

    def _summary(self, t: Tally) -> dict[str, Any]:
        est = estimate(t, self.control)
        return {"audited": t.audited, "disagreed": t.disagreed,
                "false_hit_rate": None if est.rate is None else round(est.rate, 5),
                "interval": [round(est.low, 5), round(est.high, 5)]}

    def stats(self) -> dict[str, Any]:
        """The /stats "audit" section."""
        namespaces = {}
        for name, ns in self.namespaces.items():
            raised = self.threshold + ns.level * self.step
            namespaces[name] = {**self._summary(ns.total),
                                "floor": None if raised > self.cap else round(raised, 4),
                                "off": raised > self.cap, "bound_exceeded": ns.level > 0}
        p0 = self.control.disagreed / self.control.audited if self.control.audited else None
        return {**self._summary(self.overall), "rate": self.rate, "max_false_hit_rate":
                self.max_rate, "control": {"audited": self.control.audited,
                                           "disagreed": self.control.disagreed, "rate": p0},
                "pending": self._queue.qsize(), **self.counts, "namespaces": namespaces,
                "changes": list(self.changes)}
