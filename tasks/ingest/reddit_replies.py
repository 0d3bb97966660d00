"""Reddit reply pairs (``ingest.reddit_reply_pairs``): preferences among sibling replies to one comment.

A comment month without its submissions month (``RC_`` without ``RS_``) gives
no SHP pairs: top-level comments have no post title to be the prompt. Its
replies still can. With ``ingest.reddit_reply_pairs`` on, the replies to one
comment are paired with the SHP rules (:func:`reply_pairs`, the same rules as
:func:`.reddit.shp_pairs`), and the prompt is the conversation they answer:
the submission's title and text when the submission is in the input, then the
ancestors of the parent comment, oldest first, ending with the parent
(:func:`ancestor_chain`, :func:`render_reply_prompt`).

Out of core
-----------
A Pushshift comment month holds tens of millions of comments and a reply may
come anywhere after (or before) its parent. Comments and submissions are
written to an on-disk SQLite database (:class:`ReplyStore`) while the month
is read; the build walks the replies grouped by ``(thread, parent)`` through
an index and looks ancestors up by id with a bounded cache. Memory is bounded
by SQLite's page cache, the cache of ancestors, and one parent's replies.

Accounting
----------
With the option on, a reply (``parent_id`` ``t1_...``) whose row is valid is no
longer ``skipped:reply`` at read time; the walk gives it exactly one of:

``kept:reply``                    in at least one kept pair
``skipped:reply_parent_missing``  its parent comment is not in the input (or was quarantined)
``skipped:reply_duplicate``       a reply with the same id came earlier in the input
``skipped:reply_op_comment``      written by the author of the comment it answers
``skipped:reply_distinguished``   a moderator/admin reply
``skipped:reply_comment_score_too_low``  scored below ``ingest.reddit.min_comment_score``
``skipped:reply_not_considered``  beyond ``ingest.reddit.max_comments_per_post`` highest-scored siblings
``skipped:reply_post_score_too_low``  its thread's submission scored below ``ingest.reddit.min_post_score``
``skipped:reply_unpaired``        passed the filters, but none of its pairs was kept (no sibling,
                                  ties, not written later, score ratio, cap)

Replies quarantined by the reader (deleted body, bad rows) stay quarantined.
Pair-level counts go to the report's ``pairs`` section under ``reply:``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from alignflow.config import IngestConfig, RedditConfig

from .records import PostRecord
from .scoring import render_prompt, short_id
from .store import attached, column_names, sqlite_image

__all__ = [
    "MAX_CONTEXT_COMMENTS",
    "Node",
    "ReplyStore",
    "Submission",
    "ancestor_chain",
    "comment_row",
    "render_reply_prompt",
    "reply_pairs",
    "write_reply_pairs",
]

FILE_NAME = "reddit_replies.sqlite"
MAX_CONTEXT_COMMENTS = 6  # the parent and at most 5 of its ancestors make the prompt
CACHE_NODES = 20_000  # ancestors kept in memory while walking (a thread's recent comments)


@dataclass(slots=True)
class Node:
    """A comment as the reply walk sees it. ``parent`` is the fullname (``t1_x`` / ``t3_x``); ``link`` the
    submission id (without ``t3_``). Not frozen: the walk makes one per reply, and a frozen dataclass's
    ``__init__`` costs 4x as much (1.6 against 0.4 us for these twelve fields); nothing changes one after."""

    id: str
    parent: str
    link: str
    site: str
    body: str
    score: int
    created_ts: float | None
    author: str
    distinguished: bool
    license: str = ""
    source_file: str = ""
    line: int | None = None
    rid: int | None = None  # its row in the reply store (the walk reads body and license from there when needed)


@dataclass(frozen=True, slots=True)
class Submission:
    id: str
    site: str
    title: str
    body: str
    score: int
    author: str


# --------------------------------------------------------------------------- pure logic


def ancestor_chain(parent_id: str, lookup: Callable[[str], Node | None],
                   max_comments: int = MAX_CONTEXT_COMMENTS) -> tuple[list[Node], str]:
    """The comments a reply answers, oldest first, ending with its parent comment ``parent_id``.

    Walks up through ``lookup`` (comment id -> :class:`Node` or None) until a
    top-level comment (parent ``t3_``), a missing ancestor, a cycle, or
    ``max_comments`` comments. Returns ``(chain, stop)`` where ``stop`` says why
    the walk ended: ``"top"`` (reached the top-level comment), ``"missing"``
    (an ancestor is not in the input: the context starts below it), ``"depth"``
    (capped) or ``"no_parent"`` (the parent itself is missing: ``chain == []``).
    """
    chain: list[Node] = []
    seen: set[str] = set()
    current = parent_id
    while True:
        node = lookup(current)
        if node is None:
            stop = "missing" if chain else "no_parent"
            break
        if node.id in seen:  # a malformed dump could loop; never follow it twice
            stop = "missing"
            break
        seen.add(node.id)
        chain.append(node)
        if not node.parent.startswith("t1_"):
            stop = "top"
            break
        if len(chain) >= max_comments:
            stop = "depth"
            break
        current = node.parent[3:]
    chain.reverse()
    return chain, stop


def render_reply_prompt(template: str, *, site: str, chain: list[str], submission_title: str | None,
                        submission_body: str = "", max_chars: int = 20_000) -> str:
    """The prompt of a reply: the thread's title (or, without the submission, a line naming the
    subreddit), then the submission's text and the comments answered, oldest first, each as
    ``Comment:``; the last one is the parent. Older comments are left out, oldest first, while the
    comments exceed ``max_chars`` (the parent always stays)."""
    kept: list[str] = []
    used = 0
    for i, text in enumerate(reversed(chain)):
        if i and used + len(text) > max_chars:
            break
        kept.append(text)
        used += len(text)
    kept.reverse()
    parts = [submission_body] if submission_body.strip() else []
    parts += [f"Comment: {text}" for text in kept]
    title = submission_title if submission_title else f"A comment thread in r/{site.removeprefix('reddit/')}"
    return render_prompt(template, title=title, body="\n\n".join(parts), site=site)


REPLY_SKIP_KEYS = ("op_comment", "distinguished", "comment_score_too_low", "not_considered")


def reply_pairs(parent: Node, replies: list[Node], cfg: RedditConfig, *, submission_score: int | None = None,
                seed: int = 0) -> tuple[list[tuple[Node, Node]], dict[str, int], dict[str, str]]:
    """SHP pairs ``(chosen, rejected)`` among the replies to one comment.

    The rules of :func:`.reddit.shp_pairs`, with the parent comment in the
    submission's place: replies by the parent's author are dropped
    (``drop_op_comments``), distinguished ones (``drop_distinguished``) and
    those under ``min_comment_score``; the higher-scored reply of a pair must
    be written strictly later and reach ``min_score_ratio`` times the other's
    score; ties are dropped; at most ``max_pairs_per_post`` pairs per parent,
    chosen by the same seeded hash. ``min_post_score`` applies to the thread's
    submission when it is known (``submission_score``); a comment-only month
    has none, and the rule is not applied.

    Returns ``(pairs, counts, fates)``: ``counts`` has the keys of
    :data:`.reddit.SHP_COUNT_KEYS`; ``fates`` maps every reply id to
    ``"kept"`` or the reason it is in no pair (see the module docstring).
    Independent of the order of ``replies``; duplicate ids must be removed
    before (the store does).
    """
    from .reddit import shp_pairs

    fates: dict[str, str] = {}
    question = PostRecord(site=parent.site, source="reddit", post_id=parent.id, kind="question",
                          question_id=parent.id, score=submission_score if submission_score is not None
                          else cfg.min_post_score, author=parent.author, created_ts=parent.created_ts)
    answers = [PostRecord(site=r.site, source="reddit", post_id=r.id, kind="answer", question_id=parent.id,
                          body="", score=r.score, author=r.author, created_ts=r.created_ts,
                          distinguished=r.distinguished) for r in replies]
    by_id = {r.id: r for r in replies}
    pairs, counts, dropped = shp_pairs(question, answers, cfg, seed=seed, with_fates=True)
    in_pair = {p.post_id for pair in pairs for p in pair}
    for r in replies:
        if r.id in in_pair:
            fates[r.id] = "kept"
        elif counts["post_score_too_low"]:
            fates[r.id] = "post_score_too_low"
        else:
            fates[r.id] = dropped.get(r.id, "unpaired")
    return [(by_id[c.post_id], by_id[r.post_id]) for c, r in pairs], counts, fates


def lone_reply_fate(parent: Node, reply: Node, cfg: RedditConfig, submission_score: int | None) -> str:
    """:func:`reply_pairs`' answer for a parent with one reply (most parents), without building its records:
    no pair, and this fate of the reply; a fate other than ``unpaired`` is also the one count of ``counts``."""
    from .reddit import _ANON_AUTHORS

    if submission_score is not None and submission_score < cfg.min_post_score:
        return "post_score_too_low"
    if cfg.drop_op_comments and parent.author not in _ANON_AUTHORS and reply.author == parent.author:
        return "op_comment"
    if cfg.drop_distinguished and reply.distinguished:
        return "distinguished"
    if reply.score < cfg.min_comment_score:
        return "comment_score_too_low"
    return "unpaired"  # max_comments_per_post >= 2: it is considered, and alone


# --------------------------------------------------------------------------- on-disk store


def comment_row(node: Node, reply: bool) -> tuple:
    """A comment as a row of the store's ``comments`` table (the columns ``add_comment`` inserts)."""
    return (node.id, node.parent, node.link, node.site, node.body, node.score, node.created_ts, node.author,
            int(node.distinguished), node.license, node.source_file, node.line, int(reply))


