"""Reddit Pushshift dumps (``RS_*`` submissions, ``RC_*`` comments) -> posts; SHP pairing rules.

Reading
-------
:func:`read_reddit` streams one Pushshift file (``.zst`` or plain JSON lines)
and hands every row to a :class:`~.records.RecordSink`. Submissions become
``kind="question"`` posts, top-level comments become ``kind="answer"`` posts
whose ``question_id`` is the submission id. Every non-empty line is counted
once as ``rows`` and ends in exactly one of:

``add_post``
    a submission, or a top-level comment.
``quarantine``
    reasons ``deleted_body`` (comment body ``[deleted]`` / ``[removed]``),
    ``empty_body`` (comment body empty, before or after cleaning),
    ``deleted_title`` (submission title ``[deleted]``, ``[removed]`` or
    ``[deleted by user]``: no prompt left), ``empty_title`` (title empty after
    cleaning) and, only with ``on_bad_row="quarantine"``, ``not_json``,
    ``not_object``, ``missing_field``, ``bad_value``.
``count(file, "skipped:reply")``
    a comment that answers another comment (``parent_id`` ``t1_...``). With
    ``ingest.reddit_reply_pairs`` on, a valid reply goes to the reply store
    instead and the build counts it (``kept:reply`` / ``skipped:reply_*``, see
    ``reddit_replies.py``).

so ``rows == posts + quarantined + skipped:*`` for every file.

Problems that make the rest of a file untrustworthy always raise
:class:`~.errors.IngestError` naming the file and line: a truncated or corrupt
``.zst``, bytes that are not UTF-8, an empty file, an unsupported suffix, a
file whose kind (submissions or comments) cannot be told. Row problems (not
JSON, not an object, missing ``id`` or another required field, a value that
is not a number) raise too with ``on_bad_row="error"`` (the default).

Truncated ``.zst``: ``zstandard``'s ``stream_reader`` (and ``read_to_iter``)
return a silent early EOF when the input ends inside a frame (checked with
zstandard 0.25), so a half-downloaded dump would read as a shorter, valid
one. The shared line reader (``lines.py``) decompresses with ``decompressobj`` frame by frame instead
(:class:`ZstdFramesReader`) and raises when the input ends before a frame's
end. Pushshift dumps use a 2 GiB window (``--long=31``), hence
``max_window_size=2**31``; the decoder keeps up to one window of history, so
decompressing one such file can take up to ~2 GiB of memory whatever reads it
(``zstd -d --long=31`` too). Lines are decoded one at a time.

Pairing
-------
:func:`shp_pairs` applies the Stanford Human Preferences (SHP) rules to one
submission and its top-level comments; it is pure and deterministic.
"""

from __future__ import annotations

import hashlib
import json
import math
from itertools import combinations
from pathlib import Path

import orjson

from alignflow.config import RedditConfig

from . import clean as _clean
from .errors import BadRow, IngestError
from .lines import MAX_LINE_BYTES, OversizedLine, ZstdFramesReader, iter_text_lines, open_binary
from .records import INT64_MAX, INT64_MIN, PostRecord, RecordSink, has_lone_surrogate
from .reddit_replies import Node, Submission

__all__ = [
    "JSON_SUFFIXES",
    "SHP_COUNT_KEYS",
    "ZstdFramesReader",
    "iter_text_lines",
    "open_binary",
    "read_reddit",
    "shp_pairs",
]

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
DELETED_MARKERS = frozenset({"[deleted]", "[removed]"})
DELETED_TITLES = frozenset({"[deleted]", "[removed]", "[deleted by user]"})
RAW_KEEP_CHARS = 2000  # how much of a bad line the quarantine keeps


# --------------------------------------------------------------------------- values


def _to_int(value) -> int:
    """Scores: int, integral float, or a numeric string (``"12"``, ``"12.0"``), within 64 bits."""
    value = _to_int_unbounded(value)
    if not INT64_MIN <= value <= INT64_MAX:
        digits = str(value)
        raise ValueError(f"{digits[:24]}{'…' if len(digits) > 24 else ''} does not fit a 64-bit integer")
    return value


