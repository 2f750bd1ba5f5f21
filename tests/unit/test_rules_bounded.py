"""The verifier's rule checks do bounded work on any input, run only when switched on, and
judge normal-size prompts exactly as the plain quadratic search for swaps does."""

from __future__ import annotations

import random
import time

import pytest

from promptcache.cache.semantic import rules, scorers
from promptcache.cache.semantic.rules import STOPWORDS, named_things, names_agree, words
from promptcache.cache.semantic.verifier import Verifier, VerifierConfig

BOUND = 0.5  # seconds of CPU a check may take on 2,500 words: generous for a loaded machine

SWAPS = [
    ("Alice pays Bob for the tickets", "Bob pays Alice for the tickets"),
    ("Does Google own YouTube?", "Does YouTube own Google?"),
    ("Why are westerners more polite than Asians?", "Why are Asians more polite than westerners?"),
    ("How do I convert a pdf to a word file?", "How do I convert a word file to a pdf?"),
    ("Can I work abroad after studying law in India?",
     "Can I work in India after studying law abroad?"),
]
NOT_SWAPS = [
    ("Amazon SageMaker trains Transformer models with Hugging Face DLCs",
     "With Hugging Face DLCs, Amazon SageMaker trains Transformer models"),
    ("What is the difference between a cocktail and a mocktail?",
     "What is the difference between a mocktail and a cocktail?"),
    ("How do I get rid of little black bugs?", "How do I get rid of black little bugs?"),
]


