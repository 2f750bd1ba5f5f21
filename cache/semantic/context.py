"""Whether a final user message depends on the earlier turns, and what of them it depends on.

:func:`depends_on_history` reads the final message of a multi-turn chat (a leading
"Thanks!" aside): it depends on the history when it points back (pronouns and
demonstratives: "it", "that", "those", "the cheaper one"), compares without saying with
what ("Which option is easier?"), continues an elided thought ("and with the TV add-on?",
"what about..."), confirms or declines ("yes please", "sure, go ahead"), is a fragment
(three words or fewer), speaks of the user's own case ("my", "we": "What would annual
billing cost us?"), uses "the" ("How much is the credit?", "Is the rental cheaper?": a
thing it takes as known), or repeats a content word of the earlier turns. Anything else is
*standalone*: one answer serves it whatever came before ("Does Nimbus have a mobile app?").

Some of those cues say nothing about the history, and are not counted: the "I" or "we" of
a question that asks how to do something ("How do I ...", "Where can we ...", "Is there a
way to ..."; not "Can I ...", which asks about the user's own case), when it names what it
is about (two content words, one of them a name: "How do I change my Ledgerly password?";
"How do I add shell completions?" still depends); "the" that the message itself defines
("the difference between ...", "the password of my router", "the Nimbus TV service");
"instead of ..."; and a word the earlier turns said that the message names itself
("Nimbus", "Docker").

:func:`context_facts` is what a dependent message's match must agree on: for every earlier
exchange except small talk, the user turn's facts as the verifier's rules see them (hard
numbers, named things, the negation count; wording aside) and the assistant turn's words
(the answer or offer the user is following up, compared word for word after casefolding).
An exchange is small talk when its user turn holds no fact (an occasion such as "first
time" is none) and answers nothing ("yes", "no"), its reply is short and holds no digit,
and neither shares a content word with the final message or the exchanges that are not
small talk (courtesy words, light verbs such as "go" and "take", and contractions such as
"I'm" are no content): "Hi!" / "Hello! How can I help?", "Sorry, the doorbell rang." / "No
problem, take your time.". :func:`without_acknowledgement` drops a leading "Thanks!" or
"Ok cool." from the final message itself.

Both judge to the safe side: a message wrongly judged dependent keeps its history in the
scope (a miss, as in strict mode); only a dependent message judged standalone could be
served an answer meant for another context, which the cues above are there to catch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from promptcache.cache.semantic import rules

#: Words that point back at something said before.
_BACK: Final = frozenset(
    "it its itself that this those these them they their theirs he she him her his hers "
    "one ones there then same above former latter previous earlier instead either both "
    "else another again such so".split())
#: First-person words: a question about the user's own case is answered from what the
#: earlier turns said about it ("What would annual billing cost us?").
_FIRST_PERSON: Final = frozenset(
    "i me my mine myself we us our ours ourselves i'm i've i'd i'll we're we've we'd "
    "we'll".split())
#: Openings that continue an elided thought.
_ELLIPSIS: Final = ("and ", "or ", "but ", "also ", "what about", "how about", "what if",
                    "and if", "plus ", "only ", "just ", "even ")
#: Words of confirmations, refusals and acknowledgements: a message made only of these
#: answers the last turn.
_CONFIRM: Final = frozenset(
    "yes yeah yep yup sure ok okay okey alright right fine great perfect good sounds works "
    "please do it that go ahead let's lets us proceed confirm confirmed agreed correct no "
    "nope not thanks thank you cool absolutely definitely of course why do so".split())
#: Courtesy words, which small talk shares with everything ("thanks", "sorry to hear that").
_COURTESY: Final = frozenset(
    "hi hello hey thanks thank sorry welcome glad great help helps helpful happy problem "
    "worries fine well today morning day".split())
#: Words of an acknowledgement that may open a message ("Thanks, that helps. How ...").
_ACK: Final = _COURTESY | frozenset(
    "ok okay cool got it that right perfect nice awesome good helps helpful so far much "
    "very you".split())
_SENTENCE: Final = re.compile(r"[^.!?]*[.!?]+\s+")
#: The most words a reply may have and still be small talk.
_SHORT_REPLY: Final = 15
_FRAGMENT: Final = 3
#: Openings of a question that asks how to do something, or whether something exists:
#: their "I", "we" and "there" are anyone's. Not "Can I ...", "Is it possible to ..." or
#: "When can I ...": whether one may, and when, is the user's own case ("Can we get a
#: discount on Ledgerly?").
_GENERIC: Final = re.compile(
    r"(?:(?:how|where) (?:do|can|could) (?:i|we)|what ways? (?:can|could|do) (?:i|we)"
    r"|is there (?:a|any) way to|(?:is|are|was|were) there|will there be)\b")
#: The fewest content words, one of them a name, with which a generic question says what
#: it is about ("Can I pay with PayPal?"; not "How do I add shell completions?", which asks
#: about the tool the earlier turns were about).
_TOPIC: Final = 2
#: What "the" is defined by within the phrase it opens ("the difference between ...").
_OF: Final = frozenset({"of", "between"})
#: Comparatives: without "than" they compare with something said before ("Which option is
#: easier?").
_COMPARATIVE: Final = frozenset(
    "better worse easier harder cheaper dearer pricier faster slower simpler safer quicker "
    "bigger smaller larger lighter heavier newer older higher lower".split())
#: Words too light to tie small talk to the topic ("go on", "take your time").
_LIGHT: Final = frozenset(
    "go goes going get gets got take takes let come see ready time moment minute bit ask "
    "anything else".split())
#: Words that answer a question or an offer: a turn made of them is never small talk.
_ANSWER: Final = frozenset(
    "yes yeah yep yup sure no nope please proceed confirm confirmed agreed ahead correct "
    "absolutely definitely".split())
#: "First time using this chat": an occasion, not a choice among options.
_OCCASION: Final = re.compile(
    r"\b(?:first|second|third|last|1st|2nd|3rd)\s+time\b", re.IGNORECASE)


def _facts(text: str) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    numbers = tuple(sorted(s for s, hard in rules._quantity_tokens(text) if hard))
    names = tuple(sorted({w for n in rules.named_things(text) for w in rules.words(n)
                          if not w.startswith("i'")}))  # "I'll" is no name
    return numbers, names, rules.negation_count(text)


def _function_word(w: str) -> bool:
    """A stopword, a first-person word, or a contraction of one ("I'm", "doesn't")."""
    if "'" in w:
        w = w[:-3] if w.endswith("n't") else w.split("'")[0]
        w = {"ca": "can", "wo": "will", "sha": "shall", "let": "us"}.get(w, w)
    return w in rules.STOPWORDS or w in _FIRST_PERSON


def _defined(seq: Sequence[str], i: int, names: set[str]) -> bool:
    """Whether the phrase that ``seq[i]`` ("the") opens defines itself: it holds a name, or
    its noun is followed by "of" or "between"."""
    j = i + 1
    while j < len(seq) and j <= i + 3 and seq[j] not in rules.STOPWORDS:
        if seq[j] in names:
            return True
        j += 1
    return i + 1 < j < len(seq) and seq[j] in _OF


def depends_on_history(text: str, history: Sequence[str]) -> bool:
    """Whether the final user message ``text`` needs the earlier turns (``history``, their
    texts) to be understood."""
    text = without_acknowledgement(text)
    seq = rules.words(text)
    lowered = " ".join(text.casefold().split())
    if len(seq) <= _FRAGMENT or all(w in _CONFIRM for w in seq):
        return True
    if lowered.startswith(_ELLIPSIS) or "than" not in seq and any(w in _COMPARATIVE
                                                                  for w in seq):
        return True
    names = {w for n in rules.named_things(text) for w in rules.words(n)}
    frame = _GENERIC.match(" ".join(seq))
    topic = [w for w in seq if not _function_word(w) and w not in _BACK]
    generic = frame is not None and len(topic) >= _TOPIC and any(w in names for w in topic)
    skip = len(frame.group(0).split()) if frame is not None and generic else 0
    for i, w in enumerate(seq[skip:], start=skip):
        if w in _BACK and not (w == "instead" and seq[i + 1:i + 2] == ["of"]):
            return True
        if w in _FIRST_PERSON and not generic:
            return True
        if w == "the" and not _defined(seq, i, names):
            return True
    said = {w for turn in history for w in rules.words(turn) if w not in rules.STOPWORDS}
    return any(w not in rules.STOPWORDS and w not in names and w in said for w in seq)


def _content(text: str) -> set[str]:
    return {w for w in rules.words(text)
            if not _function_word(w) and w not in _COURTESY and w not in _LIGHT}


def _may_be_small_talk(user: str, reply: str | None) -> bool:
    """An exchange without facts or answers, whose reply is short and holds no digit."""
    said = rules.words(user)
    if any(_facts(_OCCASION.sub(" ", user))[:2]) or rules.negation_count(user) \
            or said and all(w in _CONFIRM for w in said) and any(w in _ANSWER for w in said):
        return False
    return reply is None or (len(rules.words(reply)) <= _SHORT_REPLY
                             and not any(c.isdigit() for c in reply))


_SPACE = re.compile(r"\s+")


def without_acknowledgement(text: str) -> str:
    """``text`` without leading sentences that only acknowledge ("Thanks!", "Ok cool.",
    "Great, thanks."), when something is left."""
    rest = text.lstrip()
    while (m := _SENTENCE.match(rest)) and m.end() < len(rest):
        said = rules.words(m.group(0))
        if not said or not all(w in _ACK for w in said):
            break
        rest = rest[m.end():]
    return rest


def _exchanges(turns: Sequence[tuple[str, str]]) -> list[tuple[int, int]]:
    """``turns`` cut into exchanges, as (start, end) indices: a user turn with the reply
    that follows it, or a lone turn."""
    out = []
    i = 0
    while i < len(turns):
        pair = turns[i][0] == "user" and i + 1 < len(turns) and turns[i + 1][0] == "assistant"
        out.append((i, i + 2 if pair else i + 1))
        i += 2 if pair else 1
    return out


def _small_talk(turns: Sequence[tuple[str, str]], exchanges: list[tuple[int, int]],
                final: str) -> set[int]:
    """The exchanges (by index) that are small talk: each may be, and none shares a content
    word with the final message or an exchange that is not small talk (the largest such
    set: two small-talk exchanges may share words, "quick note" / "quick reply")."""
    words = [_content(t) for _, t in turns]
    talk = {k for k, (a, b) in enumerate(exchanges) if turns[a][0] == "user"
            and _may_be_small_talk(turns[a][1], turns[a + 1][1] if b > a + 1 else None)}
    while True:
        kept = _content(final).union(*(words[i] for k, (a, b) in enumerate(exchanges)
                                        if k not in talk for i in range(a, b)))
        still = {k for k in talk if not any(words[i] & kept for i in range(*exchanges[k]))}
        if still == talk:
            return talk
        talk = still


def context_facts(turns: Sequence[tuple[str, str]], final: str) -> list[list[object]]:
    """The normalised form of ``turns`` (role, text; user and assistant alternating) that a
    dependent message ``final``'s match must agree on, small talk left out."""
    out: list[list[object]] = []
    exchanges = _exchanges(turns)
    talk = _small_talk(turns, exchanges, final)
    for k, (a, b) in enumerate(exchanges):
        if k in talk:
            continue
        for role, text in turns[a:b]:
            if role == "user":
                numbers, names, negations = _facts(text)
                out.append(["user", list(numbers), list(names), negations])
            else:
                out.append(["assistant", " ".join(rules.words(_SPACE.sub(" ", text)))])
    return out