# the columns of the reply store's tables (after rid), in the order of comment_row and of a submission's row
_COMMENT_TYPES = ("id TEXT, parent TEXT, link TEXT, site TEXT, body TEXT, score INT, created_ts REAL, author TEXT, "
                  "distinguished INT, license TEXT, source_file TEXT, line INT, reply INT")
_SUBMISSION_TYPES = "id TEXT, site TEXT, title TEXT, body TEXT, score INT, author TEXT"
_COMMENT_COLUMNS = ", ".join(column_names(_COMMENT_TYPES))
_NODE_COLUMNS = "id, parent, link, site, body, score, created_ts, author, distinguished, license, source_file, line"
# what the reply walk reads of a reply besides its keys (the replies index carries them)
_REPLY_FIELDS = "site, score, created_ts, author, distinguished, source_file, line"
_SUBMISSION_COLUMNS = ", ".join(column_names(_SUBMISSION_TYPES))


REPLY_TABLES = [("comments", _COMMENT_TYPES), ("submissions", _SUBMISSION_TYPES)]  # a reading worker's image


def replies_image(comments: list[tuple], submissions: list[tuple]) -> bytes:
    """Rows of :func:`comment_row` and submission rows as an SQLite image (:meth:`ReplyStore.add_shard`)."""
    (comments_table, comments_types), (submissions_table, submissions_types) = REPLY_TABLES
    return sqlite_image({comments_table: (comments_types, comments),
                         submissions_table: (submissions_types, submissions)})


