"""Where labeling lives: batches, items, labelers, assignments and submissions in SQL (SQLite or PostgreSQL).

The embedded default is a SQLite file in the work directory (WAL journal: a
killed server loses no committed submission); server mode is the same code on
PostgreSQL, chosen by the database URL alone.

Guarantees the app relies on:

* Tokens are stored as SHA-256 hashes only and compared in constant time.
* An item is served to at most ``overlap`` labelers and never twice to the
  same one (gold items go to everyone); the next item is the least-served
  one, so items complete evenly. Serving and submitting are transactions that
  hold the batch's write lock (``BEGIN IMMEDIATE`` on SQLite, an advisory
  transaction lock on PostgreSQL), so concurrent labelers cannot over-assign.
* An assignment left unsubmitted for ``ASSIGNMENT_TTL_S`` stops counting
  toward the item's overlap (the item may go to someone else); if its labeler
  still submits it later the answer is kept, so such an item can end with one
  ranking more than ``overlap``.
* A submission is one transaction with a unique ``(item, labeler)`` and a
  unique idempotency key: a retried request returns the stored submission, a
  second submission with a new key is refused unless it asks to replace the
  first (then the revision count goes up, visibly).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import hmac
import json
import random
import secrets
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from .rankings import RankingError, ab_ranking, validate_ranking

__all__ = [
    "LabelStore",
    "StoreError",
    "NotFound",
    "Conflict",
    "Forbidden",
    "database_url",
    "hash_token",
]

DB_ENV = "ALIGNFLOW_LABEL_DB"
#: An assignment a labeler has not submitted is released to others after this long.
ASSIGNMENT_TTL_S = 30 * 60

metadata = sa.MetaData()

batches = sa.Table(
    "label_batches", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("instructions", sa.Text, nullable=False, default=""),
    sa.Column("overlap", sa.Integer, nullable=False),
    sa.Column("demonstrations", sa.Boolean, nullable=False, default=False),
    sa.Column("provenance", sa.Text, nullable=False, default="{}"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
items = sa.Table(
    "label_items", metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("label_batches.id"), nullable=False, index=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("prompt_id", sa.String(200), nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("responses", sa.Text, nullable=False),  # JSON [{id, text, policy, provenance}]
    sa.Column("gold", sa.Text, nullable=True),  # JSON tie groups, best first (gold items only)
)
labelers = sa.Table(
    "label_labelers", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
assignments = sa.Table(
    "label_assignments", metadata,
    sa.Column("item_id", sa.String(128), sa.ForeignKey("label_items.id"), primary_key=True),
    sa.Column("labeler_id", sa.Integer, sa.ForeignKey("label_labelers.id"), primary_key=True),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("shown_order", sa.Text, nullable=False),  # JSON list of response ids as displayed
    sa.Column("served_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("submitted", sa.Boolean, nullable=False, default=False),
    sa.Index("ix_label_assignments_labeler", "batch_id", "labeler_id", "submitted"),
)
submissions = sa.Table(
    "label_submissions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("batch_id", sa.String(64), nullable=False, index=True),
    sa.Column("item_id", sa.String(128), sa.ForeignKey("label_items.id"), nullable=False),
    sa.Column("labeler_id", sa.Integer, sa.ForeignKey("label_labelers.id"), nullable=False),
    sa.Column("ranking", sa.Text, nullable=False),  # JSON tie groups, best first
    sa.Column("strength", sa.Integer, nullable=True),  # A/B scale magnitude (K = 2), else NULL
    sa.Column("demonstration", sa.Text, nullable=True),
    sa.Column("shown_order", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.String(128), nullable=False, unique=True),
    sa.Column("revision", sa.Integer, nullable=False, default=1),
    sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("item_id", "labeler_id", name="uq_label_submission_item_labeler"),
)


def _candidate_statements() -> tuple[sa.Select, sa.Select, sa.Select]:
    """Items a labeler may be served (never theirs before; gold, or below ``overlap`` counting submitted and live
    assignments): (best regular item, first gold item, how many). Built once, with bound parameters
    ``batch_id``, ``me``, ``overlap``, ``cutoff``."""
    a = assignments.alias("a")
    mine = assignments.alias("mine")
    load = sa.func.count(a.c.labeler_id).label("load")
    cand = (
        sa.select(items.c.id, items.c.position, (items.c.gold.is_not(None)).label("is_gold"), load)
        .select_from(items.outerjoin(a, sa.and_(a.c.item_id == items.c.id,
                                               sa.or_(a.c.submitted, a.c.served_at > sa.bindparam("cutoff")))))
        .where(items.c.batch_id == sa.bindparam("batch_id"),
               ~sa.exists().where(mine.c.item_id == items.c.id, mine.c.labeler_id == sa.bindparam("me")))
        .group_by(items.c.id, items.c.position, items.c.gold)
        .having(sa.or_(items.c.gold.is_not(None), load < sa.bindparam("overlap")))
    ).subquery()
    best = (sa.select(cand.c.id, cand.c.position, cand.c.load).where(sa.not_(cand.c.is_gold))
            .order_by(cand.c.load, cand.c.position).limit(1))
    gold = sa.select(cand.c.id, cand.c.position).where(cand.c.is_gold).order_by(cand.c.position).limit(1)
    return best, gold, sa.select(sa.func.count()).select_from(cand)


_BEST, _GOLD, _FREE = _candidate_statements()


class StoreError(Exception):
    """A request the store refuses; ``status`` is the HTTP status the app answers with."""

    status = 400


class NotFound(StoreError):
    status = 404


class Forbidden(StoreError):
    status = 403


class Conflict(StoreError):
    status = 409


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _aware(t: _dt.datetime) -> _dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def database_url(workdir: Path, url: str | None = None) -> str:
    """``url``, else ``$ALIGNFLOW_LABEL_DB``, else ``sqlite:///<workdir>/label.db``."""
    import os

    return url or os.environ.get(DB_ENV) or f"sqlite:///{Path(workdir).resolve() / 'label.db'}"


