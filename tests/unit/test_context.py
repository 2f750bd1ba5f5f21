"""Context-aware scopes: which final messages depend on the earlier turns, what of those
turns a dependent one must agree on, and that strict mode keeps every turn byte for byte."""

from __future__ import annotations

from typing import Any

import pytest

from promptcache.cache.semantic.context import (
    context_facts,
    depends_on_history,
    without_acknowledgement,
)
from promptcache.cache.semantic.scope import semantic_view

HISTORY = ["I'm on the Team plan with 12 seats.",
           "The Team plan is $10 per seat per month, so you pay $120 a month."]


def view(messages: list[dict[str, str]], context: str = "dependent") -> Any:
    return semantic_view("chat", "/v1/chat/completions", {"model": "m", "messages": messages},
                         tenant="t", namespace="", context=context)


def chat(*turns: str, system: str = "You are a billing assistant.") -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}]
    out += [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
            for i, t in enumerate(turns)]
    return out


@pytest.mark.parametrize("text", [
    "How do I install it?", "Is that normal?", "Which of those is simpler?",
    "And with the TV add-on?", "What about the blue one?", "Yes please.", "Sure, go ahead",
    "the annual one", "What would annual billing cost us?", "How much is the credit?",
    "Can I get a refund?", "Are Team seats transferable?",  # "Team" and "seats" were said
    # A how-to or may-I question that does not name its subject asks about the history's.
    "How do I add shell completions?", "Can I pay monthly?", "Is it possible to pay yearly?",
    "How do I read a config file as a fallback?", "Will there be any downtime?",
    # Whether one may, and when, is the user's own case even when it names its subject.
    "Can we get a discount on Ledgerly?", "When can I expect a refund from Ledgerly?",
    # Comparing without saying with what; "the" the message does not define.
    "Which option is easier?", "Does the yearly plan work out cheaper for Acme?",
    "Is the discount applied before tax?", "Thanks, that helps. How do I add it?",
])
def test_messages_that_point_back_or_speak_of_the_users_case_depend(text: str) -> None:
    assert depends_on_history(text, HISTORY)


@pytest.mark.parametrize("text", [
    # Generic how-to and may-I questions that name their subject.
    "How do I change my Ledgerly password?", "How can we settle Ledgerly invoices with PayPal?",
    "Is there a Ledgerly app for Android?", "Where can I download my Ledgerly data?",
    # "the" defined in the message; "instead of"; an acknowledgement before the question.
    "What is the difference between cash and accrual accounting?",
    "Does Ledgerly send paper invoices instead of email?",
    "Thanks, that helps. Does Ledgerly charge VAT for EU customers?",
])
def test_generic_questions_that_name_their_subject_stand_alone(text: str) -> None:
    assert not depends_on_history(text, HISTORY)
    assert not depends_on_history(text, ["My card ending 4421 was declined.",
                                         "We will retry it in 3 days."])


def test_a_name_said_before_that_the_message_names_itself_is_no_cue() -> None:
    history = ["Ledgerly charged my card twice on 3 May.",
               "I see a duplicate charge of $49 on 3 May; it will be refunded."]
    assert not depends_on_history("Does Ledgerly integrate with Stripe?", history)
    assert depends_on_history("Does Ledgerly refund duplicate charges?", history)  # "charge"


@pytest.mark.parametrize("text", [
    "Does Ledgerly charge VAT for EU customers?", "Do you deliver on Sundays?",
    "What does `if __name__ == '__main__'` do in Python?",
])
def test_self_contained_questions_stand_alone(text: str) -> None:
    assert not depends_on_history(text, HISTORY)


def test_a_leading_acknowledgement_is_dropped_but_a_bare_confirmation_kept() -> None:
    assert without_acknowledgement("Thanks, that helps. Does it cost more?") == \
        "Does it cost more?"
    assert without_acknowledgement("Ok cool. How do I add it?") == "How do I add it?"
    assert without_acknowledgement("Yes please.") == "Yes please."
    assert without_acknowledgement("No. Then how?") == "No. Then how?"


def test_facts_ignore_wording_and_small_talk_but_not_numbers_names_or_the_reply() -> None:
    base = context_facts([("user", HISTORY[0]), ("assistant", HISTORY[1])], "Does it?")
    reworded = context_facts([("user", "We have 12 seats on the Team plan."),
                              ("assistant", HISTORY[1])], "Does it?")
    chatty = context_facts([("user", "Good morning :)"),
                            ("assistant", "Good morning! What can I do for you?"),
                            ("user", HISTORY[0]), ("assistant", HISTORY[1])], "Does it?")
    assert base == reworded == chatty
    for turns in ([("user", HISTORY[0].replace("12", "20")), ("assistant", HISTORY[1])],
                  [("user", HISTORY[0].replace("Team", "Scale")), ("assistant", HISTORY[1])],
                  [("user", HISTORY[0]), ("assistant", HISTORY[1].replace("$10", "$12"))],
                  [("user", "I'm not on the Team plan with 12 seats."),
                   ("assistant", HISTORY[1])]):
        assert context_facts(turns, "Does it?") != base


