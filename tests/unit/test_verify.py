"""The verifier rejects look-alike prompts that need a different answer, and passes paraphrases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptcache.cache.errors import ConfigError
from promptcache.cache.semantic.rules import named_things, negation_count, numbers_agree
from promptcache.cache.semantic.scorers import FEATURES
from promptcache.cache.semantic.verifier import Verifier, VerifierConfig

HIGH = 0.97  # these traps score above 0.95 with all-MiniLM-L6-v2; the rules must not care

NEGATION_TRAPS = [
    ("cancel my subscription", "don't cancel my subscription"),
    ("Should I take ibuprofen with food?", "Should I not take ibuprofen with food?"),
    ("Is this loan worth it?", "Is this loan never worth it?"),
    ("Write a function that returns the list", "Write a function that returns nothing"),
    ("Can I book a flight with my passport?", "Can I book a flight without my passport?"),
    ("Why can I log in?", "Why can't I log in?"),
]
NUMBER_TRAPS = [
    ("Book a table for 2 people", "Book a table for 4 people"),
    ("Book a table for two people", "Book a table for three people"),
    ("What is 15% of 80?", "What is 20% of 80?"),
    ("Convert 5 kg to grams", "Convert 5 lb to grams"),
    ("Transfer $200 to savings", "Transfer $2,000 to savings"),
    ("Set an alarm for 7:30 am", "Set an alarm for 7:30 pm"),
    ("Wake me at 6am", "Wake me at 7am"),
    ("What happened on March 3, 2021?", "What happened on March 4, 2021?"),
    ("Best laptops of 2019", "Best laptops of 2023"),
    ("Who won the first World Cup?", "Who won the second World Cup?"),
    ("What's the weather on Monday?", "What's the weather on Tuesday?"),
    ("What's the weather today?", "What's the weather tomorrow?"),
    ("Is 3.5 GHz fast?", "Is 2.5 GHz fast?"),
    ("Compare iPhone 7 and iPhone 8", "Compare iPhone 8 and iPhone 7"),
]
NAME_TRAPS = [
    ("Alice pays Bob for the tickets", "Bob pays Alice for the tickets"),
    ("Does Google own YouTube?", "Does YouTube own Google?"),
    ("What is the capital of France?", "What is the capital of Spain?"),
    ("How do I use os.path.join?", "How do I use os.path.split?"),
    ("Rename the user_id column", "Rename the account_id column"),
    ("What does getUserName return?", "What does getUserId return?"),
    ("Why does parse() fail?", "Why does load() fail?"),
    ('Translate "good morning" to French', 'Translate "good night" to French'),
    ("Summarise https://example.com/a", "Summarise https://example.com/b"),
    ("What does config.yaml configure?", "What does config.json configure?"),
    ("Does the NHS cover this?", "Does the IRS cover this?"),
    ("Who founded Google?", "Who was the founder of Microsoft?"),  # more than one word swapped
    # content words that trade places change the question as much as names do
    ("Why are westerners more polite than Asians?", "Why are Asians more polite than westerners?"),
    ("How do I convert a pdf to a word file?", "How do I convert a word file to a pdf?"),
    ("Can I work abroad after studying law in India?",
     "Can I work in India after studying law abroad?"),
]
CONTRAST_TRAPS = [
    ("How do I enable two-factor login for every user on the admin console of our team?",
     "How do I disable two-factor login for every user on the admin console of our team?"),
    ("How do I upload my photos to the shared album?",
     "How do I download my photos from the shared album?"),
    ("What is the maximum file size for an attachment?",
     "What is the minimum file size for an attachment?"),
    ("How do I install the printer driver on a Mac?",
     "How do I uninstall the printer driver on a Mac?"),
    ("How do I encrypt a folder before sending it?",
     "How do I decrypt a folder before sending it?"),
    ("Should I stretch before running?", "Should I stretch after running?"),
    ("How do I reset my password on the banking app?", "How do I reset my pin on the banking app?"),
    ("Our nightly builds on the build server keep failing with a timeout, how do I raise it?",
     "Our weekly builds on the build server keep failing with a timeout, how do I raise it?"),
    # quantifiers
    ("Do all the plans include phone support?", "Do any of the plans include phone support?"),
    ("Can I refund every order from last week at once?",
     "Can I refund only some orders from last week at once?"),
    # two blocks trading places around the same words
    ("How do I merge main into my feature branch?", "How do I merge my feature branch into main?"),
    ("Our dog keeps chasing the new kitten around the house, what should we do?",
     "Our new kitten keeps chasing the dog around the house, what should we do?"),
]
TRAPS = [("negation", p) for p in NEGATION_TRAPS] + [("numbers", p) for p in NUMBER_TRAPS] + [
    ("entities", p) for p in NAME_TRAPS] + [("contrast", p) for p in CONTRAST_TRAPS]
PARAPHRASES = [
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is the best way to learn Python?", "How do I learn python?"),
    ("What Is The Best Way To Learn Guitar?", "How can I learn guitar fast?"),
    ("Book a table for two people at 7pm", "Book a table for 2 people at 7 pm"),
    ("Is it safe to eat raw eggs or not?", "Is it safe to eat raw eggs?"),
    ("No matter what, how do I stay calm?", "How do I stay calm whatever happens?"),
    ("Why can't I sleep at night?", "Why am I unable to sleep at night?"),
    ("How much is twenty five dollars in euros?", "How much is $25 in euros?"),
    ("Explain os.path.join", "What does os.path.join do?"),
    ("What are the benefits of Yoga?", "What are the benefits of doing yoga?"),
    # clauses moved: names in another order, but not trading places around the same words
    ("Amazon SageMaker trains Transformer models with Hugging Face DLCs",
     "With Hugging Face DLCs, Amazon SageMaker trains Transformer models"),
    ("How does `load_dataset()` work?", "How does load_dataset work?"),
    # symmetric roles and word order are not swaps
    ("What is the difference between a cocktail and a mocktail?",
     "What is the difference between a mocktail and a cocktail?"),
    ("How do I get rid of little black bugs?", "How do I get rid of black little bugs?"),
]


@pytest.fixture(scope="module")
def rules() -> Verifier:
    return Verifier(VerifierConfig(model=None))


@pytest.fixture(scope="module")
def default() -> Verifier:
    return Verifier()


@pytest.mark.parametrize(("check", "pair"), TRAPS, ids=[f"{c}:{p[1]}" for c, p in TRAPS])
def test_trap_pairs_are_rejected_by_their_rule(rules: Verifier, check: str,
                                               pair: tuple[str, str]) -> None:
    """Each trap is rejected both ways round, and the named check is among the reasons."""
    for query, candidate in (pair, pair[::-1]):
        verdict = rules.verify(query, candidate, HIGH)
        assert not verdict.ok
        alone = Verifier(VerifierConfig(
            numbers=check == "numbers", negation=check == "negation",
            entities=check == "entities", contrast=check == "contrast", model=None))
        assert alone.verify(query, candidate, HIGH).reason == check


@pytest.mark.parametrize(("check", "pair"), TRAPS, ids=[f"{c}:{p[1]}" for c, p in TRAPS])
def test_the_default_verifier_rejects_traps_at_any_similarity(default: Verifier, check: str,
                                                              pair: tuple[str, str]) -> None:
    assert not default.verify(pair[0], pair[1], 0.999).ok


@pytest.mark.parametrize("pair", PARAPHRASES, ids=[p[1] for p in PARAPHRASES])
def test_paraphrases_pass_the_rules(rules: Verifier, pair: tuple[str, str]) -> None:
    verdict = rules.verify(*pair, HIGH)
    assert verdict.ok and verdict.reason is None and verdict.score == 1.0


def test_a_close_paraphrase_passes_the_default_verifier(default: Verifier) -> None:
    verdict = default.verify("How do I reset my password?", "How can I reset my password?",
                             0.985)
    assert verdict.ok, verdict


def test_the_shipped_default_loads_and_says_how_it_was_made(default: Verifier) -> None:
    assert default.params["kind"] in ("linear", "rules")
    assert default.params["command"].startswith("promptcache fit --pairs ")
    assert 0.70 <= default.params["similarity_threshold"] < 1.0
    assert (default.scorer is None) == (default.params["kind"] == "rules")


def test_the_default_threshold_is_the_one_fitted_with_the_shipped_verifier(
        default: Verifier) -> None:
    """The sidecar's --similarity-threshold default is the operating point `promptcache fit`
    chose for the shipped verifier; refitting means updating both."""
    from promptcache.cache.options import EngineOptions
    from promptcache.cache.semantic.tier import SemanticPolicy

    fitted = default.params["similarity_threshold"]
    assert EngineOptions().similarity_threshold == SemanticPolicy().threshold == fitted


def _linear_params(tmp_path: Path, threshold: float = 0.5) -> str:
    """A hand-made linear model: the score is a logistic of the similarity alone."""
    n = len(FEATURES)
    params = {"kind": "linear", "command": "promptcache fit --pairs hand-made",
              "features": list(FEATURES), "mean": [0.9] + [0.0] * (n - 1),
              "scale": [0.01] + [1.0] * (n - 1), "weights": [1.0] + [0.0] * (n - 1),
              "bias": 0.0, "threshold": threshold, "similarity_threshold": 0.9}
    path = tmp_path / "verifier.json"
    path.write_text(json.dumps(params))
    return str(path)


def test_a_fitted_model_rejects_what_it_scores_below_its_threshold(tmp_path: Path) -> None:
    verifier = Verifier(VerifierConfig(model=_linear_params(tmp_path)))
    low = verifier.verify("How do I bake bread?", "How do I fix my bike?", 0.85)
    high = verifier.verify("How do I bake bread?", "How can I bake bread at home?", 0.95)
    assert not low.ok and low.reason == "model" and low.score < 0.5
    assert high.ok and high.reason is None and high.score > 0.5
    trap = verifier.verify("cancel my plan", "don't cancel my plan", 0.99)
    assert trap.reason == "negation" and trap.score == 0.0  # rules run first


def test_a_bad_model_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Verifier(VerifierConfig(model=str(tmp_path / "missing.json")))
    (tmp_path / "other.json").write_text('{"kind": "unknown"}')
    with pytest.raises(ConfigError):
        Verifier(VerifierConfig(model=str(tmp_path / "other.json")))


@pytest.mark.parametrize("check", ["numbers", "negation", "entities", "contrast"])
def test_each_check_can_be_switched_off(check: str) -> None:
    """With one check off, its traps that no other rule catches pass."""
    off = Verifier(VerifierConfig(model=None, **{check: False}))  # type: ignore[arg-type]
    traps = [p for c, p in TRAPS if c == check]
    passed = [p for p in traps if off.verify(*p, HIGH).ok]
    assert passed, f"switching {check} off changed nothing"
    for pair in passed:
        assert Verifier(VerifierConfig(model=None)).verify(*pair, HIGH).reason == check


@pytest.mark.parametrize("model", ["default", "none", "linear"])
def test_verify_batch_matches_verify(model: str, tmp_path: Path) -> None:
    path = {"default": "default", "none": None, "linear": _linear_params(tmp_path)}[model]
    verifier = Verifier(VerifierConfig(model=path))
    items = [(q, c, s) for (_, (q, c)), s in zip(TRAPS, [0.9, 0.99] * len(TRAPS), strict=False)]
    items += [(q, c, s) for (q, c), s in zip(PARAPHRASES, [0.8, 0.99] * 9, strict=False)]
    assert verifier.verify_batch(items) == [verifier.verify(*item) for item in items]
    assert verifier.verify_batch([]) == []


def test_number_words_digits_and_units_are_normalised() -> None:
    assert numbers_agree("twenty five apples", "25 apples")
    assert numbers_agree("2.5 million dollars", "$2,500,000")
    assert numbers_agree("a 5kg bag", "a 5 kilogram bag")
    assert numbers_agree("the 2nd floor", "the second floor")
    assert numbers_agree("Which one is better?", "Which is better?")  # "one" as a pronoun
    assert not numbers_agree("50k salary", "500k salary")
    assert not numbers_agree("from 3 to 5", "from 5 to 3")  # same numbers, other order


def test_negation_idioms_are_not_negations() -> None:
    assert negation_count("No matter what happens") == 0
    assert negation_count("Is it good or not?") == 0
    assert negation_count("Not only fast but cheap") == 0
    assert negation_count("I don't know and cannot guess") == 2
    assert negation_count("There is no way, none at all") == 2


def test_named_things_skip_sentence_starts_and_title_case() -> None:
    assert named_things("Where is Paris? Paris is in France.") == ["paris", "france"]
    assert named_things("What Is The Best Way To Learn Guitar?") == []
    assert named_things("Call numpy.linalg.norm on my_array in main.py") == [
        "numpy.linalg.norm", "my_array", "main.py"]
    assert "https://example.com/x?q=1" in named_things("See https://example.com/x?q=1.")


def test_the_floor_falls_with_the_shorter_texts_length() -> None:
    from promptcache.cache.semantic.verifier import (
        RELIEF_FROM_WORDS,
        RELIEF_FULL_WORDS,
        required_similarity,
    )

    def text(n: int) -> str:
        return " ".join(f"w{i}" for i in range(n))

    long = text(40)
    assert required_similarity(0.975, 0.045, text(RELIEF_FROM_WORDS), long) == 0.975
    assert required_similarity(0.975, 0.045, long, text(RELIEF_FULL_WORDS)) == pytest.approx(0.93)
    middle = (RELIEF_FROM_WORDS + RELIEF_FULL_WORDS) // 2
    assert 0.93 < required_similarity(0.975, 0.045, text(middle), long) < 0.975
    assert required_similarity(0.975, 0.0, long, long) == 0.975  # --length-relief 0: off
    assert required_similarity(0.99, 0.045, long, long) == pytest.approx(0.945)  # below any


@pytest.mark.parametrize(("query", "candidate"), [
    ("Is it safe to lock the screen remotely?", "Is it safe to unlock the screen remotely?"),
    ("Can I compress the backup?", "Can I decompress the backup?"),
    ("Why is the token invalid after an hour?", "Why is the token valid after an hour?"),
    ("Sort the users in ascending order of signup date",
     "Sort the users in descending order of signup date"),
])
def test_the_contrast_rule_sees_opposites_made_with_a_prefix_or_listed(
        rules: Verifier, query: str, candidate: str) -> None:
    assert rules.verify(query, candidate, HIGH).reason == "contrast"
    assert rules.verify(candidate, query, HIGH).reason == "contrast"


@pytest.mark.parametrize(("query", "candidate"), [
    # several words changed: a rewrite, for the model and the similarity to judge
    ("Gradio is a tool to build machine learning demos in a few lines of Python.",
     "Gradio enables developers to create machine learning demos with a few lines of Python."),
    # numbers and negation cues are the other rules' business, not a swapped word
    ("Book a table for two people", "Book a table for 2 people"),
    ("Why can't I sleep at night?", "Why am I unable to sleep at night?"),
    # only function words differ
    ("How can one avoid arguments?", "How do you avoid arguments?"),
])
def test_the_contrast_rule_lets_rewrites_through(query: str, candidate: str) -> None:
    from promptcache.cache.semantic.rules import opposites_agree

    assert opposites_agree(query, candidate) and opposites_agree(candidate, query)


def test_the_contrast_rule_bounds_its_pairwise_search() -> None:
    from promptcache.cache.semantic.contrast import MAX_LEFT
    from promptcache.cache.semantic.rules import opposites_agree

    def made_up(stem: str, i: int) -> str:
        return stem + chr(97 + i % 26) + chr(97 + i // 26)

    a = " ".join(made_up("alpha", i) for i in range(MAX_LEFT + 1)) + " enable"
    b = " ".join(made_up("beta", i) for i in range(MAX_LEFT + 1)) + " disable"
    assert opposites_agree(a, b)  # too many leftovers to compare: left to the other judges
    assert not opposites_agree(a.split()[-1], b.split()[-1])


def test_two_forms_of_one_word_are_no_swap_but_look_alikes_are() -> None:
    from promptcache.cache.semantic.rules import opposites_agree

    assert opposites_agree("What is the difference between a list and a tuple in Python?",
                           "How do a list and a tuple differ in Python?")
    assert not opposites_agree("What is the fee for an internal transfer?",
                               "What is the fee for an international transfer?")


def test_the_relief_reads_no_more_of_a_huge_text_than_it_needs() -> None:
    """On the tier's loop, per candidate: the words are counted only up to where the
    relief is full, so a megabyte of text costs what fifteen words do."""
    import time

    from promptcache.cache.semantic.verifier import required_similarity

    huge = "word " * 200_000
    started = time.process_time()
    for _ in range(100):
        assert required_similarity(0.975, 0.045, huge, huge) == pytest.approx(0.93)
    assert time.process_time() - started < 0.1
