"""Stack Exchange dump reader: Posts.xml / Votes.xml from a file, a site folder or a .7z.

A SOURCE is one of:
  - a ``Posts.xml`` file (its folder's ``Votes.xml`` is read too when present),
  - a site folder holding ``Posts.xml`` and optionally ``Votes.xml``,
  - a ``<site>.7z`` archive holding them, never read whole into memory: its tables are
    decompressed into temporary files and read in ranges (:class:`ArchiveSpool`), or
    streamed out of it when they cannot be cut or the disk is short,
  - Stack Overflow's per-table archives ``<site>-Posts.7z`` / ``<site>-Votes.7z``.

Each row becomes a :class:`PostRecord` or a vote handed to the sink; pairing
happens later, per question, in the on-disk store.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .clean import html_to_text
from .errors import IngestError
from .records import PostRecord, RecordSink, ascii_int
from .xmlstream import MAX_ROW_BYTES, RowParser, parse_file

POST_TYPE_NAMES = {
    "3": "orphaned_tag_wiki",
    "4": "tag_wiki_excerpt",
    "5": "tag_wiki",
    "6": "moderator_nomination",
    "7": "wiki_placeholder",
    "8": "privilege_wiki",
}
_TABLE_ARCHIVE = re.compile(r"^(?P<site>.+)-(?P<table>Posts|Votes)$", re.IGNORECASE)


@dataclass
class Member:
    """One dump table: a plain file, or a member of a .7z archive."""

    table: str  # "Posts" | "Votes"
    path: Path  # the file, or the archive
    member: str | None = None  # name inside the archive

    @property
    def label(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)


@dataclass
class Site:
    name: str
    posts: list[Member] = field(default_factory=list)
    votes: list[Member] = field(default_factory=list)


def _site_name_for_archive(path: Path) -> tuple[str, str | None]:
    stem = path.name[: -len(".7z")]
    m = _TABLE_ARCHIVE.match(stem)
    if m:
        return m.group("site"), m.group("table").capitalize()
    return stem, None


def _archive_members(path: Path) -> list[str]:
    import py7zr
    import py7zr.exceptions

    try:
        with py7zr.SevenZipFile(path, mode="r") as archive:
            if archive.needs_password():
                raise IngestError("encrypted archive: alignflow cannot read password-protected dumps", path=str(path))
            names = archive.getnames()
    except IngestError:
        raise
    except py7zr.exceptions.PasswordRequired:  # the member list itself is encrypted
        raise IngestError("encrypted archive: alignflow cannot read password-protected dumps", path=str(path)) from None
    except Exception as exc:  # py7zr raises several unrelated types for a bad archive
        detail = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
        raise IngestError(f"not a readable 7z archive ({type(exc).__name__}{': ' + detail if detail else ''})",
                          path=str(path)) from None
    for name in names:
        normal = posixpath.normpath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or normal == ".." or normal.startswith("../"):
            raise IngestError(
                f"archive member path {name!r} escapes the archive's folder; refusing the archive",
                path=str(path),
            )
    return names


def _member_named(names: list[str], table: str) -> str | None:
    wanted = f"{table.lower()}.xml"
    for name in names:
        if posixpath.basename(name.replace("\\", "/")).lower() == wanted:
            return name
    return None


def resolve_sites(sources: list[Path]) -> list[Site]:
    """Group SOURCE paths into sites, checking each one is a readable dump."""
    sites: dict[str, Site] = {}

    def site(name: str) -> Site:
        return sites.setdefault(name, Site(name))

    for src in sources:
        src = Path(src)
        if not src.exists():
            raise IngestError("no such file or folder", path=str(src))
        if src.is_dir():
            posts = next((p for p in sorted(src.iterdir()) if p.name.lower() == "posts.xml"), None)
            if posts is None:
                raise IngestError("folder has no Posts.xml (a Stack Exchange site folder needs one)", path=str(src))
            votes = next((p for p in sorted(src.iterdir()) if p.name.lower() == "votes.xml"), None)
            s = site(src.resolve().name)
            s.posts.append(Member("Posts", posts))
            if votes is not None:
                s.votes.append(Member("Votes", votes))
        elif src.name.lower().endswith(".7z"):
            names = _archive_members(src)
            name, table = _site_name_for_archive(src)
            s = site(name)
            found = False
            for tbl in ("Posts", "Votes") if table is None else (table,):
                member = _member_named(names, tbl)
                if member is not None:
                    (s.posts if tbl == "Posts" else s.votes).append(Member(tbl, src, member))
                    found = True
            if not found or (table is None and not s.posts):
                raise IngestError(f"archive has no {table or 'Posts'}.xml (members: {names[:10]})", path=str(src))
        elif src.name.lower() == "posts.xml":
            s = site(src.resolve().parent.name)
            s.posts.append(Member("Posts", src))
            votes = next((p for p in sorted(src.parent.iterdir()) if p.name.lower() == "votes.xml"), None)
            if votes is not None:
                s.votes.append(Member("Votes", votes))
        elif src.name.lower() == "votes.xml":
            raise IngestError("a Votes.xml alone has nothing to score; pass its site folder or Posts.xml", path=str(src))
        else:
            raise IngestError("not a Stack Exchange source (expected Posts.xml, a site folder or a .7z)", path=str(src))
    for s in sites.values():
        if not s.posts:
            raise IngestError(f"site {s.name}: votes given without posts (add its Posts archive)", path=s.name)
        if len(s.posts) > 1:
            raise IngestError(
                f"site {s.name} given twice ({', '.join(m.label for m in s.posts)}); pass each site once",
                path=s.name,
            )
    return list(sites.values())


class _StopExtraction(Exception):
    """Raised from the 7z writer to stop decompressing after the first error."""


_7Z_CHUNK = 4 << 20


def _bound_7z_chunks() -> None:
    """py7zr decompresses up to 128 MB per write (``get_memory_limit``); a few MiB keep memory flat.

    py7zr reads that limit through its module global on every extraction, and
    offers no parameter for it; setting the global is the only way to bound it.
    """
    import py7zr.py7zr as core

    if getattr(core.get_memory_limit, "__name__", "") != "_alignflow_7z_chunk":
        def _alignflow_7z_chunk() -> int:
            return _7Z_CHUNK

        core.get_memory_limit = _alignflow_7z_chunk


def _extract(member: Member, write: Callable[[bytes], None]) -> None:
    """Decompress one archive member, handing its bytes to ``write`` piece by piece (at most :data:`_7Z_CHUNK`).

    An exception from ``write`` stops the decompression there and is raised; an archive that cannot be
    decompressed is an :class:`IngestError` that names it.
    """
    _extract_members(member.path, [member.member], lambda name: write, member.label)


def _extract_members(path: Path, names: list[str], writer: Callable[[str], Callable[[bytes], None]], label: str,
                     ended: Callable[[str], None] | None = None) -> None:
    """Decompress the members ``names`` of the archive ``path`` in one pass, in the archive's order: each member's
    bytes go to ``writer(name)``, and ``ended(name)`` is called once a member is complete. py7zr may decompress
    members of different blocks at once, on threads of its own. An exception from a writer stops the
    decompression and is raised; an archive that cannot be decompressed is an :class:`IngestError` on ``label``."""
    import py7zr
    from py7zr.io import Py7zIO, WriterFactory

    failure: list[BaseException] = []

    class _Feed(Py7zIO):
        def __init__(self, name: str) -> None:
            self._name, self._write, self._size = name, writer(name), 0

        def write(self, s):  # called with each decompressed chunk
            if not failure:
                try:
                    self._write(bytes(s))
                except BaseException as exc:  # re-raised below; py7zr may run us in a worker thread
                    failure.append(exc)
            if failure:
                raise _StopExtraction  # decompress nothing more after the first error
            self._size += len(s)
            return len(s)

        def read(self, size=None):
            return b""

        def seek(self, offset, whence=0):
            return self._size

        def flush(self):
            return None

        def size(self):
            return self._size

        def close(self):  # py7zr closes a member's writer once the member is complete, and only then
            if ended is not None and not failure:
                ended(self._name)

    class _Factory(WriterFactory):
        def create(self, filename: str) -> Py7zIO:
            return _Feed(filename)

    _bound_7z_chunks()
    try:
        with py7zr.SevenZipFile(path, mode="r") as archive:
            archive.extract(targets=list(names), factory=_Factory())
    except IngestError:
        raise
    except Exception as exc:
        if failure:
            raise failure[0] from None
        raise IngestError(
            f"archive could not be decompressed ({type(exc).__name__}: {exc}); it may be truncated or corrupt",
            path=label,
        ) from None
    if failure:
        raise failure[0]


def stream_member(member: Member, on_row: Callable[[Any, int | None], None], root: str,
                  max_row_bytes: int = MAX_ROW_BYTES) -> int:
    """Parse one dump table, from disk or straight out of its archive.

    ``on_row.oversized(line, head)``, when ``on_row`` has it, takes rows over ``max_row_bytes``.
    """
    on_oversize = getattr(on_row, "oversized", None)
    if member.member is None:
        return parse_file(member.path, on_row, root=root, label=member.label, max_row_bytes=max_row_bytes,
                          on_oversize=on_oversize)
    parser = RowParser(member.label, on_row, root=root, max_row_bytes=max_row_bytes, on_oversize=on_oversize)
    _extract(member, parser.feed)
    parser.close()
    return parser.rows


def member_sizes(path: Path) -> dict[str, int]:
    """The size of each member's bytes, as the archive lists them, in the archive's order."""
    import py7zr

    with py7zr.SevenZipFile(path, mode="r") as archive:
        return {info.filename: info.uncompressed for info in archive.list() if info.uncompressed is not None}


class _Stopped(Exception):
    """Raised in a writer of :class:`ArchiveSpool` to stop its decompression."""


class SpooledTable:
    """One table of an :class:`ArchiveSpool`: the file it is written to, and how far."""

    def __init__(self, spool: ArchiveSpool, member: Member, path: Path) -> None:
        self.spool, self.member, self.path = spool, member, path
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self.cuttable: bool | None = None  # None until its head is read
        self.head = bytearray()
        self.file = None

    def head_is_cuttable(self) -> bool:
        """Wait for the table's head: whether it can be cut into ranges (an error before it: raised)."""
        with self.spool.changed:  # once decided, and the file made (by its first write) if it is written
            self.spool.changed.wait_for(lambda: self.done or (self.cuttable is not None and self.written > 0))
        if self.cuttable is None and self.error is not None:
            raise self.error
        return bool(self.cuttable)

    def wait_for(self, size: int) -> int:
        """Wait until ``size`` bytes are written or the table ends; the bytes written."""
        with self.spool.changed:
            self.spool.changed.wait_for(lambda: self.written >= size or self.done)
            return self.written