class ReplyStore:
    """Comments and submissions of the Reddit inputs, on disk, for the reply walk.

    ``add_comment`` takes every valid comment (top-level ones only as possible
    parents; replies also as candidates), ``add_submission`` every valid
    submission. Rows are buffered and inserted in batches.
    """

    def __init__(self, path: Path, *, batch: int = 5000, cache_mb: int = 32, create: bool = True) -> None:
        self.path = Path(path)
        if create and self.path.exists():
            self.path.unlink()
        self.db = sqlite3.connect(self.path)
        self.db.executescript(
            f"""
            PRAGMA journal_mode=OFF;
            PRAGMA synchronous=OFF;
            PRAGMA temp_store=FILE;
            PRAGMA cache_size=-{cache_mb * 1024};
            """
        )
        if create:
            self.db.executescript(
                f"""
                CREATE TABLE comments (rid INTEGER PRIMARY KEY, {_COMMENT_TYPES});
                CREATE TABLE submissions (rid INTEGER PRIMARY KEY, {_SUBMISSION_TYPES});
                """
            )
        self.batch = batch
        self._comments: list[tuple] = []
        self._submissions: list[tuple] = []
        self._last_submission: tuple[str, Submission | None] | None = None
        self._indexing: threading.Thread | None = None  # index_in_background's thread, until finish_loading
        self._indexing_error: BaseException | None = None

    @classmethod
    def beside(cls, staging_path: Path) -> Path:
        return Path(staging_path).with_name(FILE_NAME)

    # -- loading ---------------------------------------------------------------
    def add_comment(self, node: Node, *, reply: bool) -> None:
        self._comments.append(comment_row(node, reply))
        if len(self._comments) >= self.batch:
            self._flush()

    def add_comment_rows(self, rows: list[tuple]) -> None:
        self._comments.extend(rows)
        if len(self._comments) >= self.batch:
            self._flush()

    def add_shard(self, image: bytes) -> None:
        """Copy a reading worker's comments and submissions (:func:`replies_image`) in, after those added before."""
        self._flush()
        with attached(self.db, image):
            for table, names in (("comments", _COMMENT_COLUMNS), ("submissions", _SUBMISSION_COLUMNS)):
                self.db.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM shard.{table} "
                                "ORDER BY rowid")

    def add_submission(self, sub: Submission) -> None:
        self._submissions.append((sub.id, sub.site, sub.title, sub.body, sub.score, sub.author))
        if len(self._submissions) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        if self._comments:
            self.db.executemany(
                f"INSERT INTO comments ({_COMMENT_COLUMNS}) VALUES ({','.join('?' * 13)})", self._comments)
            self._comments.clear()
        if self._submissions:
            self.db.executemany(f"INSERT INTO submissions ({_SUBMISSION_COLUMNS}) VALUES (?,?,?,?,?,?)",
                                self._submissions)
            self._submissions.clear()

    def close(self) -> None:
        self._flush()
        self.db.commit()
        self.db.close()

    # -- walking -----------------------------------------------------------------
    def index_in_background(self, cache_mb: int = 16) -> None:
        """Start :meth:`finish_loading`'s SQL on a thread, on a connection of its own (SQLite runs it without
        the GIL), so the indexes are built while this process walks the submissions; ``finish_loading`` then
        waits for it. Nothing may be added after this call."""
        self._flush()
        self.db.commit()

        def run() -> None:
            try:
                db = sqlite3.connect(self.path)
                try:
                    db.executescript(f"PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=FILE; "
                                     f"PRAGMA cache_size=-{cache_mb * 1024};")
                    _build_indexes(db)
                finally:
                    db.close()
            except BaseException as exc:  # noqa: BLE001 - raised again by finish_loading, in the caller's thread
                self._indexing_error = exc

        self._indexing = threading.Thread(target=run, name="alignflow-reply-indexes", daemon=True)
        self._indexing.start()

    def finish_loading(self) -> None:
        indexing = self._indexing
        if indexing is not None:
            indexing.join()
            self._indexing = None
            if self._indexing_error is not None:
                raise self._indexing_error
        else:
            self._flush()
            _build_indexes(self.db)
        self._cache: OrderedDict[str, Node | None] = OrderedDict()
        self._last_submission = None

    def lookup(self, comment_id: str) -> Node | None:
        """The first comment with this id (a repeated id keeps its first row)."""
        cache = self._cache
        if comment_id in cache:
            cache.move_to_end(comment_id)
            return cache[comment_id]
        row = self.db.execute(
            f"SELECT {_NODE_COLUMNS}, rid FROM comments WHERE id = ? ORDER BY rid LIMIT 1", (comment_id,)).fetchone()
        node = None if row is None else Node(*row[:8], bool(row[8]), *row[9:])
        cache[comment_id] = node
        if len(cache) > CACHE_NODES:
            cache.popitem(last=False)
        return node

    def submission(self, link: str) -> Submission | None:
        """The first submission with this id. The walk asks for one thread's submission parent after parent
        (groups come by thread), so the last answer is kept."""
        last = self._last_submission
        if last is not None and last[0] == link:
            return last[1]
        row = self.db.execute("SELECT id, site, title, body, score, author FROM submissions WHERE id = ? "
                              "ORDER BY rid LIMIT 1", (link,)).fetchone()
        sub = None if row is None else Submission(*row)
        self._last_submission = (link, sub)
        return sub

    def reply_groups(self) -> Iterator[tuple[str, list[tuple[Node, bool]], Node | None]]:
        """Yield ``(parent fullname, [(reply, is_duplicate), ...], parent comment)`` per parent, by thread,
        parent, reply id, read from the indexes alone. The replies come without their ``body`` and ``license``
        (None; :meth:`fill_texts`). The parent comment is the first row with the parent's id (None: not in
        the input), with its ``id``, ``link``, ``author`` and ``rid`` only: what the rules read. It comes from
        a second query beside the first, in the same order: one statement instead of one per parent."""
        cursor = self.db.execute(
            f"SELECT link, parent, id, rid, {_REPLY_FIELDS}, reply FROM comments INDEXED BY replies_by_parent "
            "WHERE reply >= 1 ORDER BY link, parent, id, rid")
        parents = self.db.execute(
            "SELECT g.link, g.parent, c.rid, c.link, c.author FROM "
            "(SELECT DISTINCT link, parent FROM comments INDEXED BY replies_by_parent WHERE reply >= 1) g "
            "LEFT JOIN comments c INDEXED BY comments_by_id ON substr(g.parent, 1, 3) = 't1_' "
            "AND c.id = substr(g.parent, 4) AND c.rid = (SELECT min(rid) FROM comments WHERE id = substr(g.parent, 4)) "
            "ORDER BY g.link, g.parent")
        current = None
        group: list[tuple[Node, int]] = []
        for link, parent, cid, rid, site, score, created, author, distinguished, source_file, line, reply in cursor:
            if (link, parent) != current:
                if group:
                    yield current[1], group, self._parent_row(parents, current, group[0][0].site)
                current, group = (link, parent), []
            group.append((Node(cid, parent, link, site, None, score, created, author, bool(distinguished), None,
                               source_file, line, rid), reply == 2))
        if group:
            yield current[1], group, self._parent_row(parents, current, group[0][0].site)

    @staticmethod
    def _parent_row(parents, key: tuple[str, str], site: str) -> Node | None:
        link, name, rid, parent_link, author = next(parents)
        if (link, name) != key:  # both queries walk the same index in the same order
            raise RuntimeError(f"reply store: parent rows out of step at {key!r} (got {(link, name)!r})")
        return None if rid is None else Node(name[3:], "", parent_link, site, None, 0, None, author, False, None,
                                             "", None, rid)

    def fill_texts(self, nodes: list[Node]) -> None:
        """Read the ``body`` and ``license`` of nodes that came without them (:meth:`reply_groups`)."""
        for node in nodes:
            if node.body is None:
                node.body, node.license = self.db.execute(
                    "SELECT body, license FROM comments WHERE rid = ?", (node.rid,)).fetchone()