def test_small_talk_that_shares_only_light_words_occasions_or_each_others_words_is_left_out(
        ) -> None:
    """Light verbs ("take your time", "go ahead"), contractions, "second time", and words
    that two small-talk exchanges share with each other do not tie small talk to the topic."""
    base = context_facts([("user", HISTORY[0]), ("assistant", HISTORY[1])], "Does it?")
    chatty = context_facts([
        ("user", "Sorry, I'm typing with a coffee in my hand, quick typos ahead."),
        ("assistant", "No problem, take your time!"),
        ("user", HISTORY[0]), ("assistant", HISTORY[1]),
        ("user", "Hello again, second time I've asked here."),
        ("assistant", "Welcome back! Go ahead."),
        ("user", "And thanks for the quick replies."),
        ("assistant", "You're welcome, I'm glad it helps."),
    ], "Does it?")
    assert chatty == base


def test_answers_and_choices_are_never_small_talk() -> None:
    """An exchange that accepts an offer ("Yes please." / "Done.") or picks an option
    ("The second one, please.") stays in the facts, though short and without digits."""
    offer = "I can switch you to annual billing or add seats. Which would you like?"
    turns = [("user", HISTORY[0]), ("assistant", offer)]
    yes = context_facts([*turns, ("user", "Yes please."), ("assistant", "Done.")], "Does it?")
    assert yes != context_facts(turns, "Does it?")
    first, second = (context_facts([*turns, ("user", f"The {pick} one, please."),
                                    ("assistant", "Done!")], "When?")
                     for pick in ("first", "second"))
    assert first != second


def test_a_named_generic_question_matches_across_histories_an_unnamed_one_does_not() -> None:
    other = ["My card ending 4421 was declined.", "We will retry it in 3 days."]
    named = "How do I change my Ledgerly password?"
    assert view(chat(*HISTORY, named)).scope == view(chat(*other, named)).scope
    unnamed = "How do I add shell completions?"
    assert view(chat(*HISTORY, unnamed)).scope != view(chat(*other, unnamed)).scope


def test_strict_mode_keeps_every_earlier_turn_and_is_the_default() -> None:
    a = chat(*HISTORY, "What would annual billing cost us?")
    b = chat("We have 12 seats on the Team plan.", HISTORY[1],
             "What would annual billing cost us?")
    default = semantic_view("chat", "/v1/chat/completions", {"model": "m", "messages": a},
                            tenant="t", namespace="")
    assert default == view(a, "strict")
    assert view(a, "strict").scope != view(b, "strict").scope
    assert view(a).scope == view(b).scope  # dependent: same facts, reworded


def test_a_single_turn_request_has_the_same_view_in_both_modes() -> None:
    one = chat("Thanks! Does Ledgerly charge VAT?")
    assert view(one) == view(one, "strict")


def test_a_standalone_final_message_matches_across_histories_but_not_systems() -> None:
    q = "Does Ledgerly charge VAT for EU customers?"
    a = chat(*HISTORY, q)
    b = chat("My card ending 4421 was declined.", "We will retry it in 3 days.", q)
    assert view(a).scope == view(b).scope
    assert view(a).scope != view(chat(*HISTORY, q, system="Other.")).scope
    assert view(a).scope != view(chat(q)).scope  # no history: its own scope, as in strict


def test_a_dependent_message_needs_the_same_offer_and_the_same_facts() -> None:
    offer = "I can switch you to annual billing with a 15% discount. Should I?"
    other = "I can add 5 more seats at the current monthly price. Should I?"
    yes = chat(HISTORY[0], offer, "Yes please.")
    assert view(yes).scope == view(chat(HISTORY[0], offer, "Yes please.")).scope
    assert view(yes).scope != view(chat(HISTORY[0], other, "Yes please.")).scope
    changed = chat(HISTORY[0].replace("12", "20"), offer, "Yes please.")
    assert view(yes).scope != view(changed).scope
    assert view(chat("Hi!", "Hello! How can I help?", HISTORY[0], offer,
                     "Great, thanks. Yes please.")) == view(yes)


def test_history_that_is_not_plain_text_keeps_the_strict_scope() -> None:
    tool_call = {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "1", "type": "function",
                                 "function": {"name": "f", "arguments": "{}"}}]}
    messages = [*chat(HISTORY[0]), tool_call, {"role": "user", "content": "And then?"}]
    assert view(messages) == view(messages, "strict")
