"""On-disk staging store: readers write rows here, the builder reads them back grouped by question.

Grouping answers under their question cannot happen in a dict: Stack
Overflow's Posts.xml is ~100 GB and answers may come long after their question.
Rows go to a scratch SQLite database in batches; after loading, an index on
(site, question, kind, post) lets the builder walk the questions in a
deterministic order, a chunk of whole questions at a time. SQLite sorts and
indexes on disk, so memory stays bounded by its page cache (``cache_mb``), not
by the input size.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .records import PairRecord, PostRecord
from .scoring import numeric_key

# the posts table's columns and their types: the store's table and a reading worker's shard alike (shard_image, and
# tasks/ingest/_fastposts.c)
POST_TYPES = (
    "site TEXT, source TEXT, post_id TEXT, pkey TEXT, kind TEXT, kind_order INT, question_id TEXT, qkey TEXT, "
    "title TEXT, body TEXT, tags TEXT, score INT, accepted_answer_id TEXT, author TEXT, license TEXT, "
    "created_at TEXT, created_ts REAL, distinguished INT, source_file TEXT, line INT"
)


def column_names(types: str) -> list[str]:
    """The names of a table's columns, from their definitions (``"site TEXT, line INT"`` -> site, line)."""
    return [column.split()[0] for column in types.split(", ")]


_POST_COLUMNS = ", ".join(column_names(POST_TYPES))
VOTE_TYPES = "site TEXT, post_id TEXT, up INT, down INT, acc INT"
SHARD_TABLES = [("posts", POST_TYPES), ("votes", VOTE_TYPES)]  # a reading worker's image (shard_image)
_PAIR_COLUMNS = (
    "site, source, question_id, qkey, prompt, chosen, rejected, chosen_score, rejected_score, license, "
    "source_file, line"
)


@dataclass(slots=True)
class StoredPost:
    site: str
    source: str
    post_id: str
    kind: str
    question_id: str
    title: str
    body: str
    tags: str
    score: int
    accepted_answer_id: str
    author: str
    license: str
    created_at: str
    created_ts: float | None
    distinguished: bool
    source_file: str
    line: int | None
    upvotes: int | None  # from Votes.xml; None when the site has no votes table
    downvotes: int | None
    accept_votes: int


DERIVED = "derived_quarantined"  # count prefix of quarantined rows that are not input rows

# The builder's walk: every post with its vote counts, one question after another (question row first, then its
# answers by id), in a fixed order. ``has_votes``: the post's site has a votes table (its counts are 0, not
# unknown, when a post got no vote).
# (name, Arrow type): pyarrow is imported where the walk runs, not in the reading workers that import this module
_WALK_TYPES = (
    ("site", "string"), ("source", "string"), ("post_id", "string"), ("kind", "string"), ("question_id", "string"),
    ("title", "string"), ("body", "string"), ("tags", "string"), ("score", "int64"),
    ("accepted_answer_id", "string"), ("author", "string"), ("license", "string"), ("created_at", "string"),
    ("created_ts", "float64"), ("distinguished", "int64"), ("source_file", "string"), ("line", "int64"),
    ("up", "int64"), ("down", "int64"), ("acc", "int64"), ("qkey", "string"), ("has_votes", "int64"),
)
WALK_COLUMNS = tuple(name for name, _ in _WALK_TYPES)
_WALK_SELECT = (
    # ``has_votes`` is not read: it depends on the site alone, so the walk adds it to each chunk (an ``EXISTS``
    # per row cost ~0.8 CPU-s of 8 at 1 GiB)
    "SELECT " + ", ".join(f"v.{c}" if c in ("up", "down", "acc") else f"p.{c}" for c in WALK_COLUMNS[:-1])
    + " FROM posts p INDEXED BY posts_by_question "
    "LEFT JOIN votes v ON v.site = p.site AND v.post_id = p.post_id "
)
_WALK_ORDER = " ORDER BY p.site, p.qkey, p.kind_order, p.pkey LIMIT ?"
_QUESTION_ROWS = "SELECT COUNT(*) FROM posts p INDEXED BY posts_by_question WHERE p.site = ? AND p.qkey = ?"
# the size of the titles and bodies the walk will read next, to cut its chunks by size (UTF-8 bytes): the walk's
# index holds it as its last column, so this query reads the index alone, not the table of texts
_TEXT_BYTES = "length(CAST(title AS BLOB)) + length(CAST(body AS BLOB))"
_SIZES_SELECT = f"SELECT {_TEXT_BYTES} FROM posts p INDEXED BY posts_by_question "

