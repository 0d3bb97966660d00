"""Ingest as plain functions: plan (formats, fingerprints, cache key), then build.

``plan_ingest`` looks at the SOURCEs, decides their formats and hashes their
contents; with the config and the ingest code it makes the cache key. The
datasets of a key live in ``<workdir>/data/ingest/<key>/``; if that folder
exists the work is already done (a cache hit with identical files).
``execute_ingest`` builds into a temporary folder beside it and renames it into
place only when every dataset passed its contract: a failed run leaves nothing
behind but its error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignflow.config import IngestConfig

from . import schema
from alignflow.tasks.processes import lower_priority, lower_thread_priority, process_alive

from .errors import IngestError
from .scoring import check_template
from .phases import Phases
from .ranges import default_workers, file_stamp
from .sources import detect_format, read_all, reader
from .stackexchange import Site, resolve_sites
from .store import DERIVED

CODE_DIRS = [Path(__file__).resolve().parent, Path(__file__).resolve().parents[2] / "data_contracts"]
# Settings that change how the work is spread, never what it produces: not part of the cache key.
EXECUTION_ONLY = {"workers", "range_mb", "runner", "address"}


@dataclass
class Source:
    path: str
    format: str
    files: list[str]
    bytes: int
    sha256: str


@dataclass
class IngestPlan:
    sources: list[Source]
    key: str
    out_dir: str
    config: dict[str, Any]
    # each input file's file_stamp (device, inode, size, modification time) when it was hashed: check_unchanged
    stamps: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def pushshift(self) -> bool:
        """Whether some source is a Pushshift file: its build keeps the C library's allocator and 8 MiB contract
        batches (a Pushshift month peaks higher on the others)."""
        return any(source.format == "reddit" for source in self.sources)


@dataclass
class IngestResult:
    out_dir: str
    cache_hit: bool
    datasets: dict[str, dict[str, Any]]  # kind -> {path, rows, digest}
    report: dict[str, Any]
    seconds: float
    input_bytes: int
    docs: dict[str, str] = field(default_factory=dict)


# -- formats: see sources.py (the reader registry) ------------------------------------
def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_PREHASHED: dict[tuple, Future] = {}  # (path, file_stamp) -> digest being computed


def _stat_key(path: Path) -> tuple:
    """A digest started for this key is the file's while the key is the same: a file replaced by another of
    the same size and time (``cp -p``) has another inode."""
    return (str(Path(path).resolve()), *file_stamp(path))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's contents (the digest :func:`prehash` started, if the file is unchanged since)."""
    try:
        started = _PREHASHED.pop(_stat_key(path), None)
    except OSError:
        started = None
    if started is not None:
        try:
            return started.result()
        except OSError:
            pass  # read again below, so the error is the one the caller would have met
    return _sha256(path, chunk)


# The digests are needed once the flow has started (its plan), the command's imports and Prefect's server's boot
# before that: on the same two cores, the hashing threads take what those leave. At 1 GiB of Posts.xml and its
# Votes.xml (2.2 GB, ~2.3 CPU-s), 2 workers, six alternating pairs (2-core machine, 2026-12-05): the command less
# its ingest 4.74-5.37 s at equal priority, 4.51-5.10 s at 5 (lower in five pairs of six; means 5.10 and 4.82),
# the whole command 22.9-25.4 s against 22.5-25.4 s (means 24.4 and 24.1).
DIGEST_NICE = 5