def _build_indexes(db: sqlite3.Connection) -> None:
    """The reply walk's indexes, and its repeated replies marked (``reply = 2``)."""
    # Both indexes carry what the walk's rules read, so the walk never reads the table (every comment's
    # text) out of order: the parent's link and author here, a reply's fields but its text below. Texts are
    # read by row for the replies in kept pairs and the comments of their prompts (a few in a hundred).
    db.execute("CREATE INDEX IF NOT EXISTS comments_by_id ON comments (id, rid, link, author)")
    db.execute("CREATE INDEX IF NOT EXISTS submissions_by_id ON submissions (id, rid)")
    # reply = 2: a reply whose id an earlier row (any comment) already had; found in the ids' index (no pass
    # over the table and its texts), then set on those rows alone
    db.execute("UPDATE comments SET reply = 2 WHERE reply = 1 AND rid IN (SELECT c.rid FROM "
               "(SELECT id, min(rid) AS first FROM comments INDEXED BY comments_by_id GROUP BY id "
               "HAVING count(*) > 1) d JOIN comments c INDEXED BY comments_by_id ON c.id = d.id "
               "AND c.rid > d.first)")
    db.execute(f"CREATE INDEX IF NOT EXISTS replies_by_parent ON comments (link, parent, id, rid, "
               f"{_REPLY_FIELDS}, reply) WHERE reply >= 1")
    db.commit()