def _text(n: int, seed: int = 0) -> list[str]:
    """n words: content words, identifiers (which are also names), stopwords and numbers."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    content = [f"{s}{t}x" for s, t in rng.sample(
        [(s, t) for s in syllables for t in syllables], 600)]
    idents = [f"var_{i}" for i in range(150)]
    stop = sorted(STOPWORDS - rules._NEGATIONS - {"once", "one"})
    pool = content + idents + stop * 2 + [str(k) for k in range(1, 40)]
    return [rng.choice(pool) for _ in range(n)]


def _pairs() -> dict[str, tuple[str, str]]:
    a = _text(2500)
    shuffled = a[:]
    random.Random(1).shuffle(shuffled)
    swapped = a[:]
    swapped[100], swapped[2400] = "zzfirstzz", "zzsecondzz"
    a_swap = a[:]
    a_swap[100], a_swap[2400] = "zzsecondzz", "zzfirstzz"
    return {
        "identical": (" ".join(a), " ".join(a)),
        "shuffled": (" ".join(a), " ".join(shuffled)),
        "halves moved": (" ".join(a), " ".join(a[1250:] + a[:1250])),
        "two words swapped": (" ".join(a_swap), " ".join(swapped)),
    }


PAIRS = _pairs()


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("check", rules.RULES)
def test_each_check_judges_a_2500_word_pair_sharing_every_word_quickly(check: str,
                                                                       kind: str) -> None:
    query, candidate = PAIRS[kind]
    assert len(query.split()) == 2500 and sorted(query.split()) == sorted(candidate.split())
    started = time.process_time()
    verdict = rules.CHECKS[check](query, candidate)
    took = time.process_time() - started
    assert took < BOUND, f"{check} on {kind}: {took:.3f} s"
    if kind == "identical":
        assert verdict
    if check == "entities" and kind != "identical":
        assert not verdict  # a swap, or more reordering than the search bounds: a miss


def test_the_swap_check_catches_swaps_and_passes_rephrasings() -> None:
    for query, candidate in SWAPS:
        assert not names_agree(query, candidate) and not names_agree(candidate, query)
    for query, candidate in NOT_SWAPS:
        assert names_agree(query, candidate) and names_agree(candidate, query)


def test_the_swap_check_catches_a_swap_after_a_long_shared_context() -> None:
    context = " ".join(_text(200, seed=3)) + ". "
    for query, candidate in SWAPS:
        assert names_agree(context + query, context + query)
        assert not names_agree(context + query, context + candidate)


@pytest.mark.parametrize(("bound", "value"), [("MAX_REORDERED", 3_000), ("MAX_READ", 5_000),
                                               ("BOUNDS_VOCABULARY", 8)])
def test_reordering_past_the_bounds_is_judged_a_swap(monkeypatch: pytest.MonkeyPatch,
                                                     bound: str, value: int) -> None:
    """Two blocks in the other order are a rephrasing to the search, until its work passes
    a bound: then the pair is rejected (a miss), never accepted."""
    first, second = [f"alpha{i}x" for i in range(40)], [f"beta{i}y" for i in range(40)]
    pair = (" ".join(first + second), " ".join(second + first))
    assert names_agree(*pair)  # 2 x 1,600 reordered pairs (names, then content words)
    monkeypatch.setattr(rules, bound, value)
    assert not names_agree(*pair)


def test_reading_too_many_long_names_is_judged_a_disagreement(
        monkeypatch: pytest.MonkeyPatch) -> None:
    text = " ".join(f'"the {i} quoted words here"' for i in range(200))
    assert names_agree(text, text)
    monkeypatch.setattr(rules, "MAX_SEARCHED", 10_000)
    assert not names_agree(text, text)


@pytest.mark.parametrize("check", rules.RULES)
def test_a_text_past_the_token_cap_disagrees_after_one_pass(check: str) -> None:
    text = "a " * (rules.MAX_TOKENS + 1)
    started = time.process_time()
    assert not rules.CHECKS[check](text, text) and not rules.CHECKS[check]("a", text)
    assert time.process_time() - started < BOUND
    assert rules.CHECKS[check](text[:-2], text[:-2])  # at the cap: judged


def _raise(*_: object, **__: object) -> bool:
    raise AssertionError("a switched-off check ran")


def _agree(query: str, candidate: str) -> bool:
    return True


ALL_PAIRS = SWAPS + NOT_SWAPS + [("cancel my plan", "don't cancel my plan"),
                                 ("Book a table for 2", "Book a table for 4"),
                                 ("How do I upload my photos?", "How do I download my photos?"),
                                 ("Who founded Google?", "Who was the founder of Microsoft?")]


@pytest.mark.parametrize("check", rules.RULES)
@pytest.mark.parametrize("model", ["default", None])
def test_a_check_switched_off_never_runs(monkeypatch: pytest.MonkeyPatch, check: str,
                                         model: str | None) -> None:
    """Neither the rule nor anything under it runs, not even as a feature of the model."""
    monkeypatch.setitem(rules.CHECKS, check, _raise)
    if check == "entities":
        monkeypatch.setattr(rules, "_swapped", _raise)
        monkeypatch.setattr(rules, "named_things", _raise)
    off = Verifier(VerifierConfig(model=model, **{check: False}))  # type: ignore[arg-type]
    items = [(q, c, 0.99) for q, c in ALL_PAIRS]
    off.verify_batch(items)
    for item in items:
        off.verify(*item)
    with pytest.raises(AssertionError, match="switched-off"):  # the same check, on, does run
        Verifier(VerifierConfig(model=model)).verify_batch(items)


def test_the_model_does_not_run_the_rules_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scorers, "rule_flags", _raise)
    verifier = Verifier()
    assert verifier.verify("How do I reset my password?", "How can I reset my password?",
                           0.985).ok


@pytest.mark.parametrize("check", rules.RULES)
def test_a_check_switched_off_counts_as_agreeing_for_the_model(
        monkeypatch: pytest.MonkeyPatch, check: str) -> None:
    """With a rule off, the shipped model scores a pair as it does with the rule on and
    agreeing: the switch removes the rule's veto and changes no other input."""
    off = Verifier(VerifierConfig(**{check: False}))  # type: ignore[arg-type]
    items = [(q, c, s) for q, c in ALL_PAIRS for s in (0.97, 0.999)]
    scores_off = [v.score for v in off.verify_batch(items)]
    others = [rules.CHECKS[r] for r in rules.RULES if r != check]
    passing = [i for i, (q, c, _) in enumerate(items) if all(f(q, c) for f in others)]
    assert any(not rules.CHECKS[check](*items[i][:2]) for i in passing)  # some it would veto
    monkeypatch.setitem(rules.CHECKS, check, _agree)
    agreeing = Verifier(VerifierConfig())
    scores_on = [v.score for v in agreeing.verify_batch(items)]
    assert [scores_off[i] for i in passing] == [scores_on[i] for i in passing]