# After loading, duplicate ids and the vote checks read the index ``posts_by_id`` (site, post_id, score) alone,
# never the posts table, which holds every text (at 1 GiB of input each pass over it read ~0.9 GB of pages):
# the ids seen more than once, then every row of such an id after its first...
_DISTINCT_IDS = "SELECT COUNT(*) FROM (SELECT DISTINCT site, post_id FROM posts INDEXED BY posts_by_id)"
_DUPLICATES_SELECT = (
    "SELECT p.rid, p.source_file, p.line, p.post_id, p.site FROM "
    "(SELECT site, post_id, MIN(rid) AS first FROM posts INDEXED BY posts_by_id "
    " GROUP BY site, post_id HAVING COUNT(*) > 1) d "
    "JOIN posts p INDEXED BY posts_by_id ON p.site = d.site AND p.post_id = d.post_id AND p.rid > d.first "
    "ORDER BY p.rid"
)
# ...and a site's posts, those whose score is their up minus down votes, and the votes on them (one pass)
_VOTE_SUMMARY_SELECT = (
    "SELECT COUNT(*), COALESCE(SUM(p.score = COALESCE(v.up, 0) - COALESCE(v.down, 0)), 0), "
    "COALESCE(SUM(v.up + v.down + v.acc), 0) FROM posts p INDEXED BY posts_by_id "
    "LEFT JOIN votes v ON v.site = p.site AND v.post_id = p.post_id WHERE p.site = ?"
)


def stored_groups(chunk) -> Iterator[tuple[tuple[str, str], list[StoredPost]]]:
    """A chunk of :meth:`StagingStore.walk_chunks` as ((site, question_id), rows) per question."""
    current: tuple[str, str] | None = None
    group: list[StoredPost] = []
    for row in zip(*(chunk.column(name).to_pylist() for name in WALK_COLUMNS)):
        key = (row[0], row[20])
        if key != current:
            if group:
                yield (group[0].site, group[0].question_id), group
            current, group = key, []
        has_votes = bool(row[21])
        group.append(
            StoredPost(
                site=row[0], source=row[1], post_id=row[2], kind=row[3], question_id=row[4], title=row[5],
                body=row[6], tags=row[7], score=row[8], accepted_answer_id=row[9] or "", author=row[10],
                license=row[11], created_at=row[12], created_ts=row[13], distinguished=bool(row[14]),
                source_file=row[15], line=row[16],
                upvotes=(row[17] or 0) if has_votes else None,
                downvotes=(row[18] or 0) if has_votes else None,
                accept_votes=row[19] or 0,
            )
        )
    if group:
        yield (group[0].site, group[0].question_id), group


def post_row(post: PostRecord) -> tuple:
    """A post as a row of the store's ``posts`` table (columns ``_POST_COLUMNS``)."""
    return (
        post.site, post.source, post.post_id, numeric_key(post.post_id), post.kind,
        0 if post.kind == "question" else 1, post.question_id, numeric_key(post.question_id), post.title,
        post.body, post.tags, post.score, post.accepted_answer_id, post.author, post.license,
        post.created_at, post.created_ts, int(post.distinguished), post.source_file, post.line,
    )


# votes of a post already in the table add up
_VOTE_UPSERT = ("ON CONFLICT(site, post_id) DO UPDATE SET "
                "up = up + excluded.up, down = down + excluded.down, acc = acc + excluded.acc")
SHARDS = hasattr(sqlite3.Connection, "serialize")  # Python 3.11+ with an SQLite that can (de)serialize


