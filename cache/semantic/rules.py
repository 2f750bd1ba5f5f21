"""The verifier's rule checks: what two prompts must agree on before one's answer serves both.

- ``numbers``: numbers, dates, amounts and units agree (digits, decimals, number words,
  ordinals, years, times, currency, percentages, "5 kg" vs "5 lb", months, weekdays), in the
  same order;
- ``negation``: both prompts carry the same number of negation cues (not, no, never, n't,
  without, none, nothing, cannot, unable, ...), idioms such as "no matter" and "or not" aside;
- ``entities``: named things agree (capitalised names not at a sentence start, acronyms, code
  identifiers, quoted strings, URLs, file names), and the ones both prompts share appear in
  the same order, so "Alice pays Bob" never matches "Bob pays Alice";
- ``contrast``: no opposite between the words the prompts do not share (enable/disable,
  upload/download, install/uninstall, ...) and no lone content word swapped for another
  ("reset my password" / "reset my PIN"): see :mod:`.contrast`.

Pure functions of two strings; :mod:`.verifier` runs them, :mod:`.scorers` uses their flags
as features. Each considers at most :data:`MAX_TOKENS` tokens of a text and judges a longer
one to disagree (a miss, never a wrong hit). ``numbers`` and ``negation`` cost time linear in
the texts; ``entities`` is linear but for sorting the words the prompts share, and its
searches for words that trade places and for long names stop at :data:`MAX_REORDERED`,
:data:`MAX_READ` and :data:`MAX_SEARCHED`, judging the pair to disagree. The verifier also
bounds the texts' length in characters, before anything reads them.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import re
from collections import Counter
from collections.abc import Iterator

from promptcache.cache.semantic.contrast import contrast_agrees

# --- tokens ------------------------------------------------------------------------------

_URL = r"(?:https?://|www\.)[^\s<>\"']+[^\s<>\"'.,;:!?)\]]"
_TOKEN = re.compile(
    _URL
    + r"|`[^`\n]+`"  # backticked code
    + r"|[$€£¥₹]\s?\d[\d,]*(?:\.\d+)?"  # currency amounts
    + r"|\d+:\d\d(?::\d\d)?"  # times
    + r"|\d[\d,]*(?:\.\d+)?(?:st|nd|rd|th|%|[a-zA-Z]+)?"  # numbers, 5kg, 2nd, 10%
    + r"|[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+(?:\(\))?"  # dotted.names, file.py, a.b()
    + r"|[A-Za-z_]\w*\(\)"  # func()
    + r"|[A-Za-z_]\w*(?:['’][A-Za-z]+)*"  # words, don't, snake_case, mp3
    + r"|[.?!;:\n\"]"  # sentence and quote marks
)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


#: The most tokens (words, numbers, punctuation marks) of one text a check considers, about
#: 3,000 words of prose: a pair with a longer text is judged to disagree (a miss), after
#: one pass of the tokenising regex over it.
MAX_TOKENS = 4_096


def _too_long(*texts: str) -> bool:
    return any(len(t) > MAX_TOKENS and len(_tokens(t)) > MAX_TOKENS for t in texts)


def iter_words(text: str) -> Iterator[str]:
    """:func:`words`, lazily: reading the first few costs only those."""
    for m in _TOKEN.finditer(text):
        t = m.group(0)
        if t[0] == "`":
            yield from iter_words(t[1:-1])
        elif t[0].isalnum() or t[0] in "_$€£¥₹":
            yield t.removesuffix("()").casefold().replace("’", "'")


def words(text: str) -> list[str]:
    """Casefolded words, numbers and identifiers, without punctuation.

    Code is compared as written without its markup: `load_dataset()` is load_dataset.
    """
    return list(iter_words(text))


# --- numbers -----------------------------------------------------------------------------

_SMALL = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate(
    "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if w != "_"}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9,
           "trillion": 10**12, "k": 1000, "lakh": 10**5, "crore": 10**7}
_OTHER = {"dozen": 12.0, "half": 0.5, "quarter": 0.25, "twice": 2.0, "double": 2.0,
          "triple": 3.0, "once": 1.0}
_ORDINALS = {w: i + 1 for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
    "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth "
    "twentieth".split())} | {"thirtieth": 30, "hundredth": 100, "last": -1}
_UNITS = {
    "kg": "kg", "kgs": "kg", "kilo": "kg", "kilos": "kg", "kilogram": "kg", "kilograms": "kg",
    "g": "g", "gram": "g", "grams": "g", "mg": "mg", "lb": "lb", "lbs": "lb", "pound": "lb",
    "pounds": "lb", "oz": "oz", "ounce": "oz", "ounces": "oz", "ton": "t", "tons": "t",
    "tonne": "t", "tonnes": "t", "km": "km", "kms": "km", "kilometer": "km", "kilometers": "km",
    "kilometre": "km", "kilometres": "km", "m": "m", "meter": "m", "meters": "m",
    "metre": "m", "metres": "m", "cm": "cm", "mm": "mm", "mile": "mi", "miles": "mi",
    "mi": "mi", "ft": "ft", "foot": "ft", "feet": "ft", "inch": "in", "inches": "in",
    "yard": "yd", "yards": "yd", "l": "l", "liter": "l", "liters": "l", "litre": "l",
    "litres": "l", "ml": "ml", "gallon": "gal", "gallons": "gal", "kb": "kb", "mb": "mb",
    "gb": "gb", "tb": "tb", "ghz": "ghz", "mhz": "mhz", "hz": "hz", "mp": "mp", "w": "w",
    "kw": "kw", "watt": "w", "watts": "w", "v": "v", "volt": "v", "volts": "v", "mph": "mph",
    "kmh": "kmh", "kph": "kmh", "c": "c", "f": "f", "celsius": "c", "fahrenheit": "f",
    "degree": "deg", "degrees": "deg", "year": "yr", "years": "yr", "yr": "yr", "yrs": "yr",
    "month": "mo", "months": "mo", "week": "wk", "weeks": "wk", "day": "d", "days": "d",
    "hour": "h", "hours": "h", "hr": "h", "hrs": "h", "h": "h", "minute": "min",
    "minutes": "min", "min": "min", "mins": "min", "second": "s", "seconds": "s",
    "sec": "s", "secs": "s", "s": "s", "am": "am", "pm": "pm", "percent": "%", "%": "%",
    "dollar": "usd", "dollars": "usd", "usd": "usd", "bucks": "usd", "euro": "eur",
    "euros": "eur", "eur": "eur", "rupee": "inr", "rupees": "inr", "rs": "inr", "inr": "inr",
    "yen": "jpy", "gbp": "gbp", "cents": "cent", "cent": "cent", "bn": "e9",
}
_CURRENCY = {"$": "usd", "€": "eur", "£": "gbp", "¥": "jpy", "₹": "inr"}
_MONTHS = ("january february march april may june july august september october november "
           "december").split()
_MONTH_ABBR = {m[:3]: m for m in _MONTHS if m != "may"} | {"sept": "september"}
_DATE_WORDS = set(_MONTHS) | set(
    "monday tuesday wednesday thursday friday saturday sunday today tomorrow yesterday "
    "tonight weekend".split())
_NUMERIC = re.compile(r"^(\d[\d,]*(?:\.\d+)?)([a-z%]*)$")


def _fmt(value: float) -> str:
    return f"{value:g}"


def _quantity_tokens(text: str) -> list[tuple[str, bool]]:
    """Quantities in order, as (normalised string, hard). Soft ones ("one") may go unmatched."""
    raw = _tokens(text)
    out: list[tuple[str, bool]] = []
    seq = [t.casefold().replace("’", "'") for t in raw]
    i = 0
    while i < len(seq):
        w, orig = seq[i], raw[i]
        nxt = seq[i + 1] if i + 1 < len(seq) else ""
        value: float | None = None
        unit = ""
        hard = True
        consumed = 1
        if w[0] in _CURRENCY:
            value = float(w[1:].strip().replace(",", "") or 0)
            unit = _CURRENCY[w[0]]
        elif re.fullmatch(r"\d+:\d\d(?::\d\d)?", w):
            out.append((f"{w}{_UNITS.get(nxt, '') if nxt in ('am', 'pm') else ''}", True))
            i += 2 if nxt in ("am", "pm") else 1
            continue
        elif (m := _NUMERIC.match(w)) is not None:
            value = float(m.group(1).replace(",", ""))
            suffix = m.group(2)
            if suffix in ("st", "nd", "rd", "th"):
                out.append((f"#{_fmt(value)}", True))
                i += 1
                continue
            if suffix in _SCALES:
                value *= _SCALES[suffix]
            elif suffix:
                unit = _UNITS.get(suffix, suffix)  # "mp3", "4g": kept as written
        elif w in _SMALL or w in _TENS:
            value, consumed = _number_words(seq, i)
            hard = not (w == "one" and consumed == 1)
        elif w in _OTHER:
            value, hard = _OTHER[w], w != "once"  # "once I log in" is not a count
        elif w in _ORDINALS and not (w == "second" and nxt in ("hand", "opinion")):
            out.append((f"#{_ORDINALS[w]}", w != "last"))
            i += 1
            continue
        elif w in _DATE_WORDS or w in _MONTH_ABBR:
            if w not in ("march", "may") or orig[0].isupper() and _near_digit(seq, i):
                out.append((_MONTH_ABBR.get(w, w), True))
            i += 1
            continue
        if value is None:
            i += 1
            continue
        j = i + consumed
        while j < len(seq) and seq[j] in _SCALES and seq[j] != "k":
            value *= _SCALES[seq[j]]
            j += 1
        if not unit and j < len(seq) and seq[j] in _UNITS:
            unit = _UNITS[seq[j]]
            j += 1
        out.append((_fmt(value) + unit, hard))
        i = j
    return out


def _near_digit(seq: list[str], i: int) -> bool:
    return any(0 <= k < len(seq) and seq[k][0].isdigit() for k in (i - 1, i + 1))


def _number_words(seq: list[str], i: int) -> tuple[float, int]:
    total, current, j = 0, 0, i
    while j < len(seq):
        w = seq[j]
        if w in _SMALL:
            current += _SMALL[w]
        elif w in _TENS:
            current += _TENS[w]
        elif w == "hundred":
            current = max(current, 1) * 100
        elif w in _SCALES and w != "k":
            total += max(current, 1) * _SCALES[w]
            current = 0
        elif not (w == "and" and j + 1 < len(seq) and seq[j + 1] in _SMALL | _TENS):
            break
        j += 1
    return float(total + current), j - i


def numbers_agree(query: str, candidate: str) -> bool:
    if _too_long(query, candidate):
        return False
    q, c = _quantity_tokens(query), _quantity_tokens(candidate)
    qc, cc = Counter(s for s, _ in q), Counter(s for s, _ in c)
    if any(hard and qc[s] > cc[s] for s, hard in q):
        return False
    if any(hard and cc[s] > qc[s] for s, hard in c):
        return False
    return _same_order([s for s, _ in q], [s for s, _ in c])


# --- negation ----------------------------------------------------------------------------

_NEGATIONS = set(
    "not no never none nothing nobody nowhere neither nor without cannot unable impossible "
    "nope hardly barely".split())
_NOT_NEGATION = (("no", "matter"), ("no", "doubt"), ("not", "only"), ("or", "not"),
                 ("no", "wonder"), ("if", "not"))


def negation_count(text: str) -> int:
    seq = words(text)
    count = 0
    for i, w in enumerate(seq):
        pair_next = (w, seq[i + 1]) if i + 1 < len(seq) else None
        pair_prev = (seq[i - 1], w) if i > 0 else None
        if pair_next in _NOT_NEGATION or pair_prev in _NOT_NEGATION:
            continue
        if w in _NEGATIONS or w.endswith("n't") or w in ("dont", "doesnt", "didnt", "cant",
                                                          "wont", "isnt", "arent", "shouldnt",
                                                          "wouldnt", "couldnt", "havent"):
            count += 1
    return count


def negation_agrees(query: str, candidate: str) -> bool:
    if _too_long(query, candidate):
        return False
    return negation_count(query) == negation_count(candidate)


# --- named things ------------------------------------------------------------------------

STOPWORDS = set(
    "a an the and or but if of to in on at by for with from as is are was were be been being "
    "am do does did have has had i me my we our you your he she it its they them their this "
    "that these those what which who whom whose why how when where there here can could will "
    "would shall should may might must not no yes so than then too very just also about into "
    "over under after before between any all some more most other such only own same few "
    "each both up down out off again once best good better new way ways people one get make "
    "know think like want need use used using much many thing things".split())
_IDENT = re.compile(r"^(?:\w*_\w+|[a-z]+[A-Z]\w*|[A-Za-z]+\d\w*|[A-Za-z_]\w*(?:\.\w+)+(?:\(\))?"
                    r"|\w+\(\)|`.+`)$")
_QUOTED = re.compile(r"\"([^\"\n]{1,80})\"|“([^”\n]{1,80})”|(?<!\w)'([^'\n]{2,80})'(?!\w)")


def named_things(text: str) -> list[str]:
    """URLs, quoted strings, then names and identifiers as they appear.

    Names are casefolded; URLs and identifiers are kept as written.
    """
    names: list[str] = [m.group(0) for m in re.finditer(_URL, text)]
    body = re.sub(_URL, " ", text)
    names += [" ".join((g or "").split()).casefold()
              for m in _QUOTED.finditer(body) for g in m.groups() if g]
    toks = _tokens(body)
    # "What Is The Best Way To Learn Guitar?": capitals say nothing when function words
    # inside the sentence are capitalised too.
    function = [t for t in toks[1:] if t.casefold() in STOPWORDS and t != "I"]
    title_case = bool(function) and sum(t[0].isupper() for t in function) >= 0.5 * len(function)
    start = True
    for t in toks:
        if t in ".?!:;\n":
            start = True
            continue
        if t == '"':
            continue
        if _IDENT.match(t):
            names.append(t.strip("`"))
        elif t[0].isalpha():
            is_acronym = len(t) >= 2 and t.isupper() and t.isalpha()
            capital = t[0].isupper() and not start and not title_case
            if (is_acronym or capital) and t != "I" and t.casefold() not in STOPWORDS:
                names.append(t.casefold())
        start = False
    return names


def names_agree(query: str, candidate: str) -> bool:
    """Every named thing of each prompt appears in the other, and no two named things or
    content words trade places ("Why are westerners more polite than Asians?" / "Why are
    Asians more polite than westerners?").

    Linear in the texts but for sorting the shared words; the search for swaps is bounded
    by :data:`MAX_REORDERED` and :data:`MAX_READ` (see :func:`_swapped`), and the searches
    for names of more than a few words by :data:`MAX_SEARCHED`.
    """
    if _too_long(query, candidate):
        return False
    q, c = named_things(query), named_things(candidate)
    q_text, c_text = _Words(query), _Words(candidate)
    q_runs, c_runs = {_run(n) for n in set(q)}, {_run(n) for n in set(c)}
    content: set[tuple[str, ...]] = {(w,) for w in set(q_text.words) & set(c_text.words)
                                     if w not in STOPWORDS and not w.isdigit()}
    pair = _Pair(q_text, c_text)  # one budget for both searches for swaps
    try:
        if (any(c_text.first(r) is None for r in q_runs)
                or any(q_text.first(r) is None for r in c_runs)):
            return False
        return not (_swapped(q_runs | c_runs, pair)
                    or _swapped(content, pair, ignore=_SYMMETRIC))
    except _OverBound:
        return False


#: Words that leave two things in symmetric roles: "the difference between X and Y" is the
#: difference between Y and X. Between content words (not names) only these, or nothing
#: ("little black bugs" / "black little bugs"), is word order, not a swap.
_SYMMETRIC = frozenset("and or nor both a an the vs versus".split())

#: Bounds on the search for a swap (names and content words together), each a cap on work
#: that the texts' length alone does not bound. A pair of texts that needs more is judged to
#: have a swap, so the candidate is rejected (a miss, never a wrong hit). Pairs of shared
#: words that come in the other order in the second text, looked at one by one: a reordering
#: that large is a different text, not a paraphrase.
MAX_REORDERED = 10_000
#: Words read between such pairs, in all. Prompts of up to about 300 words with their parts
#: in any order stay under both bounds, and are judged exactly.
MAX_READ = 100_000
#: The bounds hold as stated while the two texts have at most this many distinct words; the
#: words are bit sets, which cost more to combine past it, so the bounds shrink in proportion.
BOUNDS_VOCABULARY = 1_024
#: Characters read, in all, to find the names of more than :data:`_RUN_TABLE` words
#: (quoted phrases, code) in each text: about 2 ns each. A text quoting so many long phrases
#: that finding them reads more is judged to disagree.
MAX_SEARCHED = 4_000_000
_RUN_TABLE = 4  # runs of up to this many words are looked up in a table, longer ones searched


def _run(name: str) -> tuple[str, ...]:
    """A name as the run of words it must appear as (its casefolded text if it has none)."""
    if name.isascii() and name.isidentifier():  # most names: one word, as words() reads it
        return (name.casefold(),)
    return tuple(words(name)) or tuple(name.casefold().split(" "))


class _Words:
    """A text's words, and where a word or a run of words first occurs in them."""

    def __init__(self, text: str) -> None:
        self.words = words(text)
        self._first = {w: i for i, w in reversed(list(enumerate(self.words)))}
        self._runs: dict[int, dict[tuple[str, ...], int]] = {}
        self._long: dict[tuple[str, ...], int | None] = {}
        self._joined = ""
        self._starts: list[int] = []
        self.searched = 0  # characters read by searches for long runs

    def first(self, run: tuple[str, ...]) -> int | None:
        """The index of the first word of ``run``'s first occurrence, or None.

        Raises :class:`_OverBound` once searches for long runs pass :data:`MAX_SEARCHED`.
        """
        if len(run) == 1:
            return self._first.get(run[0])
        if len(run) <= _RUN_TABLE:  # one table for each length, O(n) to build
            table = self._runs.get(len(run))
            if table is None:
                columns = (self.words[k:] for k in range(len(run)))
                table = self._runs[len(run)] = {
                    r: i for i, r in reversed(list(enumerate(zip(*columns, strict=False))))}
            return table.get(run)
        if run not in self._long:  # quoted phrases, code: a search of the text each
            if not self._joined:
                self._joined = f" {' '.join(self.words)} "
                self._starts = list(itertools.accumulate((len(w) + 1 for w in self.words),
                                                         initial=0))
            at = self._joined.find(f" {' '.join(run)} ")
            self.searched += len(self._joined) if at < 0 else at
            if self.searched > MAX_SEARCHED:
                raise _OverBound
            self._long[run] = None if at < 0 else bisect.bisect_left(self._starts, at)
        return self._long[run]


class _OverBound(Exception):
    """A search for names passed its bound."""


class _Pair:
    """Two texts' words as bit sets (one bit per distinct word), built on first use."""

    def __init__(self, a: _Words, b: _Words) -> None:
        self.a, self.b = a, b
        self._ids: dict[str, int] = {}
        self._bits: tuple[list[int], list[int]] | None = None
        self._masks: dict[tuple[str, ...] | frozenset[str], int] = {}
        self._reordered = self._read = 0  # the swap searches' work so far

    def bits(self) -> tuple[list[int], list[int]]:
        """Each word of ``a`` and of ``b`` as a one-bit mask."""
        if self._bits is None:
            ids = self._ids
            self._bits = ([1 << ids.setdefault(w, len(ids)) for w in self.a.words],
                          [1 << ids.setdefault(w, len(ids)) for w in self.b.words])
        return self._bits

    def spend(self, reordered: int, read: int) -> bool:
        """Count a step of a swap search; True once it passes the bounds."""
        self._reordered += reordered
        self._read += read
        scale = max(1.0, len(self._ids) / BOUNDS_VOCABULARY)
        return self._reordered * scale > MAX_REORDERED or self._read * scale > MAX_READ

    def mask(self, words: tuple[str, ...] | frozenset[str]) -> int:
        """The bits of ``words`` (the ones either text has)."""
        if words not in self._masks:
            self.bits()
            self._masks[words] = sum(1 << self._ids[w] for w in set(words) if w in self._ids)
        return self._masks[words]


def _same_order(a: list[str], b: list[str]) -> bool:
    """The items both lists share come in the same order (first occurrences)."""
    shared = set(a) & set(b)
    fa = list(dict.fromkeys(x for x in a if x in shared))
    fb = list(dict.fromkeys(x for x in b if x in shared))
    return fa == fb


def _swapped(names: set[tuple[str, ...]], pair: _Pair, *,
             ignore: frozenset[str] | None = None) -> bool:
    """Two names trade places around the same words ("Alice pays Bob" / "Bob pays Alice").

    Names that come in another order with other words between them are a rephrasing
    (clauses moved: "S3 is an example in this guide" / "this guide names S3 as an
    example"), not a swap, so only the words between a pair of names decide. With
    ``ignore``, those words do not count as between, and a pair with nothing else between
    it is not a swap either. Names are runs of words, placed by their first occurrence.

    Cost: O(k log k) for k names, plus the reordered pairs and the words between them.
    The names are inserted in ``a``'s order into a list sorted by place in ``b``; the ones
    after the insertion point are those in the other order. For each name y, the sets of
    words between it and each such x are prefixes of one window of each text, taken as
    running ORs of bit masks. Past :data:`MAX_REORDERED` pairs or :data:`MAX_READ` words
    read (counted on ``pair``, across searches; see :data:`BOUNDS_VOCABULARY`), the answer
    is yes.
    """
    a, b = pair.a, pair.b
    placed = sorted((pa, pb, n) for n in names
                    if (pa := a.first(n)) is not None and (pb := b.first(n)) is not None)
    keys: list[int] = []  # the places in b of the names inserted so far, sorted
    seen: list[tuple[int, tuple[str, ...]]] = []  # (place in a, name), in the same order
    for ay, by, y in placed:
        at = bisect.bisect_right(keys, by)
        if at < len(keys):  # names x before y in a and after it in b
            xs = seen[at:]
            lo, hi = min(ax for ax, _ in xs), keys[-1]
            a_bits, b_bits = pair.bits()
            if pair.spend(len(xs), (ay - lo) + (hi - by)):
                return True
            # back[i]: the words a[ay - 1 - i : ay]; ahead[i]: the words b[by : by + i + 1]
            back = list(itertools.accumulate(reversed(a_bits[lo:ay]), operator.or_))
            ahead = list(itertools.accumulate(b_bits[by:hi], operator.or_))
            y_skip = pair.mask(y) | pair.mask(ignore or ())
            for (ax, x), bx in zip(xs, keys[at:], strict=True):
                if _inside(x, y) or _inside(y, x):
                    continue
                keep = ~(pair.mask(x) | y_skip)
                between_a = back[ay - ax - 1] & keep
                between_b = ahead[bx - by - 1] & keep
                union = between_a | between_b
                if not union:
                    if ignore is None:
                        return True
                elif 2 * (between_a & between_b).bit_count() >= union.bit_count():
                    return True
        keys.insert(at, by)
        seen.insert(at, (ay, y))
    return False


def _inside(x: tuple[str, ...], y: tuple[str, ...]) -> bool:
    """``x`` occurs as a run of words in ``y``."""
    if len(x) > len(y):
        return False
    if len(x) == 1:
        return x[0] in y
    return any(y[i:i + len(x)] == x for i in range(len(y) - len(x) + 1))


def opposites_agree(query: str, candidate: str) -> bool:
    """No opposite and no lone swapped content word between the prompts: see
    :mod:`.contrast`."""
    if _too_long(query, candidate):
        return False
    return contrast_agrees(query, candidate, stopwords=_FUNCTION, words=words(query),
                           other=words(candidate))


#: Words that are no content of their own for :mod:`.contrast`: stopwords, the negation
#: cues the ``negation`` rule counts ("can't" / "unable" is no swapped word), and the number
#: words the ``numbers`` rule reads ("two" / "2").
_FUNCTION = frozenset(STOPWORDS | _NEGATIONS | set(_SMALL) | set(_TENS) | set(_SCALES)
                      | set(_OTHER))


RULES = ("numbers", "negation", "entities", "contrast")
CHECKS = {"numbers": numbers_agree, "negation": negation_agrees, "entities": names_agree,
          "contrast": opposites_agree}


def rule_flags(query: str, candidate: str) -> dict[str, bool]:
    """Each rule's verdict (True = agrees), whatever the config says."""
    return {name: check(query, candidate) for name, check in CHECKS.items()}
