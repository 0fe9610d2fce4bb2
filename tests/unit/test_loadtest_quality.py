"""The quality set and its scoring: normalised whole-word matches, and a set that cannot be gamed by echoing."""

from __future__ import annotations

import pytest

from loadtests.quality import Answer, QualityResult, Question, is_correct, normalize, quality_failures, questions, table


def test_the_set_is_fixed_and_well_formed() -> None:
    qs = questions()
    assert len(qs) >= 30
    assert len({q.id for q in qs}) == len(qs)
    assert {q.topic for q in qs} >= {"capitals", "arithmetic", "units"}
    for q in qs:
        # A reply that only repeats what it was asked must not score.
        assert not is_correct(q, q.prompt), q
        assert q.question.endswith("?") and q.answer
        assert q.prompt == f"{q.question} Answer in a few words."


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The capital of France is Paris.", "the capital of france is paris"),
        ("BRASÍLIA!", "brasilia"),
        ("1,000 grams", "1000 grams"),
        ("It is 2.5 km.", "it is 2.5 km"),
        ("forty-two", "forty two"),
        ("**Tokyo**\n", "tokyo"),
    ],
)
def test_normalisation(text: str, normal: str) -> None:
    assert normalize(text) == normal


Q7 = Question("sub", "arithmetic", "What is 12 minus 5?", "7", ("seven",))
PARIS = Question("fr", "capitals", "What is the capital of France?", "Paris")
NEW_DELHI = Question("in", "capitals", "What is the capital of India?", "New Delhi")


@pytest.mark.parametrize(
    ("question", "reply", "correct"),
    [
        (PARIS, "The capital of France is Paris.", True),
        (PARIS, "paris", True),
        (PARIS, "Parisian culture is rich.", False),  # a whole word, not a prefix
        (PARIS, "L'Étoile, le Pont d'Aix.", False),
        (Q7, "12 minus 5 equals 7.", True),
        (Q7, "The answer is seven", True),
        (Q7, "The answer is 70.", False),
        (Q7, "The answer is 1.7", False),
        (Q7, "7.", True),
        (NEW_DELHI, "It is New Delhi.", True),
        (NEW_DELHI, "It is Delhi.", False),  # a phrase must appear whole
    ],
)
def test_whole_word_match_of_the_normalised_answer(question: Question, reply: str, correct: bool) -> None:
    assert is_correct(question, reply) is correct


def result(target: str, verdicts: list[bool]) -> QualityResult:
    return QualityResult(
        target,
        [Answer(f"q{i}", f"Q{i}?", "a", "a" if ok else "b", ok) for i, ok in enumerate(verdicts)],
        max_tokens=64,
    )


def test_a_target_more_than_the_tolerance_below_the_baseline_fails() -> None:
    baseline = result("baseline", [True] * 10)
    close = result("vllm", [True] * 8 + [False] * 2)
    far = result("gateway", [True] * 7 + [False] * 3)
    assert quality_failures([baseline, close, far], tolerance=2) == [
        "quality: gateway answered 7/10, more than 2 below baseline's 10/10"
    ]
    assert quality_failures([close, far], tolerance=0) == []  # nothing to compare with
    assert (close.correct, close.total, close.score) == (8, 10, "8/10")


def test_the_table_shows_scores_and_what_was_missed() -> None:
    text = table([result("baseline", [True, True]), result("vllm", [True, False])])
    assert "baseline  2/2" in text and "vllm      1/2" in text
    assert "q1: Q1? (expected a)" in text and "miss vllm" in text and "q0:" not in text