def sqlite_image(tables: dict[str, tuple[str, list[tuple]]]) -> bytes:
    """The bytes of an SQLite database holding ``tables``: name -> (column definitions, rows in order)."""
    db = sqlite3.connect(":memory:")
    try:
        db.execute("PRAGMA page_size=65536")
        for name, (columns, rows) in tables.items():
            db.execute(f"CREATE TABLE {name} ({columns})")
            db.executemany(f"INSERT INTO {name} VALUES ({','.join('?' * (columns.count(',') + 1))})", rows)
        db.commit()
        return db.serialize()
    finally:
        db.close()


@contextlib.contextmanager
def attached(db: sqlite3.Connection, image: bytes) -> Iterator[None]:
    """``image`` (:func:`sqlite_image`) attached to ``db`` as schema ``shard`` while the block runs."""
    db.commit()  # ATTACH and DETACH need no open transaction
    db.execute("ATTACH ':memory:' AS shard")
    try:
        db.deserialize(image, name="shard")
        yield
    except BaseException:
        # DETACH fails inside the failed statement's transaction (and ROLLBACK is undefined without a journal):
        # the error to report is the first one, and the store is dropped with the failed ingest
        with contextlib.suppress(sqlite3.Error):
            db.execute("DETACH shard")
        raise
    db.commit()
    db.execute("DETACH shard")


def shard_image(posts: list[tuple], votes: dict[tuple[str, str], list[int]]) -> bytes:
    """Posts (rows of :func:`post_row`) and per-post vote counts ``(site, post_id) -> [up, down, accept]`` as
    the bytes of an SQLite database with the store's ``posts`` and ``votes`` columns: how a reading worker
    hands the parent what it read (:meth:`StagingStore.add_shard`)."""
    (posts_table, posts_types), (votes_table, votes_types) = SHARD_TABLES
    return sqlite_image({posts_table: (posts_types, posts),
                         votes_table: (votes_types, [(s, p, u, d, a) for (s, p), (u, d, a) in votes.items()])})


def read_only_uri(path: Path) -> str:
    """An SQLite URI that opens ``path`` read-only; any folder name (spaces, ?, #, %) stays a path, never URI
    syntax."""
    return "file:" + urllib.parse.quote(str(Path(path).resolve())) + "?mode=ro"


_DEFAULT_BUSY_MS = 5000  # Python's sqlite3.connect default
_WAIT_FOR_READER_MS = 24 * 3600 * 1000  # a writer waiting for a reader of the same store: as long as it takes


class _VoteSummaries:
    """:meth:`StagingStore.vote_summary` of some sites, computed on a thread through its own read-only
    connection; :meth:`result` waits for them and raises the thread's error, if any."""

    def __init__(self, path: Path, sites: list[str]) -> None:
        self.summaries: dict[str, tuple[int, int, int]] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(path, sites), name="alignflow-vote-summaries",
                                       daemon=True)
        self.thread.start()

    def _run(self, path: Path, sites: list[str]) -> None:
        try:
            db = sqlite3.connect(read_only_uri(path), uri=True, timeout=_WAIT_FOR_READER_MS / 1000,
                                 check_same_thread=False)
            with contextlib.closing(db):
                db.execute("PRAGMA cache_size=-8192")
                for site in sites:
                    posts, agree, on_posts = db.execute(_VOTE_SUMMARY_SELECT, (site,)).fetchone()
                    self.summaries[site] = (int(posts), int(agree), int(on_posts))
        except BaseException as exc:  # noqa: BLE001 - raised in the caller by result()
            self.error = exc

    def result(self) -> dict[str, tuple[int, int, int]]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.summaries