def prehash(sources: list[str | Path], fmt: str | None = None) -> None:
    """Start hashing the input files on a thread, so the digests of the cache key (:func:`plan_ingest`) are
    ready or nearly so when the flow needs them: the command is meanwhile importing its modules and waiting
    for Prefect's server (hashing and file reads run without the GIL), at :data:`DIGEST_NICE`. At 1 GiB of
    Posts.xml and its Votes.xml, hashing is 4 s from the page cache and up to 22 s from disk. Sources that do
    not resolve are left alone: :func:`plan_ingest` reports them."""
    files = []
    for raw in sources:
        try:
            files += [p for p in source_files(Path(raw), fmt or "auto")[1] if p.is_file()]
        except Exception:  # noqa: BLE001 - any problem is plan_ingest's to report
            continue
    todo = []
    for file in files:
        try:
            key = _stat_key(file)
        except OSError:
            continue
        if key not in _PREHASHED:
            _PREHASHED[key] = Future()
            todo.append((file, _PREHASHED[key]))

    pending = list(reversed(todo))
    lock = threading.Lock()

    def run() -> None:
        lower_thread_priority(DIGEST_NICE)
        while True:
            with lock:
                if not pending:
                    return
                file, future = pending.pop()
            try:
                future.set_result(_sha256(file))
            except BaseException as exc:  # noqa: BLE001 - handed to sha256_file, which reads again
                future.set_exception(exc)

    # One thread per file, up to the cores: a Posts.xml and its Votes.xml are hashed side by side (at 1 GiB of
    # each, 2.3 s one after the other, 1.0 s side by side on 2 idle cores). Daemons: a command that fails
    # before its plan does not wait for the digests.
    for _ in range(min(len(todo), os.cpu_count() or 1)):
        threading.Thread(target=run, name="alignflow-prehash", daemon=True).start()


# What a read-ahead (:func:`read_ahead`) may leave waiting in memory for the read phase: this many bytes of Posts.xml
# ranges, whose results hold the posts' texts. A Votes.xml range counts a quarter of its bytes: its result is a
# few counts per post, and it reads about 4x faster. At 1 GiB of Posts.xml and its Votes.xml (2-core machine,
# 3 alternating pairs) the command took 46.8, 46.8 and 46.7 s without, 45.7, 46.0 and 45.9 s with, the read
# phase 13.5 -> 12.3 s.
READ_AHEAD_BYTES = 192 << 20
# The same while the contract worker starts beside it (inputs up to contract_service.EARLY_START_MAX_XML_BYTES):
# the worker's imports take most of the idle time, and its ~275 MiB sit beside the waiting results. On 301 MiB of
# real rows, 6 alternating pairs: the ingest's own time 9.0-9.6 -> 8.7-9.5 s, peak RSS 882-896 -> 889-915 MiB.
READ_AHEAD_BYTES_BESIDE_CONTRACTS = 64 << 20


def read_ahead(sources: list[str | Path], workdir: Path, cfg: IngestConfig, fmt: str | None = None, *,
               budget: int = READ_AHEAD_BYTES) -> bool:
    """Send the first byte ranges of the input to the read phase's worker processes now, while the command
    starts up (imports, Prefect's server booting), when a core is mostly idle; the read phase adopts them
    (:func:`.ranges.adopt_read_ahead`). Returns whether any were sent.

    Only for Stack Exchange sites in plain files, read locally on several workers, and not when a dataset in
    ``workdir`` came from the same files with the same sizes: that ingest may be a cache hit, which reads
    nothing. Sources that do not resolve are left alone: :func:`plan_ingest` reports them."""
    workers = cfg.workers or default_workers()
    if workers <= 1 or cfg.runner != "local":
        return False
    try:
        checked = check_sources(sources, fmt or cfg.format)
        if any(f != "stackexchange" for _, f, _ in checked) or _maybe_cached(workdir, checked):
            return False
        sites = resolve_sites([path for path, _, _ in checked])
        for site in sites:
            if not _site_reads_votes(site, cfg):
                site.votes = []
        if not all(_read_in_ranges(site, cfg) for site in sites):
            return False
        tasks = site_range_tasks(sites, cfg)
    except Exception:  # noqa: BLE001 - any problem is plan_ingest's to report
        return False
    ahead = []
    for task in tasks:
        cost = (task.end - task.start) // (4 if task.table == "Votes" else 1)
        if cost > budget:
            break
        budget -= cost
        ahead.append(task)
    workers = min(workers, len(tasks))  # as the read phase deals them (ranges.run_tasks)
    if workers <= 1 or not ahead:
        return False
    from .ranges import read_ahead as send_ahead

    send_ahead(ahead, workers)
    return True


def _maybe_cached(workdir: Path, checked: list[tuple[Path, str, list[Path]]]) -> bool:
    """Whether a finished ingest in ``workdir`` read the same files with the same sizes (its manifest's
    sources), so that this one may find its datasets (the cache key also hashes the contents)."""
    ours = sorted(([str(p) for p in files], sum(p.stat().st_size for p in files)) for _, _, files in checked)
    for manifest in (Path(workdir).resolve() / "data" / "ingest").glob("*/manifest.json"):
        try:
            theirs = sorted((s["files"], s["bytes"]) for s in json.loads(manifest.read_text())["sources"])
        except (OSError, ValueError, KeyError, TypeError):
            return True  # unreadable: it might be the one
        if theirs == ours:
            return True
    return False