def test_a_text_past_the_length_cap_is_rejected_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    for check in rules.RULES:
        monkeypatch.setitem(rules.CHECKS, check, _raise)
    long, short = "How do I reset my password? " * 10, "How do I reset my password?"
    verifier = Verifier(VerifierConfig(max_chars=100))
    for query, candidate in ((long, short), (short, long)):
        verdict = verifier.verify(query, candidate, 0.999)
        assert not verdict.ok and verdict.reason == "length"
    nothing_on = Verifier(VerifierConfig(numbers=False, negation=False, entities=False,
                                         contrast=False, model=None, max_chars=100))
    assert nothing_on.verify(long, short, 0.999).ok  # nothing would read it


# --- the bounded search judges as the plain quadratic one did ------------------------------

def _plain(name: str) -> str:
    return f" {' '.join(words(name)) or name.casefold()} "


def _swapped_reference(names: set[str], a: str, b: str, ignore: frozenset[str] | None) -> bool:
    """The search before it was bounded: every pair of names, texts searched as strings."""
    present = sorted(n for n in names if n in a and n in b)
    for i, x in enumerate(present):
        for y in present[i + 1:]:
            if x in y or y in x:
                continue
            ax, ay, bx, by = a.find(x), a.find(y), b.find(x), b.find(y)
            if (ax < ay) == (bx < by):
                continue
            skip = set((x + y).split()) | (ignore or set())
            between_a = set(a[min(ax, ay):max(ax, ay) + 1].split()) - skip
            between_b = set(b[min(bx, by):max(bx, by) + 1].split()) - skip
            union = between_a | between_b
            if not union:
                if ignore is None:
                    return True
            elif len(between_a & between_b) >= 0.5 * len(union):
                return True
    return False


def _names_agree_reference(query: str, candidate: str) -> bool:
    q, c = named_things(query), named_things(candidate)
    q_text, c_text = f" {' '.join(words(query))} ", f" {' '.join(words(candidate))} "
    if any(_plain(n) not in c_text for n in q) or any(_plain(n) not in q_text for n in c):
        return False
    content = {f" {w} " for w in set(words(query)) & set(words(candidate))
               if w not in STOPWORDS and not w.isdigit()}
    return not (_swapped_reference({_plain(n) for n in q + c}, q_text, c_text, None)
                or _swapped_reference(content, q_text, c_text, rules._SYMMETRIC))


NESTED = [  # a name inside another, in either order
    ('Tell me about "golden Gate" Gate today', 'Tell me about Gate "golden Gate" today'),
    ('Tell me about "Golden Gate" and Golden today',
     'Tell me about Golden and "Golden Gate" today'),
    ('Tell me about "Golden Gate" Gate today', 'Tell me about Gate "Golden Gate" today'),
]


def test_the_bounded_search_judges_short_prompts_as_the_plain_search_did() -> None:
    rng = random.Random(12)
    vocab = ("Alice Bob Paris NASA my_var os.path.join cat dog tree house red and the of to "
             "between vs a 3 x.py").split() + ['"big red"', "'quoted words'", "`a b()`",
                                                '"Alice Bob"', '"NASA Paris"']  # names in names
    pairs = NESTED + [(c, q) for q, c in NESTED]
    for _ in range(3000):
        query = rng.choices(vocab, k=rng.randint(2, 30))
        candidate = query[:]
        for _ in range(rng.randint(0, 3)):
            i, j = rng.randrange(len(candidate)), rng.randrange(len(candidate))
            if rng.random() < 0.7:
                candidate[i], candidate[j] = candidate[j], candidate[i]
            else:
                candidate.insert(i, candidate.pop(j))
        pairs.append((" ".join(query), " ".join(candidate)))
    expected = [_names_agree_reference(q, c) for q, c in pairs]
    assert 300 < sum(expected) < len(pairs) - 300  # both verdicts well exercised
    disagreements = [(q, c, e) for (q, c), e in zip(pairs, expected, strict=True)
                     if names_agree(q, c) != e]
    assert not disagreements, disagreements[:3]
