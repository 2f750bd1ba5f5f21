"""The false-hit audit: a sampled share of hits re-asked upstream, off the request path.

::

    flow, after a hit is served -> Auditor.offer(req, answer, exact, similarity)   O(1)
        sampled at --audit-rate R (exact hits too, as the control, while they are fewer
        than the semantic audits); a full queue drops the audit (counted ``dropped``)
    worker (Auditor.run): one audit at a time, while the model has no lookup (``busy``)
        -> ask(req, origin): the request sent upstream again (the front end's callable:
        with the operator's key where one is configured) -> spent(req, fresh)
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

The bound: with ``max_rate`` F, each namespace keeps a record of its last ``keep`` (4,096)
audited semantic hits: the similarity of each, the floor it was served under, and the verdict.
A hit served at similarity s would be served under any floor up to s, so the records at or
above a floor t, served under a floor at most t, are a sample of what floor t serves: the
bound reads every candidate floor's estimate from the one record (floors a ``step`` of 0.01
apart from the configured one up to ``cap``), and no change throws evidence away. After each
audit, the present floor is *over* F if its lower end is over F (on 30 audits or more), or,
on a full record (z^2 (1 - F) / F audits: 381 for F = 0.01), if it is not *under* F: its
upper end under F, or its estimate under F/2 on 100 audits or more. An over floor rises at
once to the lowest floor that is under F; if none is, to the lowest one not shown over; and
the tier is turned off in the namespace when every floor above is shown over, or the
highest with 30 audits is over beyond doubt (its lower end over F). Nothing under the floor
is audited, so it comes down only a step at a time, to explore: after a full record at the
present floor that is under F, and only if the record does not show the floor below over
F. Each change is logged and listed in :meth:`Auditor.stats`. A namespace turned
off gets no hits, so no evidence: after ``hold`` seconds it is tried again at the top floor,
its record started afresh.

The worker yields to traffic: it audits one hit at a time, asks and judges only while the
request path's model has no lookup queued and no batch running (``busy``), and drops an
audit that waited ``max_wait`` seconds (counted ``expired``).
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
#: Audits above a floor before its interval alone may call it over (or under) the bound.
MIN_AUDITS: Final = 30
#: Audits above a floor before its estimate may call it under the bound with the margin.
MIN_UNDER: Final = 100
#: A floor whose estimate is under MARGIN * F (on MIN_UNDER audits) is under the bound.
MARGIN: Final = 0.5
#: Audits a namespace's record keeps, the last ones (similarity, floor, verdict).
KEPT: Final = 4096
#: The bound's floors: the configured floor, then a step of this each.
STEP: Final = 0.01
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


def model_busy(embedder: BatchingEmbedder) -> Callable[[], bool]:
    """The auditor's ``busy``: the request path's model has a lookup queued or a batch
    running (O(1))."""
    return lambda: embedder.queued[0] > 0 or embedder.expected_wait() > 0


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


def estimate(t: Tally, control: Tally, z: float = Z95) -> Estimate:
    """The corrected false-hit rate of ``t`` (see the module doc), its interval at ``z``."""
    if t.audited == 0:
        return Estimate(None, 0.0, 1.0)
    lo, hi = wilson(t.disagreed, t.audited, z)
    c_lo, c_hi = (wilson(control.disagreed, control.audited, z) if control.audited
                  else (0.0, 0.0))
    p0 = control.disagreed / control.audited if control.audited else 0.0
    return Estimate(corrected(t.disagreed / t.audited, p0), corrected(lo, c_hi),
                    corrected(hi, c_lo))


def enough(max_rate: float, z: float = Z95) -> int:
    """Audits after which a clean record's Wilson upper end is under ``max_rate``."""
    return math.ceil(z * z * (1 - max_rate) / max_rate)