def code_files() -> list[Path]:
    """The source files whose contents are part of every ingest's cache key: the ingest's and the data
    contracts' Python, and the C of its fast paths (HTML to text, Votes.xml and Posts.xml rows) with the headers
    they share."""
    return [f for folder in CODE_DIRS for f in sorted(p for ext in ("py", "c", "h") for p in folder.glob(f"*.{ext}"))]


def code_digest() -> str:
    h = hashlib.sha256()
    for f in code_files():
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def source_files(path: Path, fmt: str) -> tuple[str, list[Path]]:
    """The reader of a SOURCE (``fmt``, or detected when ``auto``) and the files it reads."""
    f = detect_format(path) if fmt == "auto" else reader(fmt).name
    return f, reader(f).files(path)


def check_ingest_config(cfg: IngestConfig) -> None:
    """The checks of ``cfg`` that need no input: the command runs them before it starts anything."""
    try:
        check_template(cfg.prompt_template)
    except ValueError as exc:
        raise IngestError(str(exc), field="ingest.prompt_template") from None


def check_sources(sources: list[str | Path], fmt: str) -> list[tuple[Path, str, list[Path]]]:
    """The checks of SOURCE paths that read no contents: each exists, has a reader (``fmt``, or one detected
    when ``auto``), and its files are non-empty regular files. Returns (path, format, files) per SOURCE.
    The command runs them before it starts anything, so a mistyped path is refused at once."""
    if not sources:
        raise IngestError("no SOURCE given")
    checked = []
    for raw in sources:
        path = Path(raw)
        if not path.exists():
            raise IngestError("no such file or folder", path=str(path))
        f, files = source_files(path, fmt)
        for file in files:
            if not file.is_file():
                raise IngestError("a folder (or a link to nothing), not a file" if not file.exists() or file.is_dir()
                                  else "not a regular file", path=str(file))
            if file.stat().st_size == 0:
                raise IngestError("empty file", path=str(file))
        checked.append((path, f, files))
    return checked