def _to_int_unbounded(value) -> int:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"not an integer: {value!r}")
    if isinstance(value, str):
        s = value.strip()
        if len(s) > 40:
            raise ValueError(f"not an integer: {s[:40]!r}…")
        try:
            if not s.isascii():
                raise ValueError(f"not an integer: {value!r}")
            return int(s)
        except ValueError:
            if not s.isascii():
                raise
            f = float(s)  # raises ValueError for non-numbers
            if math.isfinite(f) and f.is_integer():
                return int(f)
            raise ValueError(f"not an integer: {value!r}") from None
    raise ValueError(f"not a number: {value!r}")


def _to_ts(value) -> float:
    """``created_utc``: int, float or a numeric string -> float seconds."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, (int, float)):
        f = float(value)
    elif isinstance(value, str):
        f = float(value.strip())
    else:
        raise ValueError(f"not a timestamp: {value!r}")
    if not math.isfinite(f):
        raise ValueError(f"not a timestamp: {value!r}")
    return f


def _required(obj: dict, key: str):
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadRow("missing_field", f"missing required field `{key}`", key)
    return value


def _score(obj: dict) -> int:
    key = "score" if obj.get("score") is not None else "ups"
    value = obj.get(key)
    if value is None:
        raise BadRow("missing_field", "missing required field `score` (and no `ups`)", "score")
    try:
        return _to_int(value)
    except ValueError as exc:
        raise BadRow("bad_value", f"`{key}`: {exc}", key) from None


def _created(obj: dict) -> float:
    value = _required(obj, "created_utc")
    try:
        return _to_ts(value)
    except ValueError as exc:
        raise BadRow("bad_value", f"`created_utc`: {exc}", "created_utc") from None


def _author(obj: dict) -> str:
    author = obj.get("author")
    return f"name:{author}" if isinstance(author, str) and author else ""


def _subreddit(obj: dict) -> str:
    value = _required(obj, "subreddit")
    if not isinstance(value, str):
        raise BadRow("bad_value", f"`subreddit` is not a string: {value!r}", "subreddit")
    return value.strip()


def _kind_from_name(path: Path) -> str | None:
    name = path.name.upper()
    if name.startswith("RS_"):
        return "submission"
    if name.startswith("RC_"):
        return "comment"
    return None


def _kind_from_keys(obj: dict) -> str | None:
    if "title" in obj:
        return "submission"
    if "parent_id" in obj or "link_id" in obj:
        return "comment"
    return None


# --------------------------------------------------------------------------- reader


def read_reddit(
    path: Path,
    sink: RecordSink,
    *,
    default_license: str = "unknown",
    on_bad_row: str = "error",
    max_line_bytes: int = MAX_LINE_BYTES,
    replies=None,
    workers: int = 1,
) -> None:
    """Stream one Pushshift file (``RS_*`` submissions or ``RC_*`` comments) into ``sink``.

    ``replies`` (a :class:`.reddit_replies.ReplyStore`, for ``ingest.reddit_reply_pairs``) also
    receives every valid submission and comment; replies then go there instead of being counted
    ``skipped:reply``, and the build decides their fate.

    ``workers > 1``: rows are parsed on that many worker processes (``reddit_parallel.py``) and
    handed to ``sink`` in file order, so the result is the same as with one.

    ``.zst`` (any window up to 2 GiB, multi-frame) or plain ``.jsonl`` /
    ``.json`` / ``.ndjson`` (one JSON object per line). Submissions vs comments
    is decided by the name prefix (``RS_`` / ``RC_``), else by the keys of the
    first object (``title`` -> submissions; ``parent_id`` / ``link_id`` ->
    comments). See the module docstring for where each row ends.
    """
    if on_bad_row not in ("error", "quarantine"):
        raise ValueError(f"on_bad_row must be 'error' or 'quarantine', got {on_bad_row!r}")
    path = Path(path)
    file = str(path)
    suffix = path.suffix.lower()
    if suffix != ".zst" and suffix not in JSON_SUFFIXES:
        raise IngestError(
            f"unsupported file type {path.suffix!r}: expected .zst, .jsonl, .json or .ndjson", path=file
        )
    kind = _kind_from_name(path)
    if workers > 1 and kind is not None:  # the kind must be known before rows go to other processes
        from .reddit_parallel import read_in_workers

        read_in_workers(path, kind, sink, replies, workers=workers, default_license=default_license,
                        on_bad_row=on_bad_row, max_line_bytes=max_line_bytes)
        return
    for lineno, text in iter_text_lines(path, max_line_bytes):
        kind = read_line(text, lineno, kind, sink, file, default_license, on_bad_row, max_line_bytes, replies)


_FLOAT_OF_A_WIDE_INT = 2.0 ** 63  # orjson reads an integer past 64 bits as a float of at least this size


def _has_wide_float(values) -> bool:
    """Whether a float of at least 2**63 in magnitude is among ``values`` or inside them (dicts, lists)."""
    stack = [values]
    while stack:
        for value in stack.pop():
            kind = type(value)
            if kind is float:
                if not -_FLOAT_OF_A_WIDE_INT < value < _FLOAT_OF_A_WIDE_INT:
                    return True
            elif kind is dict:
                if value:
                    stack.append(value.values())
            elif kind is list and value:
                stack.append(value)
    return False


def parse_json_line(text: str):
    """``json.loads(text)``, about twice as fast on a Pushshift line: orjson parses, and the standard parser
    is asked again wherever orjson's answer could differ from its own. orjson refuses all that
    ``json.loads`` refuses and a few things it accepts (NaN, 1e400, lone surrogate escapes): those go to
    ``json.loads``, which raises or answers as it always did. orjson reads an integer beyond 64 bits as a
    float: a value holding a float that large is parsed again."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
    return json.loads(text) if _has_wide_float((obj,)) else obj