# --------------------------------------------------------------------------- the build step


def write_reply_pairs(replies: ReplyStore, builder, cfg: IngestConfig) -> None:
    """Walk the replies by parent, pair them, and hand pairs and prompts to the builder's writers.

    Every reply's fate goes to the store's per-file counts (``kept:reply`` /
    ``skipped:reply_*``); pair-level counts go to the report's pairs section
    under ``reply:``. With several workers the same walk runs on a process of
    its own (:mod:`.reply_walker`) and its output is handed over the same way.
    """
    replies.finish_loading()
    fates_by_file, walk = walk_reply_pairs(replies, cfg, builder.split_of,
                                           lambda prompt, pairs: add_reply_group(builder, prompt, pairs))
    add_reply_counts(builder, fates_by_file, walk)


def add_reply_group(builder, prompt: dict, pairs: list[dict]) -> None:
    """One parent's prompt row and its pairs' rows into the builder's writers, as the walk made them."""
    builder.writers["prompts"].add(prompt)
    for row in pairs:
        builder.writers["pairs"].add(row)
    for w in builder.writers.values():
        w.maybe_flush()


def add_reply_counts(builder, fates_by_file: Counter, walk: Counter) -> None:
    """The walk's counts: each reply's fate to its file's accounting, the pair-level counts to the report."""
    for (source_file, key), n in fates_by_file.items():
        builder.store.count(source_file, key, n)
    builder.summary.pair_stats.update(walk)