# -- the bound -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Namespace:
    """A namespace's audits, its floor, and the record the bound chooses the floor from."""

    levels: int  # floors 0 .. levels - 1 (the configured one, then a step each)
    keep: int
    total: Tally = field(default_factory=Tally)
    level: int = 0  # the floor's step above the configured one
    off: bool = False
    off_since: float = 0.0
    since: int = 0  # audits since the floor last changed
    # (level served under, highest level the similarity passes, disagreed) of the last audits
    records: deque[tuple[int, int, bool]] = field(default_factory=deque)
    # what floor k would have served: +1 at a record's served level, -1 past its own level
    # (a difference array, so each floor's tally is a running sum: O(levels) a decision)
    n: list[int] = field(default_factory=list)
    k: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.n, self.k = [0] * (self.levels + 1), [0] * (self.levels + 1)

    def add(self, served: int, passes: int, disagreed: bool) -> None:
        if len(self.records) >= self.keep:
            self._count(*self.records.popleft(), -1)
        self.records.append((served, passes, disagreed))
        self._count(served, passes, disagreed, 1)

    def _count(self, served: int, passes: int, disagreed: bool, sign: int) -> None:
        self.n[served] += sign
        self.n[passes + 1] -= sign
        if disagreed:
            self.k[served] += sign
            self.k[passes + 1] -= sign

    def evidence(self) -> list[Tally]:
        """Per floor k: the recorded audits that floor k would also have served and whose
        floor then was at most k (so they are a sample of what floor k serves)."""
        out, n, k = [], 0, 0
        for level in range(self.levels):
            n, k = n + self.n[level], k + self.k[level]
            out.append(Tally(n, k))
        return out

    def clear(self) -> None:
        self.records.clear()
        self.n, self.k = [0] * (self.levels + 1), [0] * (self.levels + 1)


@dataclass(frozen=True, slots=True)
class _Job:
    req: Prepared
    served: Answer
    exact: bool
    origin: Any
    query: str
    candidate: str | None
    similarity: float | None
    level: int  # the floor it was served under
    at: float  # when it was offered, on the auditor's clock