def plan_ingest(sources: list[str | Path], workdir: Path, cfg: IngestConfig, fmt: str | None = None) -> IngestPlan:
    check_ingest_config(cfg)
    planned: list[Source] = []
    stamps: dict[str, tuple[int, int, int, int]] = {}
    for path, f, files in check_sources(sources, fmt or cfg.format):
        digest = hashlib.sha256()
        for file in files:
            stamps[str(file)] = file_stamp(file)  # before its digest: a change from now on is seen after the read
            digest.update(file.name.encode() + b"\0" + sha256_file(file).encode())
        planned.append(Source(str(path), f, [str(p) for p in files], sum(p.stat().st_size for p in files),
                              digest.hexdigest()))
    se = [Path(s.path) for s in planned if s.format == "stackexchange"]
    sites = [site.name for site in resolve_sites(se)] if se else []  # fails early on a bad site folder or archive
    # Everything an output depends on: contents, and the names the rows carry (site names come from folder
    # and file names; every quarantined row and the report name its file as given).
    key_material = json.dumps(
        {"config": cfg.model_dump(mode="json", exclude=EXECUTION_ONLY),
         "inputs": [(s.format, s.sha256, s.files) for s in planned], "sites": sites, "code": code_digest()},
        sort_keys=True,
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    out_dir = Path(workdir).resolve() / "data" / "ingest" / key
    return IngestPlan(planned, key, str(out_dir), cfg.model_dump(mode="json"), stamps)


def check_unchanged(plan: IngestPlan) -> None:
    """Refuse datasets read from inputs that changed after they were hashed (a dump still being downloaded or
    appended to, a file replaced): they would be stored under a cache key, and tracked with digests, of other
    contents. Raises :class:`IngestError` naming the first such file."""
    for name, stamp in plan.stamps.items():
        try:
            now = file_stamp(Path(name))
        except OSError:
            now = None
        if now != tuple(stamp):
            what = "was removed" if now is None else "changed"
            raise IngestError(f"{what} while it was read (its size, modification time or inode is not what it was "
                              f"when hashed): ingest it again once it is complete", path=name)


# -- building ------------------------------------------------------------------------
def read_sources(plan: IngestPlan, store, cfg: IngestConfig, phases: Phases | None = None) -> dict[str, str]:
    """Stream every SOURCE into the staging store through its reader; return the score source per Stack Exchange site."""
    return read_all(plan.sources, store, cfg, phases or Phases())


def read_stackexchange(paths: list[Path], store, cfg: IngestConfig, phases: Phases) -> dict[str, str]:
    """Stack Exchange sources, grouped into sites, read on every core: plain files where they lie, archives'
    tables as they are decompressed; a table that cannot be cut streamed in order."""
    score_sources: dict[str, str] = {}
    sites: list[Site] = resolve_sites(paths)
    workers = cfg.workers or default_workers()
    parallel: list[Site] = []
    from .stackexchange import read_site

    for site in sites:
        use_votes = _site_reads_votes(site, cfg)
        if not use_votes:
            site.votes = []
        else:
            store.register_vote_file(site.name, site.votes[0].label)
        score_sources[site.name] = "votes" if use_votes else "score"
        if _read_in_ranges(site, cfg):
            parallel.append(site)  # plain files: read below, cut into ranges (in this process with one local worker)
        elif any(m.member is not None for m in (*site.votes, *site.posts)):
            read_archive_site(site, store, cfg, workers, phases)
        else:
            read_site(site, store, on_bad_row=cfg.on_bad_row, max_chars=cfg.max_text_chars,
                      max_row_bytes=cfg.max_row_bytes)
    if parallel:
        read_sites_in_ranges(parallel, store, cfg, workers, phases)
    return score_sources


# Free disk space an archive table's decompressed copy must leave on the work directory's filesystem
SPOOL_FREE_MARGIN = 1 << 30


def read_archive_site(site: Site, store, cfg: IngestConfig, workers: int, phases: Phases) -> None:
    """A site with tables in ``.7z`` archives (a dump as it is published): an archive's tables are decompressed in
    one pass on a thread, each into a temporary file beside the staging store (:class:`.stackexchange.ArchiveSpool`),
    and the workers read each in byte ranges, as a plain table, as soon as each range is written; the files are
    removed after. Rows, errors and lines are named after the archive's members, as when they are streamed.

    Decompressing is one thread's work (LZMA, ~80-100 MiB/s of output here), parsing is the workers', at the same
    time: a 302 MiB Posts.xml took 22.6-24.4 s streamed through libxml2 in this process, 15.8-16.3 s so
    (bench/REPORT.md).
    A table whose head cannot be cut (:func:`.ranges.cuttable_head`), or an archive whose copies would leave less
    than :data:`SPOOL_FREE_MARGIN` of the disk free, is streamed straight out of its archive, as before; plain
    tables of the site are read in ranges where they lie. The ranges run on the local workers, whatever
    ``ingest.runner``: the copies are on this machine's disk."""
    from .ranges import growing_range_tasks, range_tasks, rejoin_cuts, run_tasks
    from .stackexchange import ArchiveSpool, member_sizes, read_table

    spool_dir = Path(store.path).parent
    stream = dict(on_bad_row=cfg.on_bad_row, max_chars=cfg.max_text_chars, max_row_bytes=cfg.max_row_bytes)
    listings = {m.path: member_sizes(m.path) for m in (*site.votes, *site.posts) if m.member is not None}
    # An archive's tables in the order they lie in it (a dump's Posts.xml before its Votes.xml), so that the first
    # is read while the next is decompressed; otherwise Votes before Posts, as everywhere. The datasets do not
    # depend on the order (tests/test_ingest_stackexchange.py: the streamed path reads Votes first).
    def position(m) -> int:
        names = list(listings.get(m.path, ()))
        return names.index(m.member) if m.member in names else -1

    members = sorted((*site.votes, *site.posts), key=position)
    spools: dict[Path, Any] = {}  # ArchiveSpool by archive; None: its tables streamed (too little free disk)
    try:
        for member in members:
            if member.member is None:  # a plain table beside archived ones
                if not _cuttable(member.path, member.table, cfg):
                    read_table(site.name, member, store, **stream)
                    continue
                tasks = range_tasks(site.name, member.table, member.path, member.label,
                                    range_bytes=_range_bytes(cfg), **stream)
            else:
                if member.path not in spools:
                    tables = [m for m in members if m.path == member.path]
                    sizes = listings[member.path]
                    listed = all(m.member in sizes for m in tables)  # else streamed: its copies' size is unknown
                    room = shutil.disk_usage(spool_dir).free - sum(sizes.get(m.member, 0) for m in tables)
                    spools[member.path] = ArchiveSpool(tables, spool_dir) if listed and room >= SPOOL_FREE_MARGIN \
                        else None
                spool = spools[member.path]
                table = spool.table(member) if spool is not None else None
                if table is None or not table.head_is_cuttable():
                    read_table(site.name, member, store, **stream)
                    continue
                tasks = growing_range_tasks(table, site.name, member.table, member.label,
                                            range_bytes=_range_bytes(cfg), **stream)
            replay_ranges(rejoin_cuts(run_tasks(tasks, workers, ahead=False)), store, phases)
    finally:
        for spool in spools.values():
            if spool is not None:
                spool.close()
                phases.add("read: decompress archive tables (its thread's CPU)", spool.seconds)


def _site_reads_votes(site: Site, cfg: IngestConfig) -> bool:
    """Whether the site's Votes table is read (``ingest.score_source``); refuses a site it cannot score."""
    if len(site.votes) > 1:
        raise IngestError(f"site {site.name} has more than one Votes table", path=site.name)
    if cfg.score_source == "votes" and not site.votes:
        raise IngestError(f"ingest.score_source=votes but site {site.name} has no Votes.xml",
                          path=site.posts[0].label)
    return bool(site.votes) and cfg.score_source != "score"


def _read_in_ranges(site: Site, cfg: IngestConfig) -> bool:
    """The site's tables are read in byte ranges, on every core: they are plain files (not members of archives),
    each :func:`_cuttable`. A site with archives is :func:`read_archive_site`'s; any other is streamed into the
    store in this process: a large table read as one range would be held whole in memory before it is loaded (a
    302 MiB Posts.xml: 1.7 GiB)."""
    tables = (*site.votes, *site.posts)
    return all(m.member is None and _cuttable(m.path, m.table, cfg) for m in tables)


def _cuttable(path: Path, table: str, cfg: IngestConfig) -> bool:
    """A plain table can be read in ranges: no larger than a range, or with a head it can be cut after
    (:func:`.ranges.plain_head`)."""
    from .ranges import plain_head

    return path.stat().st_size <= _range_bytes(cfg) or plain_head(path, table.lower())


def _range_bytes(cfg: IngestConfig) -> int:
    """The size of the byte ranges a table is cut into (``ingest.range_mb``)."""
    return max(int(cfg.range_mb * (1 << 20)), 1)


def site_range_tasks(sites: list[Site], cfg: IngestConfig) -> list:
    """The range tasks of plain-file sites (their tables already chosen), in the order they are read."""
    from .ranges import range_tasks

    tasks = []
    for site in sites:
        for member in (*site.votes, *site.posts):
            tasks += range_tasks(site.name, member.table, member.path, member.label,
                                 range_bytes=_range_bytes(cfg), on_bad_row=cfg.on_bad_row,
                                 max_chars=cfg.max_text_chars, max_row_bytes=cfg.max_row_bytes,
                                 start_index=len(tasks))
    return tasks


def read_sites_in_ranges(sites: list[Site], store, cfg: IngestConfig, workers: int, phases: Phases) -> None:
    """Read plain-file sites on ``workers`` processes, replaying into ``store`` in the one-process order."""
    replay_ranges(range_results(site_range_tasks(sites, cfg), cfg, workers), store, phases)


def replay_ranges(results, store, phases: Phases) -> None:
    """Load range results (task, result), in task order, into the store; the workers' seconds into ``phases``."""
    from .ranges import Replayer

    replay = Replayer(store)
    for task, result in results:
        for name, seconds in result.seconds.items():
            phases.add(f"read: {name} (worker seconds)", seconds)
        with phases("read: load into the store"):
            replay.apply(task, result)


def range_results(tasks: list, cfg: IngestConfig, workers: int):
    """The one place that chooses how plain sites' range tasks run (an archive's run on the local workers:
    :func:`read_archive_site`): results in task order either way, ranges cut inside a comment read again joined
    (:func:`.ranges.rejoin_cuts`)."""
    from .ranges import rejoin_cuts, run_tasks

    if cfg.runner == "dask":
        from .distributed import run_tasks_on_dask

        return rejoin_cuts(run_tasks_on_dask(tasks, cfg.address, workers))
    return rejoin_cuts(run_tasks(tasks, workers))


def build_report(store, summary, score_sources: dict[str, str]) -> dict[str, Any]:
    """Account for every input row: kept, skipped or quarantined, per file; the counts must add up."""
    per_file: dict[str, Counter] = {}
    for (src, key), n in list(store.counts.items()) + list(summary.kept_by_file.items()):
        per_file.setdefault(src, Counter())[key] += n
    for src, counts in store.vote_accounting().items():
        per_file.setdefault(src, Counter()).update(counts)
    files: dict[str, Any] = {}
    balanced = True
    for src in sorted(per_file):
        counts = per_file[src]
        rows = counts.pop("rows", 0)
        accounted = sum(n for k, n in counts.items() if not k.startswith(DERIVED))
        ok = rows == accounted
        balanced &= ok
        files[src] = {"rows": rows, "accounted": accounted, "adds_up": ok,
                      **{k: counts[k] for k in sorted(counts) if counts[k]}}
    pairs = dict(sorted(summary.pair_stats.items()))
    return {
        "files": files,
        "adds_up": balanced,
        "pairs": pairs,
        "datasets": dict(summary.rows),
        "score_source": score_sources,
        "contracts": summary.contract_stats,
    }


def check_votes_against_scores(store, score_sources: dict[str, str], cfg: IngestConfig) -> list[str]:
    """Use a site's Votes.xml only if it is the site's own: its up minus down votes must match ``Score``
    on most posts (they match on every post of a real dump). Otherwise ``score_source=votes`` is an
    error, and ``auto`` falls back to ``Score`` with a warning; ``score_sources`` is updated in place."""
    warnings = []
    for site, how in list(score_sources.items()):
        if how != "votes":
            continue
        posts, agree = store.vote_score_agreement(site)
        if posts and agree * 2 < posts:
            what = (f"site {site}: Votes.xml disagrees with Score on {posts - agree} of {posts} posts "
                    "(up minus down votes should equal Score); it is probably another site's")
            if cfg.score_source == "votes":
                raise IngestError(what + "; ingest.score_source=votes refuses it", path=site)
            score_sources[site] = "score"
            warnings.append(what + "; scores come from Score instead")
    return warnings


def ingest_warnings(plan: IngestPlan, report: dict[str, Any]) -> list[str]:
    """What a user must hear about: sources that gave nothing, comments whose submissions were not given."""
    import re

    given = {Path(f).name for s in plan.sources for f in s.files}
    warnings: list[str] = []
    for src in plan.sources:
        for f in src.files:
            if f not in report["files"]:  # not a file of rows (a dataset's metadata)
                continue
            counts = report["files"][f]
            if src.format == "reddit":
                orphans = counts.get("quarantined:orphan_answer", 0)
                month = re.match(r"RC_(\d{4}-\d{2})", Path(f).name)
                wanted = f"RS_{month.group(1)}" if month else "its RS_ submissions file"
                if orphans and not any(n.startswith(wanted) for n in given):
                    if plan.config.get("reddit_reply_pairs"):
                        paired = counts.get("kept:reply", 0)
                        unpaired = sum(n for k, n in counts.items() if k.startswith("skipped:reply_"))
                        warnings.append(
                            f"{f}: {orphans} top-level comment(s) quarantined as orphans: their submissions are not "
                            f"in the input (pass {wanted} too); of the replies, {paired} are in reply pairs and "
                            f"{unpaired} in none (ingest.reddit_reply_pairs)"
                        )
                    else:
                        replies = counts.get("skipped:reply", 0)
                        warnings.append(
                            f"{f}: {orphans} top-level comment(s) quarantined as orphans and {replies} repl(ies) "
                            f"skipped: their submissions are not in the input; pass {wanted} too, or set "
                            "ingest.reddit_reply_pairs=true to pair replies under their parent comments"
                        )
            kept = sum(n for k, n in counts.items() if k.startswith("kept:"))
            if not kept:
                why = ", ".join(f"{k}={n}" for k, n in counts.items() if k not in ("rows", "accounted", "adds_up"))
                warnings.append(f"{f}: nothing kept from {counts.get('rows', 0)} row(s)" + (f" ({why})" if why else ""))
    if not report["datasets"].get("pairs"):
        warnings.append("no preference pairs were produced from these sources")
    return warnings


def execute_ingest(plan: IngestPlan, cfg: IngestConfig, *, mark: bool = True) -> IngestResult:
    """Build the datasets of a plan (or find them already built: a cache hit).

    ``mark=False`` leaves ``LATEST`` alone: the caller moves it with :func:`mark_latest`
    once everything else it does with the datasets (tracking) succeeded.
    """
    started = time.perf_counter()
    out_dir = Path(plan.out_dir)
    input_bytes = sum(s.bytes for s in plan.sources)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        from .ranges import drop_read_ahead

        drop_read_ahead()  # nothing to read
        manifest = json.loads(manifest_path.read_text())
        if mark:
            mark_latest(out_dir)
        return IngestResult(str(out_dir), True, manifest["datasets"], manifest["report"],
                            time.perf_counter() - started, input_bytes, manifest.get("docs", {}))

    from .build import FAST_ARROW_ALLOCATOR, arrow_allocator, frozen_heap

    # Without Pushshift input, whose months peak higher on it, the build's Arrow buffers come from the faster
    # allocator, in this process and in the contract process (.build.FAST_ARROW_ALLOCATOR)
    allocator = None if plan.pushshift else FAST_ARROW_ALLOCATOR
    # the libraries' objects stay out of the collector's passes over the build's garbage
    with frozen_heap(), arrow_allocator(allocator):
        datasets, report, docs = _build_datasets(plan, cfg, out_dir, started, input_bytes, allocator)
    if mark:
        mark_latest(out_dir)
    return IngestResult(str(out_dir), False, datasets, report, time.perf_counter() - started, input_bytes, docs)


def _build_datasets(plan: IngestPlan, cfg: IngestConfig, out_dir: Path, started: float, input_bytes: int,
                    allocator: str | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Read, build, validate and write the datasets into a temporary folder, then rename it to ``out_dir``.
    ``allocator``: the contract process's Arrow pool (``.build.use_arrow_allocator``)."""
    from alignflow.data_contracts import validate

    from .build import Builder, write_json, write_quarantine
    from .reddit import shp_pairs
    from .store import StagingStore

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(out_dir.parent)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    store = StagingStore(tmp / "staging.sqlite", batch=min(cfg.batch_rows, 5000))
    phases = Phases()
    contracts = None
    replies = None
    walker = None  # the reply walk on its own process (.reply_walker), with several workers
    workers = cfg.workers or default_workers()
    try:
        if workers > 1:
            # contracts on a second process, one batch behind the walk; on small inputs it loads its libraries
            # while we read, on large ones it starts with the build (memory: see EARLY_START_MAX_BYTES)
            from .contract_service import ContractService, start_early

            if start_early([f for source in plan.sources for f in source.files]):
                contracts = ContractService(arrow_allocator=allocator)
        with phases("read (wall)"):
            score_sources = read_sources(plan, store, cfg, phases)
        check_unchanged(plan)  # what was read is what the cache key and the tracked digests say
        if workers > 1 and contracts is None:
            contracts = ContractService(arrow_allocator=allocator)
        replies_path = tmp / "reddit_replies.sqlite"
        if cfg.reddit_reply_pairs and replies_path.exists() and workers > 1:
            from .reply_walker import ReplyWalker

            # the reply store's indexes and walk on a second process, beside the index phase and the walk below
            walker = ReplyWalker(replies_path, cfg, tmp / "reply_pairs.spool")
        elif cfg.reddit_reply_pairs and replies_path.exists():
            from .reddit_replies import ReplyStore, write_reply_pairs

            replies = ReplyStore(replies_path, create=False)
            replies.index_in_background()  # its indexes are built while the submissions are walked
        with phases("index and duplicates"):
            store.finish_loading()
        score_warnings = check_votes_against_scores(store, score_sources, cfg)
        with phases("build (wall)"):
            builder = Builder(store, tmp, cfg, validate=phases.timed("build: contracts", validate),
                              shp_pairs=shp_pairs, contracts=contracts, pushshift=plan.pushshift)
            builder.sites_with_votes = {s for s in builder.sites_with_votes if score_sources.get(s) == "votes"}
            if replies is not None:
                builder.extra_steps.append(lambda b: write_reply_pairs(replies, b, cfg))
            if walker is not None:
                builder.extra_steps.append(walker.replay)
                if contracts is not None:
                    # The reply walk is the build's longest path (~23 CPU-s at 1 GiB against ~20 for the builder and
                    # the contract process together): the contract process yields it the cores. It still checks
                    # each batch once the builder waits for the verdict (one batch behind), so builder and contracts
                    # share one core and the walk has the other (bench/REPORT.md, "The Reddit reply walk ...").
                    lower_priority(contracts.proc.pid, CONTRACTS_NICE_BESIDE_WALK)
            summary = builder.run()
            if contracts is not None:
                contracts.close()
                phases.add("build: waiting for contracts (second process)", contracts.wait_seconds)
                phases.add("build: contracts CPU (second process)", contracts.cpu_seconds)
                contracts = None
            if walker is not None:
                phases.add("build: Reddit reply walk CPU (its own process, indexes included)", walker.cpu_seconds)
                phases.add("build: waiting for the Reddit reply walk", walker.wait_seconds)
                phases.add("build: the Reddit reply walk's indexes (wall, before its walk)", walker.index_seconds)
        with phases("quarantine"):
            summary.rows["quarantine"] = write_quarantine(store, tmp / "quarantine.parquet", cfg.batch_rows)
        report = build_report(store, summary, score_sources)
        report["warnings"] = score_warnings + ingest_warnings(plan, report)
        store.remove()
        if replies is not None:
            replies.db.close()
        if walker is not None:
            walker.close()
        replies_path.unlink(missing_ok=True)
        if not report["adds_up"]:
            bad = {f: v for f, v in report["files"].items() if not v["adds_up"]}
            raise RuntimeError(f"ingest accounting does not add up (a bug, please report it): {bad}")
        datasets = {}
        with phases("digests"):
            for kind in (*schema.SCHEMAS,):
                path = tmp / f"{kind}.parquet"
                datasets[kind] = {"path": str(out_dir / path.name), "rows": summary.rows.get(kind, 0),
                                  "digest": sha256_file(path)}
        phases.add("total", time.perf_counter() - started)
        write_json(tmp / "profile.json", {"seconds": phases.table(), "parent_cpu_seconds": phases.cpu_table(),
                                          "input_bytes": input_bytes,
                                          "workers": workers})
        docs = {k: v.replace(str(tmp), str(out_dir)) for k, v in summary.docs.items()}
        write_json(tmp / "ingest_report.json", report)
        write_json(tmp / "manifest.json",
                   {"key": plan.key, "sources": [asdict(s) for s in plan.sources], "config": plan.config,
                    "datasets": datasets, "report": report, "docs": docs})
        if out_dir.exists():  # an identical run finished first: its files are the same
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        if contracts is not None:
            contracts.close(kill=True)
        if walker is not None:
            walker.close()
        try:
            store.close()
            if replies is not None:
                replies.db.close()
        except Exception:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return datasets, report, docs


# the contract process's nice value while the Reddit reply walk runs beside the build (weight 110 against 1024)
CONTRACTS_NICE_BESIDE_WALK = 10

_TEMPORARY = re.compile(r"\..+\.tmp-(\d+)")


def remove_dead_temporaries(folder: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` build folders and files whose process is gone (a killed ingest's);
    those of running processes stay. Returns what was deleted."""
    removed = []
    for path in folder.iterdir():
        m = _TEMPORARY.fullmatch(path.name)
        if m is None or process_alive(int(m.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def mark_latest(out_dir: Path) -> None:
    """Point ``data/ingest/LATEST`` at these datasets (what later stages read by default)."""
    latest_tmp = out_dir.parent / f".LATEST.tmp-{os.getpid()}"
    latest_tmp.write_text(out_dir.name + "\n")
    os.replace(latest_tmp, out_dir.parent / "LATEST")


def latest_datasets(workdir: Path) -> Path:
    """The folder of the most recent successful ingest in a work directory."""
    base = Path(workdir).resolve() / "data" / "ingest"
    marker = base / "LATEST"
    if not marker.is_file():
        raise FileNotFoundError(f"no ingested datasets in {base}; run `alignflow ingest` first")
    return base / marker.read_text().strip()