class ArchiveSpool:
    """The tables ``members`` of one archive, decompressed in one pass (as they lie in the archive) on a thread of
    its own, each into its own file in ``folder``: their first bytes can be read (by
    :func:`.ranges.growing_range_tasks`, through :meth:`table`) while the rest is still being decompressed.

    One pass: a site's dump is one solid stream (its ``Votes.xml`` after ``Posts.xml``, and often after tables
    not read, such as ``PostHistory.xml``), and decompressing it once per table decompressed ``Posts.xml`` twice.
    A table whose first bytes are not a head it can be cut after (:func:`.ranges.cuttable_head`) is no longer
    written (:meth:`SpooledTable.head_is_cuttable` is False: it is parsed straight out of its archive, where the
    parser stops at its first error), and the pass stops once no table is wanted. A decompression error is the
    :attr:`SpooledTable.error` of every table not complete. :meth:`close` stops a decompression still running and
    removes the files: call it in any case.

    A thread rather than a process: the two gave the same command time on a 302 MiB Posts.xml (2 cores, three
    alternating rounds, 16.8-18.6 s against 17.6-18.4 s); py7zr's LZMA calls release the interpreter lock.
    """

    def __init__(self, members: list[Member], folder: Path) -> None:
        import threading

        from .ranges import HEAD_BYTES

        self.archive = members[0].path
        self.tables = {m.member: SpooledTable(self, m, folder / f"{m.table}.spool.xml") for m in members}
        self._head_bytes = HEAD_BYTES
        self.seconds = 0.0  # the thread's CPU, once done
        self._stop = False
        self.changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="alignflow-7z-spool", daemon=True)
        self._thread.start()

    def table(self, member: Member) -> SpooledTable:
        return self.tables[member.member]

    def _writer(self, name: str) -> Callable[[bytes], None]:
        table = self.tables[name]

        def write(data: bytes) -> None:
            if self._stop:
                raise _Stopped
            if table.cuttable is None:
                table.head.extend(data[: self._head_bytes - len(table.head)])
                if len(table.head) >= self._head_bytes and self._decide(table):
                    raise _Stopped  # no table is wanted any more
            if table.cuttable is False:
                return
            if table.file is None:
                table.file = open(table.path, "wb", buffering=0)  # unbuffered: what is counted is in the file
            view = memoryview(data)
            while view:
                view = view[table.file.write(view):]
            with self.changed:
                table.written += len(data)
                self.changed.notify_all()

        return write

    def _decide(self, table: SpooledTable) -> bool:
        """Whether ``table`` can be cut, from its head; True when no table is wanted any more."""
        from .ranges import cuttable_head

        cut = cuttable_head(bytes(table.head), table.member.table.lower())
        with self.changed:
            table.cuttable = cut
            if not cut:
                table.done = True  # not written: streamed from the archive instead
            self.changed.notify_all()
            return all(t.done for t in self.tables.values())

    def _ended(self, name: str) -> None:
        table = self.tables[name]
        if table.cuttable is None:  # a table shorter than its head
            self._decide(table)
        if table.file is not None:
            table.file.close()
        with self.changed:
            table.done = True
            self.changed.notify_all()

    def _run(self) -> None:
        import time

        started = time.thread_time()
        error: BaseException | None = None
        try:
            first = next(iter(self.tables.values())).member
            _extract_members(self.archive, list(self.tables), self._writer, first.label, self._ended)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised where a table's bytes are awaited
            error = exc
        finally:
            with self.changed:
                for table in self.tables.values():
                    if table.file is not None:
                        table.file.close()
                    if not table.done and error is not None:
                        table.error = _named(error, table)
                    table.done = True
                self.seconds = time.thread_time() - started
                self.changed.notify_all()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for table in self.tables.values():
            table.path.unlink(missing_ok=True)