class Auditor:
    """Samples hits, re-asks them upstream in the background, keeps the estimate and the bound.

    ``threshold`` is the configured similarity floor; ``max_rate`` the bound (None: none);
    ``pairs`` a file audited pairs are appended to as ``{"a", "b", "label"}`` lines;
    ``busy`` says whether the request path's model has work (the worker waits while it has,
    ``pause`` seconds at a time, and drops an audit that has waited ``max_wait`` seconds).
    :meth:`connect` gives it the front end's upstream call; until then offers are ignored.
    """

    def __init__(self, rate: float, judge: Judge, *, threshold: float,
                 max_rate: float | None = None, pairs: str | None = None, step: float = STEP,
                 cap: float = 0.999, hold: float = 600.0, queue: int = QUEUE,
                 keep: int = KEPT, timeout: float = 120.0,
                 busy: Callable[[], bool] | None = None, pause: float = 0.005,
                 max_wait: float = 60.0, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.judge, self.threshold = rate, judge, threshold
        self.max_rate, self.step, self.cap, self.hold = max_rate, step, cap, hold
        self.levels = max(1, int((cap - threshold) / step + 1e-9) + 1)
        self.keep = keep
        self.pairs = Path(pairs) if pairs else None
        self.timeout = timeout
        self.pause, self.max_wait = pause, max_wait
        self._busy = busy or (lambda: False)
        self._rng = rng or random.Random()
        self._clock = clock
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue)
        self._ask: Ask | None = None
        self._spent: Spent | None = None
        self._labels = BoundedLabels()
        self.namespaces: dict[str, _Namespace] = {}
        self.overall = Tally()
        self.control = Tally()
        self.counts = {"offered": 0, "queued": 0, "dropped": 0, "expired": 0, "waited": 0,
                       "asked": 0, "failed": 0, "pairs": 0}
        self.changes: deque[dict[str, Any]] = deque(maxlen=CHANGES_KEPT)

    def connect(self, ask: Ask, spent: Spent | None = None) -> None:
        """The front end's upstream call (and where its cost is counted)."""
        self._ask, self._spent = ask, spent

    def floor_at(self, level: int) -> float:
        """The similarity floor ``level`` steps above the configured one."""
        return round(self.threshold + level * self.step, 6)

    def _passes(self, similarity: float | None, served: int) -> int:
        """The highest floor a hit at ``similarity`` passes (at least the one it passed)."""
        if similarity is None:
            return served
        level = math.floor((similarity - self.threshold) / self.step + 1e-3)
        return min(self.levels - 1, max(served, level))

    # -- the request path: O(1) ---------------------------------------------------------

    def offer(self, req: Prepared, served: Answer, *, exact: bool, origin: Any = None,
              candidate: str | None = None, similarity: float | None = None) -> None:
        """A hit was served: sample it for an audit (never waits: a full queue drops it).
        ``candidate`` is the matched entry's prompt, for the pairs file; ``similarity`` the
        semantic hit's, for the bound."""
        if self._ask is None or req.view is None and not exact:
            return
        self.counts["offered"] += 1
        if self._rng.random() >= self.rate:
            return
        if exact and self.control.audited + self._queue.qsize() > max(50, self.overall.audited):
            return  # the control costs at most as many calls as the semantic audits
        ns = self.namespaces.get(self._labels(req.key.namespace)) if not exact else None
        job = _Job(req, served, exact, origin, req.view.text if req.view else "", candidate,
                   similarity, ns.level if ns is not None else 0, self._clock())
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
        if ns is None:
            return base
        if ns.off:
            if self._clock() - ns.off_since < self.hold:
                return None
            ns.clear()  # its evidence is ``hold`` old, and turned it off: start afresh
            self._change(namespace, ns, self.levels - 1, False, "tried again after hold")
        return max(base, self.floor_at(ns.level))

    # -- the worker ---------------------------------------------------------------------

    async def run(self) -> None:
        """Audit queued hits one at a time, while the request path's model is idle, until
        cancelled."""
        while True:
            job = await self._queue.get()
            try:
                if await self._wait(job):
                    await self.audit(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.counts["failed"] += 1
                log.exception("audit failed")

    async def _wait(self, job: _Job) -> bool:
        """Wait while the request path is busy; False (counted ``expired``) once the audit
        has waited ``max_wait`` since it was offered."""
        waited = False
        while self._busy():
            if self._clock() - job.at > self.max_wait:
                self.counts["expired"] += 1
                return False
            waited = True
            await asyncio.sleep(self.pause)
        self.counts["waited"] += waited
        return True

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
        if not await self._wait(job):  # the call is paid; the judging waits for traffic too
            return
        disagreed = await self.judge.disagree(job.req.api, job.served, fresh)
        self.record(job.req.key.namespace, disagreed, exact=job.exact,
                    similarity=job.similarity, level=job.level)
        if self.pairs is not None and not job.exact and job.candidate is not None:
            await asyncio.to_thread(self._write_pair, job.query, job.candidate, disagreed)

    def record(self, namespace: str, disagreed: bool, *, exact: bool,
               similarity: float | None = None, level: int | None = None) -> None:
        """One audit's verdict (``similarity``: the semantic hit's; ``level``: the floor it
        was served under, by default the namespace's present one); the bound is checked
        after a semantic one."""
        if exact:
            self.control.add(disagreed)
            return
        self.overall.add(disagreed)
        name = self._labels(namespace)
        ns = self.namespaces.get(name)
        if ns is None:
            ns = self.namespaces[name] = _Namespace(self.levels, self.keep)
        ns.total.add(disagreed)
        served = min(self.levels - 1, ns.level if level is None else level)
        ns.add(served, self._passes(similarity, served), disagreed)
        ns.since += 1
        if self.max_rate is not None and not ns.off:
            self._bound(name, ns, self.max_rate)

    def _bound(self, name: str, ns: _Namespace, f: float) -> None:
        """Choose the namespace's floor from its record (see the module doc)."""
        tallies = ns.evidence()
        ests = [estimate(t, self.control) for t in tallies]
        full = enough(f)

        def clearly_over(i: int) -> bool:
            return tallies[i].audited >= MIN_AUDITS and ests[i].low > f

        def under(i: int) -> bool:  # shown under F, or under it with a margin
            n, e = tallies[i].audited, ests[i]
            return (n >= MIN_AUDITS and e.high <= f
                    or n >= MIN_UNDER and e.rate is not None and e.rate <= MARGIN * f)

        def over(i: int) -> bool:  # clearly over F, or not under it on a full record
            return clearly_over(i) or tallies[i].audited >= full and not under(i)

        def why(i: int, verdict: str) -> str:
            e = ests[i]
            return (f"{verdict} at {self.floor_at(i):.4f}: {tallies[i].disagreed} of "
                    f"{tallies[i].audited} disagreed, estimate {e.rate or 0:.4f} "
                    f"[{e.low:.4f}, {e.high:.4f}], F = {f}")

        cur = ns.level
        if over(cur):
            higher = range(cur + 1, self.levels)
            target = next((i for i in higher if under(i)), None)
            if target is not None:
                self._change(name, ns, target, False,
                             f"{why(cur, 'over')}; {why(target, 'under')}")
                return
            known = [i for i in higher if tallies[i].audited >= MIN_AUDITS]
            target = next((i for i in higher if not over(i)), None)
            if target is None or known and clearly_over(known[-1]):
                top = known[-1] if known else cur
                self._change(name, ns, cur, True, why(top, "over even"))
            else:  # nothing above shown under: the lowest floor not shown over
                self._change(name, ns, target, False, f"{why(cur, 'over')}; "
                             f"{self.floor_at(target):.4f} is not shown over")
        elif cur > 0 and ns.since >= full and under(cur) and not over(cur - 1):
            self._change(name, ns, cur - 1, False, f"{why(cur, 'under')}; a step down")

    def _change(self, name: str, ns: _Namespace, level: int, off: bool, why: str) -> None:
        ns.level, ns.off, ns.since = level, off, 0
        if off:
            ns.off_since = self._clock()
        floor = self.floor_at(level)
        change = {"at": time.time(), "namespace": name, "level": level,
                  "floor": None if off else floor, "off": off, "why": why}
        self.changes.append(change)
        log.warning("false-hit bound: namespace %r %s (%s)", name,
                    "semantic tier off" if off else f"similarity floor {floor:.4f}", why)

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
        return ns is not None and (ns.level > 0 or ns.off)

    def _summary(self, t: Tally) -> dict[str, Any]:
        est = estimate(t, self.control)
        return {"audited": t.audited, "disagreed": t.disagreed,
                "false_hit_rate": None if est.rate is None else round(est.rate, 5),
                "interval": [round(est.low, 5), round(est.high, 5)]}

    def stats(self) -> dict[str, Any]:
        """The /stats "audit" section."""
        namespaces = {}
        for name, ns in self.namespaces.items():
            namespaces[name] = {**self._summary(ns.total),
                                "floor": None if ns.off else self.floor_at(ns.level),
                                "off": ns.off, "bound_exceeded": ns.level > 0 or ns.off,
                                "recorded": len(ns.records),
                                "floors": {f"{self.floor_at(i):.2f}": [t.audited, t.disagreed]
                                           for i, t in enumerate(ns.evidence()) if t.audited}}
        p0 = self.control.disagreed / self.control.audited if self.control.audited else None
        return {**self._summary(self.overall), "rate": self.rate, "max_false_hit_rate":
                self.max_rate, "control": {"audited": self.control.audited,
                                           "disagreed": self.control.disagreed, "rate": p0},
                "pending": self._queue.qsize(), **self.counts, "namespaces": namespaces,
                "changes": list(self.changes)}
