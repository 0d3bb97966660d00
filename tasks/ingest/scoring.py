"""Pure functions: vote counts -> preference scores, pairs, splits and ids."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from string import Formatter

SPLITS = ("train", "validation", "test")


def pm_score(upvotes: int, vote_score: int, accepted: bool) -> int:
    """Preference-model score of an answer (Askell et al. 2021; H4 stack-exchange-preferences).

    ``round(log2(1 + upvotes))``, plus 1 when the asker accepted the answer;
    ``-1`` whenever the net vote score is negative. Without Votes.xml the
    caller passes ``upvotes = max(Score, 0)`` and ``vote_score = Score``.
    """
    if vote_score < 0:
        return -1
    score = round(math.log2(1 + max(upvotes, 0)))
    return score + 1 if accepted else score


def stable_unit(*parts: object) -> float:
    """A number in [0, 1) from the SHA-256 of the parts: the same on every machine and Python."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(site: str, question_id: str, *, train: float, validation: float, salt: str) -> str:
    """Split of a question, by a stable hash of ``site:question_id`` (never by pair)."""
    u = stable_unit(salt, site, question_id)
    if u < train:
        return "train"
    if u < train + validation:
        return "validation"
    return "test"


def configured_split(split, site: str, question_id: str) -> str:
    """:func:`assign_split` with the fractions and salt of ``split`` (an ``ingest.split`` config section)."""
    return assign_split(site, question_id, train=split.train, validation=split.validation, salt=split.salt)


def short_id(*parts: object, length: int = 20) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()[:length]


def combined_license(a: str, b: str) -> str:
    """The licence of a pair of texts: theirs when they share one, else both (``CC BY-SA 3.0 + CC BY-SA 4.0``)."""
    return a if a == b else " + ".join(sorted({x for x in (a, b) if x}))


def numeric_key(post_id: str) -> str:
    """Sort key that orders numeric ids numerically and other ids after them, as strings."""
    return post_id.zfill(20) if post_id.isdigit() and len(post_id) <= 20 else "~" + post_id


@dataclass(frozen=True, slots=True)
class Candidate:
    """An answer as pairing sees it."""

    post_id: str
    pm_score: int


@dataclass(frozen=True, slots=True)
class PairStats:
    candidates: int  # answer pairs of the question (n choose 2)
    ties: int  # dropped: equal pm_score
    capped: int  # dropped: beyond max_pairs
    kept: int


def rank_pairs(
    answers: Sequence[Candidate], *, max_pairs: int, seed: int, key: str
) -> tuple[list[tuple[int, int]], PairStats]:
    """Pairs (chosen index, rejected index) among one question's answers.

    Every two answers with different ``pm_score`` make a pair, the higher one
    chosen; ties are dropped. When there are more than ``max_pairs``, the kept
    ones are the first by a seeded stable hash of the two answer ids: an
    unbiased, deterministic choice (no preference for large margins).
    """
    n = len(answers)
    candidates = n * (n - 1) // 2
    pairs: list[tuple[int, int]] = []
    ties = 0
    for i, j in itertools.combinations(range(n), 2):
        a, b = answers[i], answers[j]
        if a.pm_score == b.pm_score:
            ties += 1
        elif a.pm_score > b.pm_score:
            pairs.append((i, j))
        else:
            pairs.append((j, i))
    capped = 0
    if len(pairs) > max_pairs:
        pairs.sort(key=lambda p: stable_unit(seed, key, answers[p[0]].post_id, answers[p[1]].post_id))
        capped = len(pairs) - max_pairs
        pairs = pairs[:max_pairs]
    pairs.sort(key=lambda p: (numeric_key(answers[p[0]].post_id), numeric_key(answers[p[1]].post_id)))
    return pairs, PairStats(candidates=candidates, ties=ties, capped=capped, kept=len(pairs))


def best_answer(answers: Sequence[Candidate], accepted: Sequence[bool], min_pm_score: int) -> int | None:
    """Index of the answer that becomes the question's SFT demonstration, or None.

    Highest ``pm_score`` wins (acceptance already adds 1 to it); among equals,
    the accepted one, then the lowest id. Below ``min_pm_score`` there is none.
    """
    if not answers:
        return None
    best = min(
        range(len(answers)),
        key=lambda i: (-answers[i].pm_score, not accepted[i], numeric_key(answers[i].post_id)),
    )
    return best if answers[best].pm_score >= min_pm_score else None


TEMPLATE_FIELDS = frozenset({"title", "body", "site", "tags"})


def check_template(template: str) -> None:
    """Raise ValueError when the prompt template names an unknown field."""
    parts = list(Formatter().parse(template))  # ValueError for a lone brace
    names = {name for _, name, _, _ in parts if name is not None}
    if any(spec or conversion for _, name, spec, conversion in parts if name is not None):
        raise ValueError("prompt_template fields take no format spec or conversion (write {title}, not {title:...})")
    unknown = names - TEMPLATE_FIELDS
    if unknown or "" in names:
        raise ValueError(
            f"prompt_template uses unknown field(s) {sorted(unknown) or ['{}']}; "
            f"available: {sorted(TEMPLATE_FIELDS)}"
        )


def render_prompt(template: str, *, title: str, body: str, site: str = "", tags: str = "") -> str:
    return template.format(title=title, body=body, site=site, tags=tags)
