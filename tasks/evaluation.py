"""Evaluation hooks: judges of generated answers that a stage applies when its data allows.

A *judge factory* takes the datasets folder and the rows a stage generates
answers for (``site``, ``question_id``, ``prompt``) and returns a
:class:`Judge`, or None when it has nothing to say about those rows. Stages do
not know which judges exist: they ask :func:`judge_for` and log
``eval/<judge name>_rate``. The one factory registered by default is the
planted-property judge of generated dumps (``tasks/ingest/synthetic.py``):
on a generated dump, does an answer mention the question's key term and carry
a code block? On real data it returns None and nothing is logged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Judge:
    """``judge(i, answer)``: does the answer to row ``i`` have the property? ``judged``: the rows it applies to."""

    name: str
    fn: Callable[[int, str], bool]
    judged: list[int] = field(default_factory=list)

    def __call__(self, i: int, answer: str) -> bool:
        return self.fn(i, answer)


JudgeFactory = Callable[[Path, Sequence[dict]], Judge | None]
FACTORIES: list[JudgeFactory] = []


def register(factory: JudgeFactory) -> JudgeFactory:
    FACTORIES.append(factory)
    return factory


def judge_for(data: Path, rows: Sequence[dict]) -> Judge | None:
    """The first registered judge that applies to these rows (None: no judge, nothing to log)."""
    for factory in FACTORIES:
        judge = factory(Path(data), rows)
        if judge is not None:
            return judge
    return None


def rate(judge: Judge, answers: Sequence[str], indices: Sequence[int]) -> float:
    """Share of ``answers`` (to the rows ``indices``) that the judge accepts."""
    return sum(judge(i, a) for i, a in zip(indices, answers)) / max(len(indices), 1)


def _questions(data: Path, rows: Sequence[dict]) -> list[tuple[str, str] | None]:
    """(title, body) of each row's question in the datasets' posts (None where it is not there)."""
    import pandas as pd

    posts = pd.read_parquet(Path(data) / "posts.parquet", columns=["site", "post_id", "kind", "title", "body"])
    q = posts[posts.kind == "question"].set_index(["site", "post_id"])
    out: list[tuple[str, str] | None] = []
    for r in rows:
        key = (r["site"], r["question_id"])
        out.append((q.loc[key]["title"], q.loc[key]["body"]) if key in q.index else None)
    return out


@register
def planted_property(data: Path, rows: Sequence[dict]) -> Judge | None:
    """The planted rule of generated dumps; None when no row's question has a key term (not a generated dump)
    or the rows do not say which question they come from (no ``site`` / ``question_id``)."""
    if not rows or not {"site", "question_id"} <= set(rows[0]):
        return None
    from alignflow.tasks.ingest.synthetic import has_planted_property, key_term

    questions = _questions(data, rows)
    judged = [i for i, x in enumerate(questions) if x is not None and key_term(*x) is not None]
    if not judged:
        return None

    def fn(i: int, answer: str) -> bool:
        x: Any = questions[i]
        return x is not None and has_planted_property(x[0], x[1], answer)

    return Judge("planted", fn, judged)


def judged_rate(judge: Judge, model: Any, tokenizer: Any, rows: Sequence[dict], *, max_new_tokens: int,
                max_prompt_tokens: int) -> float:
    """Share of the greedy answers to the judged rows that the judge accepts."""
    from alignflow.tasks.train.lm import generate_greedy

    answers = generate_greedy(model, tokenizer, [rows[i]["prompt"] for i in judge.judged],
                              max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens)
    return rate(judge, answers, judge.judged)