def walk_reply_pairs(replies: ReplyStore, cfg: IngestConfig, split_of: Callable[[str, str], str],
                     emit: Callable[[dict, list[dict]], None]) -> tuple[Counter, Counter]:
    """The reply walk over an indexed store (:meth:`ReplyStore.finish_loading` done): ``emit(prompt, pairs)``
    for each parent whose replies gave pairs, in walk order (rows of the prompts and pairs datasets); returns
    ``(fates_by_file, walk)``: replies per (source file, accounting key), and the report's ``reply:`` counts.
    Reads the store and nothing else: it runs here or on a process of its own alike."""
    from .reddit import SHP_COUNT_KEYS

    rcfg = cfg.reddit
    prompt_budget = cfg.max_text_chars
    # Counts are summed here and added to the store's and the report's once, at the end: the walk visits
    # every parent comment (most have one reply and give no pair), and per-reply calls cost more than the rules.
    fates_by_file: Counter = Counter()  # (source_file, accounting key) -> replies
    walk: Counter = Counter()  # the report's reply:... keys
    dropped_keys = [(k, f"reply:dropped:{k}") for k in SHP_COUNT_KEYS]
    lone_keys = {fate: (f"skipped:reply_{fate}", None if fate == "unpaired" else f"reply:dropped:{fate}")
                 for fate in ("post_score_too_low", "op_comment", "distinguished", "comment_score_too_low", "unpaired")}
    paired_any = False  # the counts' keys exist (at 0) once a parent's replies were put to the rules
    for parent_name, group, parent in replies.reply_groups():
        # A repeated reply id: the first row (lowest rid) is the reply; later ones are duplicates.
        unique: list[Node] = []
        for node, duplicate in group:
            if duplicate:
                fates_by_file[(node.source_file, "skipped:reply_duplicate")] += 1
                walk["reply:dropped:duplicate_answer"] += 1
            else:
                unique.append(node)
        if not unique:
            continue
        # Only the parent decides the pairs (its author, its thread's submission); the ancestors above it are
        # looked up for the prompt, when a pair is kept.
        if parent is None:
            for node in unique:
                fates_by_file[(node.source_file, "skipped:reply_parent_missing")] += 1
            walk["reply:parent_missing"] += 1
            continue
        sub = replies.submission(parent.link) if parent.link else None
        if not paired_any:
            paired_any = True
            walk.update(dict.fromkeys([reply_key for _, reply_key in dropped_keys] + ["reply:candidates"], 0))
        if len(unique) == 1:  # most parents: no pair, and one count (reply_pairs' answer without its dicts)
            file_key, walk_key = lone_keys[lone_reply_fate(parent, unique[0], rcfg, None if sub is None else sub.score)]
            fates_by_file[(unique[0].source_file, file_key)] += 1
            if walk_key is not None:
                walk[walk_key] += 1
            walk["reply:parents"] += 1
            continue
        pairs, counts, fates = reply_pairs(parent, unique, rcfg, submission_score=None if sub is None else sub.score,
                                           seed=cfg.pair_seed)
        for node in unique:
            fate = fates[node.id]
            fates_by_file[(node.source_file, "kept:reply" if fate == "kept" else f"skipped:reply_{fate}")] += 1
        for key, reply_key in dropped_keys:
            walk[reply_key] += counts[key]
        walk["reply:candidates"] += len(unique) * (len(unique) - 1) // 2
        walk["reply:parents"] += 1
        if not pairs:
            continue
        chain, stop = ancestor_chain(parent_name[3:], replies.lookup)
        parent = chain[-1]  # the whole row: the one above had what the rules read
        replies.fill_texts([node for pair in pairs for node in pair])
        walk["reply:prompts"] += 1
        walk[f"reply:context:{stop}"] += 1
        walk["reply:kept"] += len(pairs)
        site = parent.site
        thread = parent.link or parent.id
        split = split_of(site, thread)
        prompt = render_reply_prompt(cfg.prompt_template, site=site, chain=[n.body for n in chain],
                                     submission_title=None if sub is None else sub.title,
                                     submission_body="" if sub is None else sub.body, max_chars=prompt_budget)
        emit(dict(prompt_id=short_id(site, thread, parent_name), prompt=prompt, question_id=thread, site=site,
                  source="reddit", split=split, _source_file=parent.source_file, _line=parent.line),
             [dict(pair_id=short_id(site, parent_name, c.id, r.id), prompt=prompt, chosen=c.body, rejected=r.body,
                   chosen_score=float(c.score), rejected_score=float(r.score), margin=float(c.score - r.score),
                   question_id=thread, site=site, source="reddit", split=split, chosen_id=c.id,
                   rejected_id=r.id, chosen_author=c.author, rejected_author=r.author,
                   license=c.license if c.license == r.license else " + ".join(sorted({c.license, r.license})),
                   _source_file=c.source_file, _line=c.line) for c, r in pairs])
    return fates_by_file, walk
