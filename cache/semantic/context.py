"""Whether a final user message depends on the earlier turns, and what of them it depends on.

:func:`depends_on_history` reads the final message of a multi-turn chat: it depends on the
history when it points back (pronouns and demonstratives: "it", "that", "those", "the
cheaper one"), continues an elided thought ("and with the TV add-on?", "what about..."),
confirms or declines ("yes please", "sure, go ahead"), is a fragment (three words or
fewer), speaks of the user's own case ("my", "we": "What would annual billing cost us?"),
uses "the" ("How much is the credit?", "Is the rental cheaper?": a thing it takes as
known), or repeats a content word of the earlier turns. Anything else is *standalone*: one
answer serves it whatever came before ("Does Nimbus have a mobile app?").

:func:`context_facts` is what a dependent message's match must agree on: for every earlier
exchange except small talk, the user turn's facts as the verifier's rules see them (hard
numbers, named things, the negation count; wording aside) and the assistant turn's words
(the answer or offer the user is following up, compared word for word after casefolding).
An exchange is small talk when its user turn holds no fact, its reply is short and holds
no digit, and neither shares a content word (courtesy words aside) with the rest of the
conversation ("Hi!" / "Hello! How can I help?"). :func:`without_acknowledgement` drops a
leading "Thanks!" or "Ok cool." from the final message itself.

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


def _facts(text: str) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    numbers = tuple(sorted(s for s, hard in rules._quantity_tokens(text) if hard))
    names = tuple(sorted({w for n in rules.named_things(text) for w in rules.words(n)
                          if not w.startswith("i'")}))  # "I'll" is no name
    return numbers, names, rules.negation_count(text)


def depends_on_history(text: str, history: Sequence[str]) -> bool:
    """Whether the final user message ``text`` needs the earlier turns (``history``, their
    texts) to be understood."""
    seq = rules.words(text)
    lowered = " ".join(text.casefold().split())
    if len(seq) <= _FRAGMENT or all(w in _CONFIRM for w in seq):
        return True
    if lowered.startswith(_ELLIPSIS) or any(w in _BACK or w in _FIRST_PERSON for w in seq):
        return True
    said = {w for turn in history for w in rules.words(turn) if w not in rules.STOPWORDS}
    return "the" in seq or any(w not in rules.STOPWORDS and w in said for w in seq)


def _content(text: str) -> set[str]:
    return {w for w in rules.words(text) if w not in rules.STOPWORDS and w not in _COURTESY}


def _small_talk(user: str, reply: str | None, elsewhere: set[str]) -> bool:
    """An exchange without facts, short, and sharing no content word with the rest."""
    if any(_facts(user)[:2]) or rules.negation_count(user) or _content(user) & elsewhere:
        return False
    return reply is None or (len(rules.words(reply)) <= _SHORT_REPLY
                             and not any(c.isdigit() for c in reply)
                             and not _content(reply) & elsewhere)


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


def context_facts(turns: Sequence[tuple[str, str]], final: str) -> list[list[object]]:
    """The normalised form of ``turns`` (role, text; user and assistant alternating) that a
    dependent message ``final``'s match must agree on, small talk left out."""
    out: list[list[object]] = []
    words = [_content(t) for _, t in turns]
    last = _content(final)
    i = 0
    while i < len(turns):
        role, text = turns[i]
        reply = turns[i + 1][1] if role == "user" and i + 1 < len(turns) \
            and turns[i + 1][0] == "assistant" else None
        if role == "user":
            elsewhere = set(last).union(*(w for k, w in enumerate(words)
                                          if k not in (i, i + 1)))
            if not _small_talk(text, reply, elsewhere):
                numbers, names, negations = _facts(text)
                out.append(["user", list(numbers), list(names), negations])
                if reply is not None:
                    out.append(["assistant", " ".join(rules.words(reply))])
            i += 2 if reply is not None else 1
        else:
            out.append(["assistant", " ".join(rules.words(_SPACE.sub(" ", text)))])
            i += 1
    return out
