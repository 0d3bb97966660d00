"""On-disk staging store: readers write rows here, the builder reads them back grouped by question.

Grouping answers under their question cannot happen in a dict: Stack
Overflow's Posts.xml is ~100 GB and answers may come long after their question.
Posts and vote counts arrive as Arrow tables (built in the reading workers)
and are written, in arrival order, as uncompressed Parquet parts. After
loading, DuckDB reads the parts: it sums the votes per post, finds duplicate
ids and sorts the posts by (site, question, kind, post) with vectorised,
out-of-core operators, so the builder walks one question at a time in a
deterministic order while memory stays bounded by ``memory_mb`` (DuckDB spills
to a folder beside the parts), not by the input size. The small tables
(quarantined rows, pairs read from pairs files, the sites that have a votes
file) stay in SQLite.

Why not SQLite for the posts too (measured on a generated 256 MiB site,
bench/REPORT.md): inserting row tuples from Python and walking its index one
Python row per post cost the parent more CPU than writing the workers' Arrow
tables and reading DuckDB's sorted result batch by batch.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .records import PairRecord, PostRecord
from .scoring import numeric_key

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


# The ``posts`` table's columns, in ``post_row`` order, as Arrow types (the staging store's row form).
POST_SCHEMA = pa.schema([
    ("site", pa.string()), ("source", pa.string()), ("post_id", pa.string()), ("pkey", pa.string()),
    ("kind", pa.string()), ("kind_order", pa.int32()), ("question_id", pa.string()), ("qkey", pa.string()),
    ("title", pa.string()), ("body", pa.string()), ("tags", pa.string()), ("score", pa.int64()),
    ("accepted_answer_id", pa.string()), ("author", pa.string()), ("license", pa.string()),
    ("created_at", pa.string()), ("created_ts", pa.float64()), ("distinguished", pa.int32()),
    ("source_file", pa.string()), ("line", pa.int64()),
])
_VOTE_SCHEMA = pa.schema([("site", pa.string()), ("post_id", pa.string()), ("up", pa.int64()),
                          ("down", pa.int64()), ("acc", pa.int64())])

DERIVED = "derived_quarantined"  # count prefix of quarantined rows that are not input rows


def post_row(post: PostRecord) -> tuple:
    """A post as a row of the store's ``posts`` table (columns :data:`POST_SCHEMA`)."""
    return (
        post.site, post.source, post.post_id, numeric_key(post.post_id), post.kind,
        0 if post.kind == "question" else 1, post.question_id, numeric_key(post.question_id), post.title,
        post.body, post.tags, post.score, post.accepted_answer_id, post.author, post.license,
        post.created_at, post.created_ts, int(post.distinguished), post.source_file, post.line,
    )


def posts_table(rows: list[tuple]) -> pa.Table:
    """Post rows (:func:`post_row` tuples) as one Arrow table with :data:`POST_SCHEMA`."""
    if not rows:
        return POST_SCHEMA.empty_table()
    columns = list(zip(*rows))
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, POST_SCHEMA)], schema=POST_SCHEMA)


def shift_lines(table: pa.Table, offset: int) -> pa.Table:
    """``table`` with ``offset`` added to every (non-null) line number."""
    if not offset or table.num_rows == 0:
        return table
    i = table.schema.get_field_index("line")
    return table.set_column(i, "line", pc.add(table.column(i), pa.scalar(offset, pa.int64())))