class StagingStore:
    """A scratch SQLite database that is also a :class:`RecordSink`."""

    def __init__(self, path: Path, *, batch: int = 5000, cache_mb: int = 8, vote_buffer: int = 100_000) -> None:
        self.path = Path(path)
        # Quarantined rows go to a database file of their own: the builder writes them while the walk reads the
        # posts ahead on another connection (walk_chunks), and SQLite locks a file at a time, so neither waits.
        self.quarantine_path = self.path.with_name(f"{self.path.stem}.quarantine{self.path.suffix}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for file in (self.path, self.quarantine_path):
            file.unlink(missing_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("ATTACH DATABASE ? AS q", (str(self.quarantine_path),))
        # The page cache is SQLite's own copy of pages the OS caches anyway: at 256 MiB of input,
        # 8 MiB instead of 32 cut the ingest's peak RSS by 22 MiB and did not slow the walk.
        self.db.executescript(
            f"""
            -- large pages: a post's body fits in its page (no overflow chain), so loading, indexing
            -- and the walk touch fewer pages (at 256 MiB: the index 0.6 -> 0.4 CPU-s, loading -5%)
            PRAGMA page_size=65536;
            PRAGMA journal_mode=OFF;
            PRAGMA synchronous=OFF;
            PRAGMA temp_store=FILE;
            PRAGMA cache_size=-{cache_mb * 1024};
            CREATE TABLE posts (rid INTEGER PRIMARY KEY, {POST_TYPES});
            CREATE TABLE votes ({VOTE_TYPES}, PRIMARY KEY (site, post_id)) WITHOUT ROWID;
            CREATE TABLE vote_sites (site TEXT PRIMARY KEY, source_file TEXT);
            CREATE TABLE pairs_in (rid INTEGER PRIMARY KEY, {_PAIR_COLUMNS.replace(',', ' ,')});
            PRAGMA q.journal_mode=OFF;
            PRAGMA q.synchronous=OFF;
            CREATE TABLE q.quarantine (source_file TEXT, line INT, row_id TEXT, site TEXT, dataset TEXT,
                reason TEXT, detail TEXT, raw TEXT);
            """
        )
        self.batch = batch
        self.vote_buffer = vote_buffer
        self._posts: list[tuple] = []
        self._pairs: list[tuple] = []
        self._quarantine: list[tuple] = []
        self._votes: dict[tuple[str, str], list[int]] = {}
        self.counts: Counter[tuple[str, str]] = Counter()
        self._vote_summaries: dict[str, tuple[int, int, int]] = {}  # site -> vote_summary(site), once loaded
        self.vote_files: dict[str, str] = {}

    # -- RecordSink -----------------------------------------------------------
    def add_post(self, post: PostRecord) -> None:
        self._posts.append(post_row(post))
        if len(self._posts) >= self.batch:
            self._flush_posts()

    def add_post_rows(self, rows: list[tuple]) -> None:
        """Posts already in the store's row form (:func:`post_row`), e.g. from a worker process."""
        self._posts.extend(rows)
        if len(self._posts) >= self.batch:
            self._flush_posts()

    def add_shard(self, image: bytes, line_offset: int = 0) -> None:
        """Copy a reading worker's posts and vote counts (:func:`shard_image`) into the store, the posts after
        those already added and their line numbers moved by ``line_offset`` (where the worker's range starts
        in its file). The rows go from one SQLite database to the other in SQLite's own code: no Python
        object is made per row, as ``add_post_rows`` would after unpickling them."""
        self._flush_posts()  # the posts added before come first
        with attached(self.db, image):
            moved = ", ".join("line + ?" if name == "line" else name for name in column_names(POST_TYPES))
            self.db.execute(f"INSERT INTO posts ({_POST_COLUMNS}) SELECT {moved} FROM shard.posts ORDER BY rowid",
                            (line_offset,))
            self.db.execute(f"INSERT INTO votes SELECT site, post_id, up, down, acc FROM shard.votes WHERE true "
                            f"{_VOTE_UPSERT}")

    def add_vote(self, site: str, post_id: str, vote_type: int) -> None:
        entry = self._votes.get((site, post_id))
        if entry is None:
            entry = self._votes[(site, post_id)] = [0, 0, 0]
        entry[{2: 0, 3: 1, 1: 2}[vote_type]] += 1
        if len(self._votes) >= self.vote_buffer:
            self._flush_votes()

    def add_vote_counts(self, counts: dict[tuple[str, str], list[int]]) -> None:
        """Add per-post (up, down, accept) vote counts summed elsewhere."""
        votes = self._votes
        for key, (up, down, acc) in counts.items():
            entry = votes.get(key)
            if entry is None:
                votes[key] = [up, down, acc]
            else:
                entry[0] += up
                entry[1] += down
                entry[2] += acc
        if len(votes) >= self.vote_buffer:
            self._flush_votes()

    def register_vote_file(self, site: str, source_file: str) -> None:
        self.vote_files[site] = source_file
        self.db.execute("INSERT OR REPLACE INTO vote_sites VALUES (?, ?)", (site, source_file))

    def add_pair(self, pair: PairRecord) -> None:
        self._pairs.append(
            (
                pair.site, pair.source, pair.question_id, numeric_key(pair.question_id), pair.prompt, pair.chosen,
                pair.rejected, pair.chosen_score, pair.rejected_score, pair.license, pair.source_file, pair.line,
            )
        )
        if len(self._pairs) >= self.batch:
            self._flush_pairs()

    def quarantine(self, *, source_file, reason, line=None, row_id=None, site="", detail="", raw="",
                   dataset="input", input_row=True) -> None:
        """Quarantine a row; ``input_row=False`` for a derived row (counted as ``derived:``, not as an input row)."""
        self._quarantine.append((source_file, line, row_id, site, dataset, reason, detail, raw))
        self.counts[(source_file, f"{'quarantined' if input_row else DERIVED}:{reason}")] += 1
        if len(self._quarantine) >= self.batch:
            self._flush_quarantine()

    def count(self, source_file: str, key: str, n: int = 1) -> None:
        self.counts[(source_file, key)] += n

    # -- flushing ---------------------------------------------------------------
    def _flush_posts(self) -> None:
        if self._posts:
            self.db.executemany(f"INSERT INTO posts ({_POST_COLUMNS}) VALUES ({','.join('?' * 20)})", self._posts)
            self._posts.clear()

    def _flush_pairs(self) -> None:
        if self._pairs:
            self.db.executemany(f"INSERT INTO pairs_in ({_PAIR_COLUMNS}) VALUES ({','.join('?' * 12)})", self._pairs)
            self._pairs.clear()

    def _flush_quarantine(self) -> None:
        if self._quarantine:
            self.db.executemany("INSERT INTO quarantine VALUES (?,?,?,?,?,?,?,?)", self._quarantine)
            self._quarantine.clear()

    def _flush_votes(self) -> None:
        if self._votes:
            self.db.executemany(
                f"INSERT INTO votes VALUES (?,?,?,?,?) {_VOTE_UPSERT}",
                [(s, p, u, d, a) for (s, p), (u, d, a) in self._votes.items()],
            )
            self._votes.clear()

    def flush(self) -> None:
        self._flush_posts()
        self._flush_pairs()
        self._flush_quarantine()
        self._flush_votes()
        self.db.commit()

    # -- after loading ---------------------------------------------------------------
    def finish_loading(self) -> None:
        """Flush, drop duplicate post ids (quarantined) and index for the grouped walk."""
        self.flush()
        self.db.execute("CREATE INDEX posts_by_id ON posts (site, post_id, score)")
        dupes = self.db.execute(_DUPLICATES_SELECT).fetchall() if self._has_duplicate_ids() else []
        for rid, source_file, line, post_id, site in dupes:
            self.quarantine(
                source_file=source_file, reason="duplicate_id", line=line, row_id=post_id, site=site,
                detail="a row with the same Id came earlier in the input",
            )
            self.db.execute("DELETE FROM posts WHERE rid = ?", (rid,))
        self.flush()
        self._vote_summaries.clear()  # the posts and votes are final from here on
        # The vote summaries read the ids' index and the votes on a thread, while this connection builds the
        # walk's index: two cores instead of one (at 1 GiB, ~1.9 s each). Once the index is written out,
        # SQLite waits for the reader to finish; both wait as long as the other needs (no "database is locked").
        summaries = _VoteSummaries(self.path, sorted(self.sites_with_votes()))
        self.db.execute(f"PRAGMA busy_timeout={_WAIT_FOR_READER_MS}")
        try:
            self.db.execute(f"CREATE INDEX posts_by_question ON posts (site, qkey, kind_order, pkey, {_TEXT_BYTES})")
            self.db.commit()
        except BaseException:
            summaries.thread.join()  # its own error, if any, would hide this one
            raise
        finally:
            self.db.execute(f"PRAGMA busy_timeout={_DEFAULT_BUSY_MS}")
        self._vote_summaries.update(summaries.result())

    def _has_duplicate_ids(self) -> bool:
        """Whether two posts of a site share an id: fewer distinct (site, id) than rows. Counting the distinct
        ids reads the index once without grouping: at 1 GiB, 0.6 s against 1.4 s for the query that lists them,
        which then runs only when this says there is something to list."""
        (rows,) = self.db.execute("SELECT COUNT(*) FROM posts").fetchone()
        (ids,) = self.db.execute(_DISTINCT_IDS).fetchone()
        return ids < rows

    def sites_with_votes(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT site FROM vote_sites")}

    def vote_summary(self, site: str) -> tuple[int, int, int]:
        """(posts of ``site``, posts whose ``Score`` equals their up minus down votes, votes on those posts),
        in one pass over the ``posts_by_id`` index, which holds every post's score. Asked once loading is
        finished (:meth:`finish_loading` makes the index), when the tables no longer change: kept for the later
        questions about the same site."""
        summary = self._vote_summaries.get(site)
        if summary is None:
            posts, agree, on_posts = self.db.execute(_VOTE_SUMMARY_SELECT, (site,)).fetchone()
            summary = self._vote_summaries[site] = (int(posts), int(agree), int(on_posts))
        return summary

    def vote_score_agreement(self, site: str) -> tuple[int, int]:
        """(posts of ``site``, posts whose ``Score`` equals their up minus down votes): a dump's own
        Votes.xml agrees with its scores on every post; a foreign one does not."""
        return self.vote_summary(site)[:2]

    def vote_accounting(self) -> dict[str, dict[str, int]]:
        """Per votes file: votes on posts that were read vs votes on posts absent from Posts.xml (deleted) or not kept (tag wikis, quarantined rows)."""
        out: dict[str, dict[str, int]] = {}
        for site, source_file in self.db.execute("SELECT site, source_file FROM vote_sites").fetchall():
            total = self.db.execute("SELECT COALESCE(SUM(up + down + acc), 0) FROM votes WHERE site = ?",
                                    (site,)).fetchone()[0]
            on_read = self.vote_summary(site)[2]
            out[source_file] = {"kept:votes_on_posts_read": on_read, "dropped:votes_on_posts_not_kept": int(total) - on_read}
        return out

    def walk_chunks(self, rows: int = 5_000, text_bytes: int = 4 << 20) -> Iterator:
        """The posts in walk order (columns ``WALK_COLUMNS``: question row first, then its answers by id), as
        Arrow tables of at most ``rows`` rows and about ``text_bytes`` of titles and bodies, each ending where a
        question's rows end. A question larger than that is a chunk of its own, whole: memory is bounded by
        two chunks (the one read ahead) of the larger of the two, whatever the input holds.

        Read through ADBC's SQLite driver, which fills Arrow columns in C: the texts never become Python
        objects. Each chunk is a query for its sizes, then one for its rows, that start after the last
        question of the chunk before, through the walk's index; the reading connection holds no lock between
        chunks. The next chunk is read while the caller works on the one before (the builder writes quarantined rows
        meanwhile, to their own file: no lock is shared).

        Every ADBC call runs on a thread of the walk's own, one chunk ahead of the caller. On the main thread ADBC
        answers SIGINT with its own handler, which cancels the statement; its SQLite driver cannot cancel, so
        Ctrl-C during a query raised ``NotSupportedError`` after it, or, near the query's end, was lost (the
        command went on to exit 0). Off the main thread ADBC leaves signals to Python, and the waiting
        caller gets its ``KeyboardInterrupt`` at once.
        """
        from concurrent.futures import ThreadPoolExecutor

        import adbc_driver_sqlite.dbapi as adbc
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _WALK_TYPES])
        read_schema = pa.schema(list(schema)[:-1])
        self.flush()
        vote_sites = pa.array(sorted(self.sites_with_votes()), pa.string())

        def with_votes(chunk: pa.Table) -> pa.Table:  # the column ``has_votes``: 1 where the site has votes
            flags = pc.cast(pc.is_in(chunk.column("site"), value_set=vote_sites), pa.int64())
            return chunk.append_column(schema.field("has_votes"), flags)

        sql = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignflow-walk-sql")
        # read-only; autocommit: no transaction, so no lock, is held between two queries
        conn = sql.submit(adbc.connect, read_only_uri(self.path), autocommit=True).result()
        try:

            def run_query(select: str, after: tuple[str, str] | None, limit: int):
                with conn.cursor() as cursor:
                    # one Arrow batch per query: the driver infers a column's type from the batch's values
                    cursor.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(limit + 1)})
                    where = "" if after is None else "WHERE (p.site, p.qkey) > (?, ?)"
                    cursor.execute(select + where + _WALK_ORDER, (*(after or ()), limit))
                    return cursor.fetch_arrow_table()

            def question_rows(key: tuple[str, str]) -> int:
                with conn.cursor() as cursor:
                    cursor.execute(_QUESTION_ROWS, key)
                    return cursor.fetchone()[0]

            def next_chunk(after: tuple[str, str] | None, probe: int):
                """On the walk's thread: the chunk that starts after the question ``after`` (None: the walk's
                end), whether one follows it, the key it ends with and how many sizes to read for the next.
                ``probe``: about twice the last chunk's rows, so long texts are not read thousands of sizes for
                every chunk of a few rows."""
                while True:
                    sizes = run_query(_SIZES_SELECT, after, probe).column(0).to_numpy(zero_copy_only=False)
                    if not len(sizes):
                        return None, False, None, probe
                    total = np.cumsum(sizes)
                    if total[-1] < text_bytes and probe == len(sizes) < rows:  # more may fit: read the sizes again
                        probe = rows
                        continue
                    break
                # the rows that fit in the text budget (at least one), then whole questions only
                limit = max(1, int(np.searchsorted(total, text_bytes, side="right")))
                probe = min(rows, 2 * limit + 16)
                # a column without a value in the chunk comes back as integers: cast says what it is
                chunk = run_query(_WALK_SELECT, after, limit).cast(read_schema)
                if chunk.num_rows < limit:  # the walk's end
                    return (with_votes(chunk) if chunk.num_rows else None), False, None, probe
                # the last question may go on after the limit: it starts the next chunk
                site, qkey = chunk.column("site"), chunk.column("qkey")
                in_last = pc.and_(pc.equal(site, site[-1]), pc.equal(qkey, qkey[-1]))
                cut = chunk.num_rows - pc.sum(in_last).as_py()
                if cut == 0:  # the first question alone is over the budget: it is the chunk, whole
                    cut = question_rows((site[0].as_py(), qkey[0].as_py()))
                    chunk = run_query(_WALK_SELECT, after, cut).cast(read_schema)
                    site, qkey = chunk.column("site"), chunk.column("qkey")
                return with_votes(chunk.slice(0, cut)), True, (site[cut - 1].as_py(), qkey[cut - 1].as_py()), probe

            # Read ahead: the next chunk is read (SQLite and ADBC, without the GIL) while the caller builds this
            # one; before, the builder waited for every read (2-3 s of a 1 GiB build).
            pending = sql.submit(next_chunk, None, rows)
            while True:
                chunk, more, after, probe = pending.result()
                if more:
                    pending = sql.submit(next_chunk, after, probe)
                if chunk is not None:
                    yield chunk
                if not more:
                    return
        finally:
            sql.submit(conn.close).result()  # after a query still running on the thread, if any
            sql.shutdown()

    def grouped_posts(self) -> Iterator[tuple[tuple[str, str], list[StoredPost]]]:
        """Yield ((site, question_id), rows) per question, question row first, answers by id."""
        for chunk in self.walk_chunks():
            yield from stored_groups(chunk)

    def input_pairs(self) -> Iterator[tuple]:
        yield from self.db.execute(
            f"SELECT {_PAIR_COLUMNS} FROM pairs_in ORDER BY site, qkey, rid"
        )

    def quarantined(self) -> Iterator[tuple]:
        self._flush_quarantine()
        yield from self.db.execute("SELECT * FROM quarantine ORDER BY source_file, line, row_id, reason")

    def close(self) -> None:
        self.db.close()

    def remove(self) -> None:
        """Close the store and delete its files."""
        self.close()
        for file in (self.path, self.quarantine_path):
            file.unlink(missing_ok=True)