def _named(error: BaseException, table: SpooledTable) -> BaseException:
    """A decompression error as the error of one table: an :class:`IngestError` on that table."""
    if isinstance(error, IngestError):
        return IngestError(error.reason, path=table.member.label)
    if isinstance(error, OSError):  # the file: a full disk, a folder gone
        return IngestError(f"could not be decompressed into {table.path} ({error.strerror or type(error).__name__})",
                           path=table.member.label)
    return error


def read_table(site: str, member: Member, sink: RecordSink, *, on_bad_row: str = "error", max_chars: int = 20_000,
               max_row_bytes: int = MAX_ROW_BYTES) -> None:
    """Stream one table of ``site`` into the sink through its row reader."""
    if member.table == "Votes":
        reader: Any = VoteRowReader(site, member.label, sink, on_bad_row=on_bad_row)
    else:
        reader = PostRowReader(site, member.label, sink, on_bad_row=on_bad_row, max_chars=max_chars)
    stream_member(member, reader, root=member.table.lower(), max_row_bytes=max_row_bytes)


class PostRowReader:
    """Turns Posts.xml row attributes into PostRecords (or quarantines/skips them)."""

    def __init__(self, site: str, source_file: str, sink: RecordSink, *, on_bad_row: str, max_chars: int,
                 render: Callable[[str], str] = html_to_text) -> None:
        """``render``: body HTML to text (:func:`~.clean.html_to_text`; a timed wrapper of it in a profile)."""
        self.site = site
        self.source_file = source_file
        self.sink = sink
        self.on_bad_row = on_bad_row
        self.max_chars = max_chars
        self.render = render

    def _bad(self, reason: str, line: int | None, row_id: str | None, fieldname: str, attrib: Any) -> None:
        if self.on_bad_row == "error":
            raise IngestError(reason, path=self.source_file, line=line, row_id=row_id, field=fieldname)
        self.sink.quarantine(
            source_file=self.source_file,
            reason="malformed_row",
            line=line,
            row_id=row_id,
            site=self.site,
            detail=f"{fieldname}: {reason}",
            raw=_raw(attrib),
        )

    def __call__(self, attrib: Any, line: int | None) -> None:
        sink, get = self.sink, attrib.get
        sink.count(self.source_file, "rows")
        post_id = get("Id")
        if ascii_int(post_id, signed=False) is None:
            return self._bad("missing or non-integer Id", line, post_id, "Id", attrib)
        post_id = post_id.strip()
        post_type = get("PostTypeId")
        if post_type not in ("1", "2"):
            if ascii_int(post_type, signed=False) is None:
                return self._bad("missing or non-integer PostTypeId", line, post_id, "PostTypeId", attrib)
            sink.count(self.source_file, f"skipped:{POST_TYPE_NAMES.get(post_type, 'post_type_' + post_type)}")
            return
        score_text = get("Score")
        score = ascii_int(score_text)
        if score is None:
            return self._bad(f"Score {_shown(score_text)!r} is not a 64-bit integer", line, post_id, "Score", attrib)

        is_question = post_type == "1"
        if is_question:
            question_id = post_id
            title = " ".join((get("Title") or "").split())
            if not title:
                return self._quarantine("empty_title", line, post_id, attrib)
        else:
            question_id = get("ParentId")
            if ascii_int(question_id, signed=False) is None or question_id != question_id.strip():
                return self._bad("answer without an integer ParentId", line, post_id, "ParentId", attrib)
            title = ""
        body = self.render(get("Body") or "")
        if not is_question and not body:
            return self._quarantine("empty_body", line, post_id, attrib)
        if len(body) > self.max_chars:
            return self._quarantine("too_long", line, post_id, attrib, detail=f"{len(body)} chars > {self.max_chars}")

        owner = get("OwnerUserId")
        author = f"user:{owner}" if owner else (f"name:{get('OwnerDisplayName')}" if get("OwnerDisplayName") else "")
        tags = get("Tags") or ""
        if tags:
            tags = "|".join(t for t in re.split(r"[<>|]+", tags) if t)
        sink.add_post(
            PostRecord(
                site=self.site,
                source="stackexchange",
                post_id=post_id,
                kind="question" if is_question else "answer",
                question_id=question_id,
                title=title,
                body=body,
                tags=tags,
                score=score,
                accepted_answer_id=(get("AcceptedAnswerId") or "") if is_question else "",
                author=author,
                license=get("ContentLicense") or "",
                created_at=get("CreationDate") or "",
                source_file=self.source_file,
                line=line,
            )
        )

    def oversized(self, line: int, head: bytes) -> None:
        self.sink.count(self.source_file, "rows")
        quarantine_oversized(self.sink, self.source_file, self.site, line, head)

    def _quarantine(self, reason: str, line: int | None, row_id: str, attrib: Any, detail: str = "") -> None:
        self.sink.quarantine(
            source_file=self.source_file,
            reason=reason,
            line=line,
            row_id=row_id,
            site=self.site,
            detail=detail,
            raw=_raw(attrib),
        )