class StagingStore:
    """Scratch databases (DuckDB for posts and votes, SQLite for the rest) that are also a :class:`RecordSink`."""

    def __init__(self, path: Path, *, batch: int = 5000, cache_mb: int = 32, vote_buffer: int = 100_000,
                 memory_mb: int = 128, chunk_mb: int | None = None) -> None:
        import duckdb

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # posts and vote counts: uncompressed Parquet parts, in arrival order; DuckDB reads them after loading
        self.parts_dir = self.path.with_suffix(".parts")
        self.spill_dir = self.path.with_suffix(".spill")
        if self.path.exists():
            self.path.unlink()
        for old in (self.parts_dir, self.spill_dir):
            shutil.rmtree(old, ignore_errors=True)
        self.parts_dir.mkdir()
        self.db = sqlite3.connect(self.path)
        self.db.executescript(
            f"""
            PRAGMA journal_mode=OFF;
            PRAGMA synchronous=OFF;
            PRAGMA temp_store=FILE;
            PRAGMA cache_size=-{cache_mb * 1024};
            CREATE TABLE vote_sites (site TEXT PRIMARY KEY, source_file TEXT);
            CREATE TABLE pairs_in (rid INTEGER PRIMARY KEY, {_PAIR_COLUMNS.replace(',', ' ,')});
            CREATE TABLE quarantine (source_file TEXT, line INT, row_id TEXT, site TEXT, dataset TEXT,
                reason TEXT, detail TEXT, raw TEXT);
            """
        )
        self.duck = duckdb.connect()  # in memory; sorts and joins past memory_mb spill to spill_dir
        self.duck.execute(f"SET memory_limit = '{int(memory_mb)}MB'")
        self.duck.execute(f"SET temp_directory = '{self.spill_dir}'")
        self.duck.execute("SET threads = 1")
        self.duck.execute("SET preserve_insertion_order = false")
        self.memory_mb = int(memory_mb)
        # text per sorted chunk of the walk: a quarter of DuckDB's memory leaves room for its buffers
        self.chunk_mb = int(chunk_mb) if chunk_mb else max(self.memory_mb // 4, 4)
        self.post_parts: list[Path] = []
        self.vote_parts: list[Path] = []
        self.batch = batch
        self.vote_buffer = vote_buffer
        self._posts: list[tuple] = []
        self._pairs: list[tuple] = []
        self._quarantine: list[tuple] = []
        self._votes: dict[tuple[str, str], list[int]] = {}
        self._next_rid = 0
        self._loaded = False
        self.counts: Counter[tuple[str, str]] = Counter()
        self.vote_files: dict[str, str] = {}

    # -- RecordSink -----------------------------------------------------------
    def add_post(self, post: PostRecord) -> None:
        self._posts.append(post_row(post))
        if len(self._posts) >= self.batch:
            self._flush_posts()

    def add_post_rows(self, rows: list[tuple]) -> None:
        """Posts already in the store's row form (:func:`post_row`)."""
        self._posts.extend(rows)
        if len(self._posts) >= self.batch:
            self._flush_posts()

    def add_post_table(self, table: pa.Table) -> None:
        """Posts as an Arrow table with :data:`POST_SCHEMA` (e.g. built by a worker process), after any rows
        added before."""
        self._flush_posts()
        self._insert_posts(table)

    def _insert_posts(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if table.schema != POST_SCHEMA:
            table = table.cast(POST_SCHEMA)
        # rid: the order the posts came in, which decides duplicates and breaks ties in the walk
        rid = pa.array(range(self._next_rid, self._next_rid + table.num_rows), type=pa.int64())
        self._next_rid += table.num_rows
        self._write_part(table.add_column(0, "rid", rid), self.post_parts, "posts")

    def _write_part(self, table: pa.Table, parts: list[Path], name: str) -> None:
        if self._loaded:
            raise RuntimeError(f"{name} added after the store finished loading")
        path = self.parts_dir / f"{name}-{len(parts):07d}.parquet"
        # uncompressed: the parts are read once, a few seconds later, from the same disk
        pq.write_table(table, path, compression="none", row_group_size=1 << 16)
        parts.append(path)

    def add_vote(self, site: str, post_id: str, vote_type: int) -> None:
        entry = self._votes.get((site, post_id))
        if entry is None:
            entry = self._votes[(site, post_id)] = [0, 0, 0]
        entry[{2: 0, 3: 1, 1: 2}[vote_type]] += 1
        if len(self._votes) >= self.vote_buffer:
            self._flush_votes()

    def add_vote_counts(self, counts: dict[tuple[str, str], list[int]]) -> None:
        """Add per-post (up, down, accept) vote counts summed elsewhere (summed again per post after loading)."""
        self._flush_votes()
        self._insert_votes(counts)

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
            table = posts_table(self._posts)
            self._posts.clear()
            self._insert_posts(table)

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
            votes, self._votes = self._votes, {}
            self._insert_votes(votes)

    def _insert_votes(self, counts: dict[tuple[str, str], list[int]]) -> None:
        if not counts:
            return
        keys = list(counts)
        sums = list(zip(*counts.values()))
        table = pa.Table.from_arrays(
            [pa.array([k[0] for k in keys], pa.string()), pa.array([k[1] for k in keys], pa.string()),
             *(pa.array(c, pa.int64()) for c in sums)],
            schema=_VOTE_SCHEMA,
        )
        self._write_part(table, self.vote_parts, "votes")

    def flush(self) -> None:
        self._flush_posts()
        self._flush_pairs()
        self._flush_quarantine()
        self._flush_votes()
        self.db.commit()

    # -- after loading ---------------------------------------------------------------
    def finish_loading(self) -> None:
        """Flush; then, in DuckDB: the posts as a view over their parts without duplicate ids (quarantined),
        and one row of summed (up, down, accept) counts per voted post."""
        if self._loaded:
            return
        self.flush()
        self._loaded = True
        if not self.post_parts:
            self._write_empty(POST_SCHEMA.insert(0, pa.field("rid", pa.int64())), "posts")
        if not self.vote_parts:
            self._write_empty(_VOTE_SCHEMA, "votes")
        posts = _parquet_list(self.post_parts)
        self.duck.execute(f"CREATE VIEW posts_read AS SELECT * FROM read_parquet({posts})")
        dupes = self.duck.execute(
            "SELECT rid, source_file, line, post_id, site FROM ("
            "  SELECT rid, source_file, line, post_id, site, "
            "         row_number() OVER (PARTITION BY site, post_id ORDER BY rid) AS nth FROM posts_read"
            ") WHERE nth > 1 ORDER BY rid"
        ).fetchall()
        for _rid, source_file, line, post_id, site in dupes:
            self.quarantine(
                source_file=source_file, reason="duplicate_id", line=line, row_id=post_id, site=site,
                detail="a row with the same Id came earlier in the input",
            )
        if dupes:
            self.duck.execute("CREATE TABLE dupes (rid BIGINT)")
            self.duck.executemany("INSERT INTO dupes VALUES (?)", [(d[0],) for d in dupes])
            self.duck.execute("CREATE VIEW posts AS SELECT * FROM posts_read WHERE rid NOT IN (SELECT rid FROM dupes)")
        else:
            self.duck.execute("CREATE VIEW posts AS SELECT * FROM posts_read")
        self.duck.execute(
            "CREATE TABLE votes AS SELECT site, post_id, SUM(up)::BIGINT AS up, SUM(down)::BIGINT AS down, "
            f"SUM(acc)::BIGINT AS acc FROM read_parquet({_parquet_list(self.vote_parts)}) GROUP BY site, post_id"
        )
        self.flush()
        self.db.commit()

    def _write_empty(self, schema: pa.Schema, name: str) -> None:
        path = self.parts_dir / f"{name}-empty.parquet"
        pq.write_table(schema.empty_table(), path)
        (self.post_parts if name == "posts" else self.vote_parts).append(path)

    def sites_with_votes(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT site FROM vote_sites")}

    def vote_score_agreement(self, site: str) -> tuple[int, int]:
        """(posts of ``site``, posts whose ``Score`` equals their up minus down votes): a dump's own
        Votes.xml agrees with its scores on every post; a foreign one does not."""
        self.finish_loading()
        posts, agree = self.duck.execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN p.score = COALESCE(v.up, 0) - COALESCE(v.down, 0) "
            "THEN 1 ELSE 0 END), 0) FROM posts p "
            "LEFT JOIN votes v ON v.site = p.site AND v.post_id = p.post_id WHERE p.site = ?",
            [site],
        ).fetchall()[0]
        return int(posts), int(agree)

    def vote_accounting(self) -> dict[str, dict[str, int]]:
        """Per votes file: votes on posts that were read vs votes on posts absent from Posts.xml (deleted) or not kept (tag wikis, quarantined rows)."""
        self.finish_loading()
        out: dict[str, dict[str, int]] = {}
        for site, source_file in self.db.execute("SELECT site, source_file FROM vote_sites").fetchall():
            on_read, on_absent = self.duck.execute(
                "SELECT COALESCE(SUM(CASE WHEN k.post_id IS NOT NULL THEN v.up + v.down + v.acc ELSE 0 END), 0), "
                "COALESCE(SUM(CASE WHEN k.post_id IS NULL THEN v.up + v.down + v.acc ELSE 0 END), 0) "
                "FROM votes v LEFT JOIN (SELECT DISTINCT site, post_id FROM posts WHERE site = ?) k "
                "ON k.site = v.site AND k.post_id = v.post_id WHERE v.site = ?",
                [site, site],
            ).fetchall()[0]
            out[source_file] = {"kept:votes_on_posts_read": int(on_read), "dropped:votes_on_posts_not_kept": int(on_absent)}
        return out

    def walk_chunks(self) -> list[tuple[str, str]]:
        """The first (site, qkey) of each chunk of questions whose posts hold about ``chunk_mb`` of text.

        DuckDB's sort does not spill wide rows gracefully: sorting every post with its text at once needs
        memory in proportion to the input. Sorting one chunk of questions at a time keeps it bounded.
        """
        budget = self.chunk_mb << 20
        rows = self.duck.execute(
            "SELECT site, qkey FROM ("
            "  SELECT site, qkey, row_number() OVER (PARTITION BY chunk ORDER BY site, qkey) AS nth FROM ("
            "    SELECT site, qkey, (sum(n) OVER (ORDER BY site, qkey ROWS UNBOUNDED PRECEDING) - n) // ? AS chunk"
            "    FROM (SELECT site, qkey, sum(coalesce(length(body), 0) + coalesce(length(title), 0) + 256) AS n"
            "          FROM posts GROUP BY site, qkey)"
            "  )"
            ") WHERE nth = 1 ORDER BY site, qkey",
            [budget],
        ).fetchall()
        return [(site, qkey) for site, qkey in rows]

    def grouped_posts(self, batch_rows: int = 4096) -> Iterator[tuple[tuple[str, str], list[StoredPost]]]:
        """Yield ((site, question_id), rows) per question, question row first, answers by id."""
        self.finish_loading()
        voted = self.sites_with_votes()
        starts = self.walk_chunks()
        current: tuple[str, str] | None = None
        group: list[StoredPost] = []
        for i, (site, qkey) in enumerate(starts):
            where = "(p.site > $s0 OR (p.site = $s0 AND p.qkey >= $q0))"
            params = {"s0": site, "q0": qkey}
            if i + 1 < len(starts):
                where += " AND (p.site < $s1 OR (p.site = $s1 AND p.qkey < $q1))"
                params.update(s1=starts[i + 1][0], q1=starts[i + 1][1])
            walk = self.duck.cursor()  # a connection of its own: its result stays open while it is read
            try:
                relation = walk.sql(
                    "SELECT p.site, p.source, p.post_id, p.kind, p.question_id, p.title, p.body, p.tags, p.score, "
                    "p.accepted_answer_id, p.author, p.license, p.created_at, p.created_ts, p.distinguished, "
                    "p.source_file, p.line, v.up, v.down, v.acc, p.qkey "
                    "FROM posts p LEFT JOIN votes v ON v.site = p.site AND v.post_id = p.post_id "
                    f"WHERE {where} ORDER BY p.site, p.qkey, p.kind_order, p.pkey, p.rid",
                    params=params,
                )
                # DuckDB 2 names it to_arrow_reader; 1.x fetch_arrow_reader
                to_reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
                for batch in to_reader(batch_rows):
                    for row in zip(*(column.to_pylist() for column in batch.columns)):
                        key = (row[0], row[20])
                        if key != current:
                            if group:
                                yield (group[0].site, group[0].question_id), group
                            current, group = key, []
                        has_votes = row[0] in voted
                        group.append(
                            StoredPost(
                                site=row[0], source=row[1], post_id=row[2], kind=row[3], question_id=row[4],
                                title=row[5], body=row[6], tags=row[7], score=row[8],
                                accepted_answer_id=row[9] or "", author=row[10], license=row[11],
                                created_at=row[12], created_ts=row[13], distinguished=bool(row[14]),
                                source_file=row[15], line=row[16],
                                upvotes=(row[17] or 0) if has_votes else None,
                                downvotes=(row[18] or 0) if has_votes else None,
                                accept_votes=row[19] or 0,
                            )
                        )
            finally:
                walk.close()
        if group:
            yield (group[0].site, group[0].question_id), group

    def input_pairs(self) -> Iterator[tuple]:
        yield from self.db.execute(
            f"SELECT {_PAIR_COLUMNS} FROM pairs_in ORDER BY site, qkey, rid"
        )

    def quarantined(self) -> Iterator[tuple]:
        self._flush_quarantine()
        yield from self.db.execute("SELECT * FROM quarantine ORDER BY source_file, line, row_id, reason")

    def close(self) -> None:
        """Close both databases and delete the parts and spill files (the SQLite file is the caller's to delete)."""
        self.db.close()
        if self.duck is not None:
            self.duck.close()
            self.duck = None
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def _parquet_list(paths: list[Path]) -> str:
    """A DuckDB list literal of file paths (single quotes doubled)."""
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"
