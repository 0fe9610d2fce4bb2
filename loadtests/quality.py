"""The quality check: a fixed set of short questions with one known answer each, asked greedily through a target.

Scoring. A chat model answers in a sentence ("The capital of France is Paris."), so the reply is not compared whole:
both the reply and the expected answer are normalised (Unicode compatibility form without accents, case-folded,
thousands separators dropped, every character other than a letter, a digit or a decimal point turned into a space,
runs of spaces collapsed), and the reply is correct when the expected answer, or one of its other spellings (a
number in words), appears in it as a whole word or phrase: "7" matches "There are 7 days" but not "70" or "1.7".
No expected answer appears in its own question (a test checks it), so a reply that only repeats the question
scores nothing. Greedy decoding (temperature 0) makes the score a property of the weights and the engine, not luck.

Asking. Each question is sent with the set's instruction after it ("Answer in a few words."). Asked bare, the
bundled SmolLM2-135M rambled ("10 times 10 is a classic example of a mathematical concept..."), 9 of vLLM's 44
replies and 6 of the transformers baseline's ran into the 64-token limit, and bf16's arithmetic decided which
ramble happened to contain the answer: the two engines disagreed on 6 questions (28 vs 32). With the instruction no
reply was cut, 35 of 44 replies were the same text, and they disagreed on 2 (32 vs 32): the score measures what
the model knows rather than where its rambling went. (Measured once, greedy, one request at a time, on the CPU
stack; a system message instead gave 30 vs 30 with 4 disagreements, a longer one 32 vs 34.)
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import httpx
import yaml

from loadtests.config import QualityConfig
from loadtests.runner import Target
from serve.protocol.stream import error_message

QUESTIONS = ("data", "quality.yaml")
# A quality answer is short; this bounds one that is stuck behind a saturated engine.
ANSWER_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Question:
    id: str
    topic: str
    question: str
    answer: str
    also: tuple[str, ...] = ()  # other spellings of the same answer
    instruction: str = ""  # the set's, sent after the question

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.answer, *self.also)

    @property
    def prompt(self) -> str:
        """What the target is asked."""
        return f"{self.question} {self.instruction}".strip()


def questions() -> list[Question]:
    """The shipped question set (package data of loadtests)."""
    text = resources.files("loadtests").joinpath(*QUESTIONS).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    instruction = str(data.get("instruction") or "")
    return [
        Question(
            str(q["id"]),
            str(q["topic"]),
            str(q["question"]),
            str(q["answer"]),
            tuple(map(str, q.get("also", ()))),
            instruction,
        )
        for q in data["questions"]
    ]


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LONE_DOT = re.compile(r"(?<!\d)\.|\.(?!\d)")
_OTHER = re.compile(r"[^a-z0-9.]+")


def normalize(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    plain = _THOUSANDS.sub("", plain)
    plain = _LONE_DOT.sub(" ", plain)
    return " ".join(_OTHER.sub(" ", plain).split())


def is_correct(question: Question, reply: str) -> bool:
    said = f" {normalize(reply)} "
    return any(f" {normalize(spelling)} " in said for spelling in question.spellings)


@dataclass(frozen=True)
class Answer:
    id: str
    question: str
    expected: str
    reply: str | None
    correct: bool
    error: str | None = None


@dataclass(frozen=True)
class QualityResult:
    target: str
    answers: list[Answer] = field(default_factory=list)
    max_tokens: int = 0

    @property
    def correct(self) -> int:
        return sum(1 for a in self.answers if a.correct)

    @property
    def total(self) -> int:
        return len(self.answers)

    @property
    def errors(self) -> int:
        return sum(1 for a in self.answers if a.error is not None)

    @property
    def score(self) -> str:
        return f"{self.correct}/{self.total}"

    def to_json(self) -> dict[str, Any]:
        return {"correct": self.correct, "total": self.total, "errors": self.errors, **asdict(self)}


def request_body(model: str, question: Question, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": question.prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": False,
    }


def ask_one(client: httpx.Client, target: Target, question: Question, max_tokens: int) -> Answer:
    headers = {"Authorization": f"Bearer {target.key}"} if target.key else {}
    try:
        resp = client.post(
            f"{target.url}/v1/chat/completions", json=request_body(target.model, question, max_tokens), headers=headers
        )
        data = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        return Answer(question.id, question.question, question.answer, None, False, f"{type(exc).__name__}: {exc}")
    if resp.status_code != 200 or not isinstance(data, dict):
        message = error_message(data) if isinstance(data, dict) else str(data)
        return Answer(
            question.id, question.question, question.answer, None, False, f"HTTP {resp.status_code}: {message}"
        )
    try:
        reply = str(data["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        return Answer(question.id, question.question, question.answer, None, False, "no message in the answer")
    return Answer(question.id, question.question, question.answer, reply, is_correct(question, reply))


def ask(target: Target, config: QualityConfig, chosen: Sequence[Question] | None = None) -> QualityResult:
    """Every question through the target, `quality_concurrency` at a time; answers in question order."""
    chosen = list(chosen if chosen is not None else questions())
    timeout = httpx.Timeout(ANSWER_TIMEOUT_S, connect=10.0)
    # trust_env=False: benchmark traffic goes to the target, never through a proxy from the environment.
    with (
        httpx.Client(timeout=timeout, trust_env=False) as client,
        ThreadPoolExecutor(max(1, config.quality_concurrency)) as pool,
    ):
        answers = list(pool.map(lambda q: ask_one(client, target, q, config.quality_max_tokens), chosen))
    return QualityResult(target.name, answers, config.quality_max_tokens)


def quality_failures(results: Sequence[QualityResult], tolerance: int, reference: str = "baseline") -> list[str]:
    """Targets that answer more than `tolerance` questions fewer than the reference (the transformers baseline)."""
    ref = next((r for r in results if r.target == reference), None)
    if ref is None:
        return []
    return [
        f"quality: {r.target} answered {r.score}, more than {tolerance} below {reference}'s {ref.score}"
        for r in results
        if r is not ref and r.correct < ref.correct - tolerance
    ]


def table(results: Sequence[QualityResult]) -> str:
    """The scores, then every question some target missed, with each target's reply."""
    if not results:
        return ""
    width = max(len(r.target) for r in results)
    lines = [f"  {r.target:<{width}}  {r.score}" + (f" ({r.errors} errors)" if r.errors else "") for r in results]
    missed = [i for i, a in enumerate(results[0].answers) if any(not r.answers[i].correct for r in results)]
    if missed:
        lines += ["", "questions not answered correctly by every target:"]
    for i in missed:
        first = results[0].answers[i]
        lines.append(f"  {first.id}: {first.question} (expected {first.expected})")
        for r in results:
            a = r.answers[i]
            said = a.error if a.error is not None else _short(a.reply or "")
            lines.append(f"    {'ok  ' if a.correct else 'miss'} {r.target:<{width}}  {said}")
    return "\n".join(lines)


def _short(text: str, limit: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