def quarantine_oversized(sink: RecordSink, source_file: str, site: str, line: int, head: bytes) -> None:
    """A <row> too long to read: quarantined with its first bytes (and its Id when they hold it)."""
    m = re.search(rb'\sId="([0-9]{1,19})"', head)
    sink.quarantine(source_file=source_file, reason="too_large", line=line, row_id=m.group(1).decode() if m else None,
                    site=site, detail="row longer than ingest.max_row_bytes; not read",
                    raw=head.decode("utf-8", errors="replace"))


class VoteRowReader:
    def __init__(self, site: str, source_file: str, sink: RecordSink, *, on_bad_row: str) -> None:
        self.site = site
        self.source_file = source_file
        self.sink = sink
        self.on_bad_row = on_bad_row

    def __call__(self, attrib: Any, line: int | None) -> None:
        self.sink.count(self.source_file, "rows")
        post_id, vote_type = attrib.get("PostId"), attrib.get("VoteTypeId")
        if ascii_int(post_id, signed=False) is None or ascii_int(vote_type, signed=False) is None \
                or post_id != post_id.strip() or vote_type != vote_type.strip():
            fieldname = "PostId" if ascii_int(post_id, signed=False) is None or post_id != post_id.strip() \
                else "VoteTypeId"
            if self.on_bad_row == "error":
                raise IngestError(
                    "missing or non-integer value", path=self.source_file, line=line, row_id=attrib.get("Id"),
                    field=fieldname,
                )
            self.sink.quarantine(
                source_file=self.source_file, reason="malformed_row", line=line, row_id=attrib.get("Id"),
                site=self.site, detail=fieldname, raw=_raw(attrib),
            )
            return
        if vote_type not in ("1", "2", "3"):
            self.sink.count(self.source_file, "skipped:other_vote_type")
            return
        self.sink.add_vote(self.site, post_id, int(vote_type))

    def oversized(self, line: int, head: bytes) -> None:
        self.sink.count(self.source_file, "rows")
        quarantine_oversized(self.sink, self.source_file, self.site, line, head)


def _shown(text: str | None, limit: int = 40) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit] + "…"


def _raw(attrib: Any, limit: int = 2000) -> str:
    text = " ".join(f'{k}="{v}"' for k, v in attrib.items())
    return text if len(text) <= limit else text[:limit] + "…"


def read_site(site: Site, sink: RecordSink, *, on_bad_row: str = "error", max_chars: int = 20_000,
              max_row_bytes: int = MAX_ROW_BYTES) -> dict:
    """Stream one site's tables into the sink; returns what was read (for run params)."""
    info = {"site": site.name, "posts": [m.label for m in site.posts], "votes": [m.label for m in site.votes]}
    for member in (*site.votes, *site.posts):
        read_table(site.name, member, sink, on_bad_row=on_bad_row, max_chars=max_chars, max_row_bytes=max_row_bytes)
    return info
