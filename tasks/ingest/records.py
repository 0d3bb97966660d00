"""The record every reader produces and the sink it hands records to.

Readers (Stack Exchange XML, Reddit JSON lines, pairs files) know formats;
they turn each input row into a :class:`PostRecord` (or a ready-made pair) and
hand it to a :class:`RecordSink`. They never hold a whole input in memory and
never decide pairs: grouping answers by question happens in the on-disk store,
and pairing rules are pure functions applied per question afterwards.

Every input row a reader sees ends in exactly one place: ``add_post``,
``add_pair``, ``quarantine`` or a named ``count`` of rows that are not
Q&A content (``skipped:<reason>``). That is what lets the ingest report add up.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what the staging store (SQLite INTEGER) holds
_ASCII_INT = re.compile(r"\s*[+-]?[0-9]+\s*")


def ascii_int(text: str | None, *, signed: bool = True) -> int | None:
    """The integer spelled by ``text`` in ASCII digits, if it fits 64 bits; else None.

    ``str.isdigit`` and ``int()`` also accept other scripts' digits (``١٢``,
    ``¹``) and ``_`` separators; dump ids and scores never use them.
    """
    if text is None or not _ASCII_INT.fullmatch(text) or (not signed and text.strip()[0] in "+-"):
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


def has_lone_surrogate(obj: Any) -> bool:
    """True if a JSON value holds a string with an unpaired surrogate (``"\\ud800"``), which is not text."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@dataclass(slots=True)
class PostRecord:
    site: str
    source: str  # "stackexchange" | "reddit"
    post_id: str
    kind: str  # "question" | "answer"
    question_id: str  # own id for questions, parent id for answers
    title: str = ""
    body: str = ""
    tags: str = ""
    score: int = 0
    accepted: bool = False
    accepted_answer_id: str = ""  # questions: the answer the asker accepted, when the dump says
    author: str = ""
    license: str = ""
    created_at: str = ""
    created_ts: float | None = None  # seconds since epoch, when the format gives it
    distinguished: bool = False  # moderator/admin comment (Reddit)
    source_file: str = ""
    line: int | None = None


@dataclass(slots=True)
class PairRecord:
    """A pair read from an already-paired file (prompt/chosen/rejected)."""

    prompt: str
    chosen: str
    rejected: str
    site: str
    source: str = "pairs"
    question_id: str = ""
    chosen_score: float | None = None
    rejected_score: float | None = None
    license: str = ""
    source_file: str = ""
    line: int | None = None
    extra: dict = field(default_factory=dict)


class RecordSink(Protocol):
    def add_post(self, post: PostRecord) -> None: ...

    def add_vote(self, site: str, post_id: str, vote_type: int) -> None: ...

    def add_pair(self, pair: PairRecord) -> None: ...

    def quarantine(
        self,
        *,
        source_file: str,
        reason: str,
        line: int | None = None,
        row_id: str | None = None,
        site: str = "",
        detail: str = "",
        raw: str = "",
    ) -> None: ...

    def count(self, source_file: str, key: str, n: int = 1) -> None: ...


class ListSink:
    """A sink that keeps everything in lists: for tests and small inputs."""

    def __init__(self) -> None:
        self.posts: list[PostRecord] = []
        self.votes: list[tuple[str, str, int]] = []
        self.pairs: list[PairRecord] = []
        self.quarantined: list[dict] = []
        self.counts: dict[tuple[str, str], int] = {}

    def add_post(self, post: PostRecord) -> None:
        self.posts.append(post)

    def add_vote(self, site: str, post_id: str, vote_type: int) -> None:
        self.votes.append((site, post_id, vote_type))

    def add_pair(self, pair: PairRecord) -> None:
        self.pairs.append(pair)

    def quarantine(self, *, source_file, reason, line=None, row_id=None, site="", detail="", raw="") -> None:
        self.quarantined.append(
            dict(source_file=source_file, reason=reason, line=line, row_id=row_id, site=site, detail=detail, raw=raw)
        )

    def count(self, source_file: str, key: str, n: int = 1) -> None:
        self.counts[(source_file, key)] = self.counts.get((source_file, key), 0) + n