def read_line(text: str, lineno: int, kind: str | None, sink: RecordSink, file: str, default_license: str,
              on_bad_row: str, max_line_bytes: int, replies=None) -> str | None:
    """One non-blank line of a Pushshift file into ``sink``; returns the file's kind (known after the first row)."""
    sink.count(file, "rows")
    if isinstance(text, OversizedLine):
        quarantine_oversized_line(sink, file, lineno, text, max_line_bytes)
        return kind
    row_id: str | None = None
    site = ""
    try:
        try:
            obj = parse_json_line(text)
        except json.JSONDecodeError as exc:
            raise BadRow("not_json", f"not JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(obj, dict):
            raise BadRow("not_object", f"JSON value is a {type(obj).__name__}, not an object")
        if "\\u" in text and has_lone_surrogate(obj):
            raise BadRow("bad_value", "a string holds an unpaired surrogate escape (\\ud800-\\udfff): not text")
        rid = obj.get("id")
        if rid is None or (isinstance(rid, str) and not rid.strip()) or isinstance(rid, (dict, list, bool)):
            raise BadRow("missing_field", "missing required field `id`", "id")
        row_id = str(rid).strip()
        if kind is None:
            kind = _kind_from_keys(obj)
            if kind is None:
                raise IngestError(
                    "cannot tell submissions from comments: the file name does not start with RS_/RC_ "
                    "and the first object has neither `title` nor `parent_id`/`link_id`",
                    path=file,
                    line=lineno,
                    row_id=row_id,
                )
        if isinstance(obj.get("subreddit"), str):
            site = f"reddit/{obj['subreddit'].strip()}"
        if kind == "submission":
            _submission(obj, row_id, sink, file, lineno, default_license, replies)
        else:
            _comment(obj, row_id, sink, file, lineno, default_license, text, replies)
    except BadRow as bad:
        if on_bad_row == "error":
            raise IngestError(bad.message, path=file, line=lineno, row_id=row_id, field=bad.field) from None
        sink.quarantine(
            source_file=file,
            reason=bad.reason,
            line=lineno,
            row_id=row_id,
            site=site,
            detail=bad.message,
            raw=text[:RAW_KEEP_CHARS],
        )
    return kind


def quarantine_oversized_line(sink: RecordSink, file: str, lineno: int, head: str, limit: int) -> None:
    sink.quarantine(source_file=file, reason="too_large", line=lineno, detail=f"line longer than {limit} bytes "
                    "(ingest.max_row_bytes); not read", raw=head)


def _submission(obj: dict, post_id: str, sink: RecordSink, file: str, lineno: int, license: str,
                replies=None) -> None:
    subreddit = _subreddit(obj)
    score = _score(obj)
    created = _created(obj)
    title_raw = obj.get("title")
    if not isinstance(title_raw, str):
        raise BadRow("missing_field" if title_raw is None else "bad_value", "`title` is not a string", "title")
    selftext = obj.get("selftext")
    if selftext is not None and not isinstance(selftext, str):
        raise BadRow("bad_value", "`selftext` is not a string", "selftext")
    site = f"reddit/{subreddit}"
    if title_raw.strip() in DELETED_TITLES:
        sink.quarantine(source_file=file, reason="deleted_title", line=lineno, row_id=post_id, site=site,
                        detail=title_raw.strip())
        return
    title = _clean.clean_plain_text(title_raw)
    if not title.strip():
        sink.quarantine(source_file=file, reason="empty_title", line=lineno, row_id=post_id, site=site)
        return
    if selftext is None or selftext.strip() in DELETED_MARKERS:
        body = ""  # link posts have no selftext; removed selftext leaves the title as the prompt
    else:
        body = _clean.clean_plain_text(selftext)
    if replies is not None:
        replies.add_submission(Submission(post_id, site, title, body, score, _author(obj)))
    sink.add_post(
        PostRecord(
            site=site,
            source="reddit",
            post_id=post_id,
            kind="question",
            question_id=post_id,
            title=title,
            body=body,
            score=score,
            author=_author(obj),
            license=license,
            created_ts=created,
            source_file=file,
            line=lineno,
        )
    )


def _comment(obj: dict, post_id: str, sink: RecordSink, file: str, lineno: int, license: str, text: str,
             replies=None) -> None:
    parent = _required(obj, "parent_id")
    if not isinstance(parent, str):
        raise BadRow("bad_value", f"`parent_id` is not a string: {parent!r}", "parent_id")
    parent = parent.strip()
    is_reply = parent.startswith("t1_")
    if is_reply and replies is None:
        sink.count(file, "skipped:reply")
        return
    if len(parent) <= 3 or not (is_reply or parent.startswith("t3_")):
        raise BadRow("bad_value", f"`parent_id` {parent!r} is neither t3_<post> nor t1_<comment>", "parent_id")
    link = obj.get("link_id")
    if isinstance(link, str) and link.strip().startswith("t3_") and len(link.strip()) > 3:
        question_id = link.strip()[3:]
    else:
        question_id = "" if is_reply else parent[3:]
    subreddit = _subreddit(obj)
    site = f"reddit/{subreddit}"
    score = _score(obj)
    created = _created(obj)
    body_raw = obj.get("body")
    if body_raw is not None and not isinstance(body_raw, str):
        raise BadRow("bad_value", "`body` is not a string", "body")
    stripped = (body_raw or "").strip()
    if stripped in DELETED_MARKERS:
        sink.quarantine(source_file=file, reason="deleted_body", line=lineno, row_id=post_id, site=site,
                        detail=stripped)
        return
    if not stripped:
        sink.quarantine(source_file=file, reason="empty_body", line=lineno, row_id=post_id, site=site)
        return
    body = _clean.clean_plain_text(body_raw)
    if not body.strip():
        sink.quarantine(source_file=file, reason="empty_body", line=lineno, row_id=post_id, site=site,
                        detail="empty after cleaning", raw=text[:RAW_KEEP_CHARS])
        return
    if replies is not None:
        replies.add_comment(Node(post_id, parent, question_id, site, body, score, created, _author(obj),
                                 bool(obj.get("distinguished")), license, file, lineno), reply=is_reply)
        if is_reply:
            return
    sink.add_post(
        PostRecord(
            site=site,
            source="reddit",
            post_id=post_id,
            kind="answer",
            question_id=question_id,
            body=body,
            score=score,
            author=_author(obj),
            license=license,
            created_ts=created,
            distinguished=bool(obj.get("distinguished")),
            source_file=file,
            line=lineno,
        )
    )


# --------------------------------------------------------------------------- SHP pairs

SHP_COUNT_KEYS = (
    "post_score_too_low",  # posts (0 or 1): the submission scored below min_post_score -> no pairs
    "op_comment",  # answers written by the submission's author
    "distinguished",  # answers by moderators/admins
    "comment_score_too_low",  # answers scoring below min_comment_score
    "duplicate_answer",  # answers whose post_id was already seen (dumps can repeat a row)
    "not_considered",  # answers beyond the max_comments_per_post highest-scored ones
    "tie",  # candidate pairs (unordered) with equal scores
    "not_written_later",  # pairs where the higher-scored comment is not strictly newer
    "score_ratio_too_low",  # pairs whose score ratio is below min_score_ratio
    "capped",  # valid pairs left out by the max_pairs_per_post cap
)

_ANON_AUTHORS = frozenset({"", "name:", "name:[deleted]", "name:[removed]"})


def _pair_key(seed: int, chosen: PostRecord, rejected: PostRecord) -> tuple[str, str, str]:
    digest = hashlib.sha256(f"{seed}:{chosen.post_id}:{rejected.post_id}".encode()).hexdigest()
    return digest, chosen.post_id, rejected.post_id


def shp_pairs(
    question: PostRecord,
    answers: list[PostRecord],
    cfg: RedditConfig,
    seed: int = 0,
    *,
    with_fates: bool = False,
):
    """Stanford SHP preference pairs ``(chosen, rejected)`` among a post's top-level comments.

    Rules, in order:

    1. the post must score ``>= cfg.min_post_score``, else no pairs
       (``post_score_too_low`` = 1);
    2. answers are dropped when written by the post's author
       (``cfg.drop_op_comments``; ``name:[deleted]`` and empty authors never
       match), distinguished (``cfg.drop_distinguished``), or scoring
       ``< cfg.min_comment_score``; a repeated ``post_id`` keeps its first
       occurrence; of the rest only the ``cfg.max_comments_per_post``
       highest-scored (ties by id) are paired (``not_considered``): the
       pairs of a post grow with the square of its comments;
    3. of each two remaining answers, the higher-scored ``A`` is preferred to
       ``B`` only if ``A`` was written strictly later
       (``created_ts(A) > created_ts(B)``; a missing timestamp fails) and
       ``score(A) >= cfg.min_score_ratio * score(B)`` (if ``score(B) <= 0``
       this holds exactly when ``score(A) > 0``); equal scores are ties;
    4. at most ``cfg.max_pairs_per_post`` pairs are kept: those with the
       smallest ``sha256(f"{seed}:{A.post_id}:{B.post_id}")``.

    Independent of the order of ``answers``. The returned dict has every key
    of :data:`SHP_COUNT_KEYS`; answer-level keys count answers, pair-level
    keys (``tie`` .. ``capped``) count unordered pairs of remaining answers.
    With ``with_fates=True`` a third value maps each answer dropped at step 2
    to its reason (``op_comment``, ``distinguished``, ``comment_score_too_low``,
    ``duplicate_answer``, ``not_considered``).
    """
    counts = dict.fromkeys(SHP_COUNT_KEYS, 0)
    fates: dict[str, str] = {}
    for a in answers:
        if a.question_id != question.post_id:
            raise ValueError(
                f"answer {a.post_id} belongs to question {a.question_id!r}, not {question.post_id!r}"
            )
    if question.score < cfg.min_post_score:
        counts["post_score_too_low"] = 1
        return ([], counts, fates) if with_fates else ([], counts)

    op = question.author
    kept: dict[str, PostRecord] = {}
    for a in answers:
        if a.post_id in kept:
            counts["duplicate_answer"] += 1
            continue
        if cfg.drop_op_comments and op not in _ANON_AUTHORS and a.author == op:
            reason = "op_comment"
        elif cfg.drop_distinguished and a.distinguished:
            reason = "distinguished"
        elif a.score < cfg.min_comment_score:
            reason = "comment_score_too_low"
        else:
            kept[a.post_id] = a
            continue
        counts[reason] += 1
        fates.setdefault(a.post_id, reason)
    ranked = sorted(kept.values(), key=lambda p: (-p.score, p.post_id))
    for a in ranked[cfg.max_comments_per_post:]:
        counts["not_considered"] += 1
        fates[a.post_id] = "not_considered"
    considered = ranked[: cfg.max_comments_per_post]

    candidates: list[tuple[PostRecord, PostRecord]] = []
    for x, y in combinations(sorted(considered, key=lambda p: p.post_id), 2):
        if x.score == y.score:
            counts["tie"] += 1
            continue
        a, b = (x, y) if x.score > y.score else (y, x)
        if a.created_ts is None or b.created_ts is None or not a.created_ts > b.created_ts:
            counts["not_written_later"] += 1
            continue
        ratio_ok = a.score >= cfg.min_score_ratio * b.score if b.score > 0 else a.score > 0
        if not ratio_ok:
            counts["score_ratio_too_low"] += 1
            continue
        candidates.append((a, b))

    candidates.sort(key=lambda ab: _pair_key(seed, ab[0], ab[1]))
    cap = cfg.max_pairs_per_post
    counts["capped"] = max(0, len(candidates) - cap)
    return (candidates[:cap], counts, fates) if with_fates else (candidates[:cap], counts)