def _sqlite_setup(engine: sa.Engine) -> None:
    """WAL journal, foreign keys, and BEGIN IMMEDIATE so a write transaction takes the lock up front."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event below issue BEGIN
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # noqa: ANN001
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


_WRITE = "alignflow_write"


@dataclass
class Labeler:
    id: int
    name: str
    is_admin: bool


class LabelStore:
    """All reads and writes of the labeling app (one engine; thread-safe like SQLAlchemy's pool)."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"future": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_size=20, max_overflow=40, pool_pre_ping=True)
        self.engine = sa.create_engine(url, **kwargs)
        if self.is_sqlite:
            _sqlite_setup(self.engine)
        if create:
            metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ----------------------------------------------------------------- transactions
    @contextlib.contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        """A write transaction (takes SQLite's write lock at BEGIN, so read-then-write cannot deadlock)."""
        with self.engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                yield conn

    def _locked(self, conn: sa.Connection, batch_id: str) -> None:
        """Serialise writers of one batch (SQLite's BEGIN IMMEDIATE already holds the database lock)."""
        if not self.is_sqlite:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"),
                         {"k": zlib.crc32(batch_id.encode()) & 0x7FFFFFFF})

    # ----------------------------------------------------------------- labelers and tokens
    def invite(self, name: str, *, admin: bool = False) -> str:
        """Create a labeler (or an admin) and return its token; only the token's hash is stored."""
        name = name.strip()
        if not name:
            raise StoreError("a labeler needs a name")
        token = secrets.token_urlsafe(32)
        with self._tx() as conn:
            if conn.execute(sa.select(labelers.c.id).where(labelers.c.name == name)).first():
                raise Conflict(f"labeler {name!r} exists already")
            conn.execute(labelers.insert().values(name=name, token_hash=hash_token(token), is_admin=admin,
                                                  created_at=_now()))
        return token

    def authenticate(self, token: str | None) -> Labeler | None:
        """The labeler whose token this is, or None (the stored hash is compared in constant time)."""
        if not token:
            return None
        digest = hash_token(token)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(labelers).where(labelers.c.token_hash == digest)).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        return Labeler(row.id, row.name, bool(row.is_admin))

    def labeler_names(self) -> dict[int, str]:
        with self.engine.connect() as conn:
            return {r.id: r.name for r in conn.execute(sa.select(labelers.c.id, labelers.c.name))}

    # ----------------------------------------------------------------- batches
    def create_batch(self, batch_id: str, name: str, batch_items: Iterable[Mapping], *, instructions: str = "",
                     overlap: int = 3, demonstrations: bool = False, provenance: Mapping | None = None) -> int:
        """Store a batch: items with ``item_id, prompt_id, prompt, responses`` (and ``gold``). Returns item count."""
        if overlap < 1:
            raise StoreError(f"overlap must be >= 1, not {overlap}")
        rows = []
        for pos, it in enumerate(batch_items):
            responses = list(it["responses"])
            ids = [r["id"] for r in responses]
            if len(ids) < 2 or len(set(ids)) != len(ids):
                raise StoreError(f"item {it['item_id']!r}: needs 2 or more responses with distinct ids")
            gold = it.get("gold")
            if gold is not None:
                try:
                    gold = validate_ranking(gold, ids)
                except RankingError as exc:
                    raise StoreError(f"item {it['item_id']!r}: gold order: {exc}") from exc
            rows.append({"id": f"{batch_id}/{it['item_id']}", "batch_id": batch_id, "position": pos,
                         "prompt_id": str(it["prompt_id"]), "prompt": it["prompt"],
                         "responses": json.dumps(responses), "gold": None if gold is None else json.dumps(gold)})
        if not rows:
            raise StoreError(f"batch {batch_id!r} has no items")
        with self._tx() as conn:
            if conn.execute(sa.select(batches.c.id).where(batches.c.id == batch_id)).first():
                raise Conflict(f"batch {batch_id!r} exists already")
            conn.execute(batches.insert().values(id=batch_id, name=name, instructions=instructions, overlap=overlap,
                                                 demonstrations=demonstrations,
                                                 provenance=json.dumps(dict(provenance or {})), created_at=_now()))
            conn.execute(items.insert(), rows)
        return len(rows)

    def batch(self, batch_id: str) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(batches).where(batches.c.id == batch_id)).first()
        if row is None:
            raise NotFound(f"no batch {batch_id!r}")
        return {"id": row.id, "name": row.name, "instructions": row.instructions, "overlap": row.overlap,
                "demonstrations": bool(row.demonstrations), "provenance": json.loads(row.provenance)}

    def batch_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r.id for r in conn.execute(sa.select(batches.c.id).order_by(batches.c.created_at))]

    # ----------------------------------------------------------------- serving
    def progress(self, batch_id: str, labeler: Labeler) -> dict:
        """``done``: this labeler's submissions in the batch; ``total``: how many items they can be served."""
        with self.engine.connect() as conn:
            return self._progress(conn, batch_id, labeler)

    def _progress(self, conn: sa.Connection, batch_id: str, labeler: Labeler) -> dict:
        b = conn.execute(sa.select(batches.c.overlap).where(batches.c.id == batch_id)).first()
        if b is None:
            raise NotFound(f"no batch {batch_id!r}")
        mine = conn.execute(sa.select(assignments.c.submitted, sa.func.count()).where(
            assignments.c.batch_id == batch_id, assignments.c.labeler_id == labeler.id)
            .group_by(assignments.c.submitted)).all()
        done = sum(n for submitted, n in mine if submitted)
        still_open = sum(n for submitted, n in mine if not submitted)
        free = conn.execute(_FREE, self._params(batch_id, labeler.id, b.overlap, _now())).scalar_one()
        return {"done": int(done), "total": int(done + still_open + free)}

    @staticmethod
    def _params(batch_id: str, labeler_id: int, overlap: int, now: _dt.datetime) -> dict:
        return {"batch_id": batch_id, "me": labeler_id, "overlap": overlap,
                "cutoff": now - _dt.timedelta(seconds=ASSIGNMENT_TTL_S)}

    def next_item(self, batch_id: str, labeler: Labeler) -> dict | None:
        """The item to show this labeler next (its open one first), with the responses in a recorded random order.

        Otherwise the least-served item (by submissions plus live assignments), then by position; a gold item
        counts as being at the current level, so gold items are mixed in rather than served first or last.
        """
        now = _now()
        with self._tx() as conn:
            self._locked(conn, batch_id)
            b = conn.execute(sa.select(batches).where(batches.c.id == batch_id)).first()
            if b is None:
                raise NotFound(f"no batch {batch_id!r}")
            open_row = conn.execute(
                sa.select(assignments.c.item_id, assignments.c.shown_order)
                .select_from(assignments.join(items, items.c.id == assignments.c.item_id))
                .where(assignments.c.batch_id == batch_id, assignments.c.labeler_id == labeler.id,
                       sa.not_(assignments.c.submitted))
                .order_by(items.c.position).limit(1)).first()
            if open_row is not None:
                item_id, order = open_row.item_id, json.loads(open_row.shown_order)
                conn.execute(sa.update(assignments).where(assignments.c.item_id == item_id,
                                                          assignments.c.labeler_id == labeler.id).values(served_at=now))
            else:
                params = self._params(batch_id, labeler.id, b.overlap, now)
                best = conn.execute(_BEST, params).first()
                level = best.load if best is not None else 0
                gold = conn.execute(_GOLD, params).first()
                choices = [(r.load, r.position, r.id) for r in (best,) if r is not None]
                choices += [(level, g.position, g.id) for g in (gold,) if g is not None]
                if not choices:
                    return None
                item_id = min(choices)[2]
                ids = [r["id"] for r in json.loads(conn.execute(
                    sa.select(items.c.responses).where(items.c.id == item_id)).scalar_one())]
                order = random.Random(secrets.randbits(64)).sample(ids, len(ids))
                conn.execute(assignments.insert().values(item_id=item_id, labeler_id=labeler.id, batch_id=batch_id,
                                                         shown_order=json.dumps(order), served_at=now,
                                                         submitted=False))
            it = conn.execute(sa.select(items).where(items.c.id == item_id)).first()
            progress = self._progress(conn, batch_id, labeler)
        by_id = {r["id"]: r for r in json.loads(it.responses)}
        return {"item_id": it.id, "batch_id": batch_id, "prompt": it.prompt,
                "responses": [{"id": rid, "text": by_id[rid]["text"]} for rid in order],
                "instructions": b.instructions, "demonstrations": bool(b.demonstrations), "progress": progress}

    # ----------------------------------------------------------------- submitting
    def submit(self, item_id: str, labeler: Labeler, *, idempotency_key: str, ranking: Any = None,
               ab: int | None = None, demonstration: str | None = None, replace: bool = False) -> dict:
        """Store one ranking in one transaction. Returns ``{"submission_id", "revision", "duplicate"}``."""
        if not idempotency_key or len(idempotency_key) > 128:
            raise StoreError("idempotency_key must be 1 to 128 characters")
        with self.engine.connect() as conn:
            it = conn.execute(sa.select(items).where(items.c.id == item_id)).first()
        if it is None:
            raise NotFound(f"no item {item_id!r}")
        ids = [r["id"] for r in json.loads(it.responses)]
        strength = None
        if ab is not None:
            if ranking is not None:
                raise StoreError("give either a ranking or an A/B choice, not both")
            if len(ids) != 2:
                raise StoreError(f"an A/B choice needs an item with 2 responses; this one has {len(ids)}")
            # "A" and "B" are the two responses in the order this labeler was shown them (resolved below).
        elif ranking is None:
            raise StoreError("a submission needs a ranking (or, for 2 responses, an A/B choice)")
        b = self.batch(it.batch_id)
        if b["demonstrations"] and not (demonstration or "").strip():
            raise StoreError("this batch asks for a demonstration: write the response you would want")
        if demonstration is not None and len(demonstration) > 50_000:
            raise StoreError("demonstration is longer than 50000 characters")
        with self._tx() as conn:
            self._locked(conn, it.batch_id)
            prior = conn.execute(sa.select(submissions).where(submissions.c.idempotency_key == idempotency_key)).first()
            if prior is not None:
                if prior.item_id != item_id or prior.labeler_id != labeler.id:
                    raise Conflict("idempotency_key was already used for another submission")
                return {"submission_id": prior.id, "revision": prior.revision, "duplicate": True}
            shown = conn.execute(sa.select(assignments.c.shown_order).where(
                assignments.c.item_id == item_id, assignments.c.labeler_id == labeler.id)).scalar_one_or_none()
            if shown is None:
                raise Forbidden("this item was not served to you: ask for the next item first")
            shown_order = json.loads(shown)
            if ab is not None:
                try:
                    ranking, strength = ab_ranking(ab, shown_order[0], shown_order[1])
                except RankingError as exc:
                    raise StoreError(str(exc)) from exc
            try:
                groups = validate_ranking(ranking, ids)
            except RankingError as exc:
                raise StoreError(str(exc)) from exc
            values = {"ranking": json.dumps(groups), "strength": strength, "demonstration": demonstration,
                      "shown_order": shown, "submitted_at": _now()}
            existing = conn.execute(sa.select(submissions).where(submissions.c.item_id == item_id,
                                                                 submissions.c.labeler_id == labeler.id)).first()
            if existing is not None:
                if not replace:
                    raise Conflict("you already submitted this item; submit with replace=true to replace it")
                conn.execute(sa.update(submissions).where(submissions.c.id == existing.id).values(
                    **values, idempotency_key=idempotency_key, revision=existing.revision + 1))
                return {"submission_id": existing.id, "revision": existing.revision + 1, "duplicate": False}
            conn.execute(sa.update(assignments).where(assignments.c.item_id == item_id,
                                                      assignments.c.labeler_id == labeler.id).values(submitted=True))
            sid = conn.execute(submissions.insert().values(
                batch_id=it.batch_id, item_id=item_id, labeler_id=labeler.id, idempotency_key=idempotency_key,
                revision=1, **values)).inserted_primary_key[0]
        return {"submission_id": int(sid), "revision": 1, "duplicate": False}

    # ----------------------------------------------------------------- export
    def export(self, batch_id: str) -> list[dict]:
        """Every submission of the batch with its item: what scores, agreement and pairs are computed from."""
        self.batch(batch_id)
        names = self.labeler_names()
        with self.engine.connect() as conn:
            its = {r.id: r for r in conn.execute(sa.select(items).where(items.c.batch_id == batch_id))}
            subs = conn.execute(sa.select(submissions).where(submissions.c.batch_id == batch_id)
                                .order_by(submissions.c.id)).all()
        out = []
        for s in subs:
            it = its[s.item_id]
            responses = json.loads(it.responses)
            out.append({
                "submission_id": s.id, "ranking_id": f"{s.item_id}#{names.get(s.labeler_id, s.labeler_id)}",
                "batch_id": batch_id, "item_id": s.item_id, "prompt_id": it.prompt_id, "prompt": it.prompt,
                "labeler": names.get(s.labeler_id, str(s.labeler_id)), "groups": json.loads(s.ranking),
                "strength": s.strength, "demonstration": s.demonstration, "shown_order": json.loads(s.shown_order),
                "revision": s.revision, "submitted_at": _aware(s.submitted_at).isoformat(),
                "responses": {r["id"]: r["text"] for r in responses},
                "policies": {r["id"]: r.get("policy", "") for r in responses},
                "gold": None if it.gold is None else json.loads(it.gold),
            })
        return out

    def counts(self, batch_id: str) -> dict:
        """Items, submissions, and how many items have all ``overlap`` submissions (gold excluded)."""
        b = self.batch(batch_id)
        with self.engine.connect() as conn:
            per = dict(conn.execute(sa.select(submissions.c.item_id, sa.func.count()).where(
                submissions.c.batch_id == batch_id).group_by(submissions.c.item_id)).all())
            its = conn.execute(sa.select(items.c.id, items.c.gold).where(items.c.batch_id == batch_id)).all()
        regular = [r.id for r in its if r.gold is None]
        return {"items": len(its), "gold_items": len(its) - len(regular), "submissions": int(sum(per.values())),
                "complete_items": sum(1 for i in regular if per.get(i, 0) >= b["overlap"]),
                "overlap": b["overlap"]}
