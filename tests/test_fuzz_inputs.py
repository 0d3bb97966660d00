"""Property-based fuzzing of the input readers and the config loader.

Every reader either reads a file or refuses it with the error it documents
(``IngestError``, ``ConfigError``): never another exception, never an entity
expanded, rows always accounted for. ``make test`` runs a bounded number of
cases; ``make fuzz`` (``HYPOTHESIS_PROFILE=nightly``) runs many more. Inputs that
once broke a reader live in ``tests/fuzz_corpus/`` and are replayed every run.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from alignflow.config import ConfigError, load_config
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.paired import read_pairs_file
from alignflow.tasks.ingest.records import ListSink
from alignflow.tasks.ingest.reddit import read_reddit
from alignflow.tasks.ingest.xmlstream import RowParser

settings.register_profile("default", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

CORPUS = Path(__file__).parent / "fuzz_corpus"
GOOD = (b'<?xml version="1.0" encoding="utf-8"?>\n<posts>\n'
        b'  <row Id="1" PostTypeId="1" Score="2" Title="T &amp; t" Body="&lt;p&gt;q&lt;/p&gt;" />\n'
        b'  <row Id="2" PostTypeId="2" ParentId="1" Score="1" Body="a" />\n</posts>\n')
MARKUP = [b"<", b">", b"/>", b"<!--", b"-->", b"<?x ", b"?>", b"<!DOCTYPE posts [", b"]>", b'<!ENTITY e "EXPANDED">',
          b"&e;", b"&amp;", b"&#0;", b"&#x110000;", b'"', b"'", b"\xef\xbb\xbf", b"\xff\xfe", b"\x00", b"\n", b"\r",
          b"<row ", b'Id="1" ', b"</posts>", b"<posts>", b"<![CDATA[", b"]]>", b"\xc3", b"\xe2\x82"]


def xml_mutation() -> st.SearchStrategy[bytes]:
    """A valid table with markup fragments inserted, bytes deleted or the file cut."""
    pieces = st.lists(st.tuples(st.integers(0, len(GOOD)), st.sampled_from(MARKUP) | st.binary(max_size=8)),
                      max_size=6)

    def build(edits, cut):
        data = GOOD
        for pos, piece in sorted(edits, reverse=True):
            data = data[:pos] + piece + data[pos:]
        return data[:cut] if cut is not None else data

    return st.builds(build, pieces, st.none() | st.integers(0, len(GOOD) + 40))


def parse(data: bytes, chunk: int, max_row_bytes: int = 1 << 20) -> tuple[list[dict], list[int]]:
    rows, big = [], []
    parser = RowParser("Posts.xml", lambda a, line: rows.append(dict(a)), root="posts", max_row_bytes=max_row_bytes,
                       on_oversize=lambda line, head: big.append(line))
    for i in range(0, len(data), chunk):
        parser.feed(data[i:i + chunk])
    parser.close()
    return rows, big


@given(data=xml_mutation() | st.binary(max_size=400), chunk=st.integers(1, 64))
@example(data=b"<!--a--><!DOCTYPE posts [<!ENTITY e 'EXPANDED'>]><posts><row a='&e;'/></posts>", chunk=5)
def test_xml_reader_reads_or_refuses(data, chunk):
    try:
        rows, _ = parse(data, chunk)
    except IngestError as exc:
        assert "\n" not in str(exc) and "EXPANDED" not in str(exc)
        return
    assert b"<!DOCTYPE" not in data.upper() or b"<!--" in data  # a DTD outside a comment is never accepted
    assert not any("EXPANDED" in v for row in rows for v in row.values())
    whole, _ = parse(data, len(data) or 1)
    assert rows == whole  # chunking changes nothing


@given(data=xml_mutation(), on_bad_row=st.sampled_from(["quarantine", "error"]))
def test_the_c_readers_read_a_table_as_libxml2_does_or_leave_it(tmp_path_factory, data, on_bad_row):
    """tasks/ingest/_fastposts.c and _fastvotes.c on mutated tables: what they take, they read as libxml2 and
    the row reader do (store rows, quarantined rows, counts); the rest they leave to them. Never an error."""
    from unittest import mock

    from alignflow.tasks.ingest import ranges
    from test_fast_posts import _calls  # the posts a range hands the parent, its other calls and its counts
    from test_fast_posts import _votes  # its vote counts, from a dict or its SQLite image

    if ranges._fastposts is None or ranges._count_votes is None:
        pytest.skip("installed without a C compiler: the C readers are not built")
    for table in ("Posts", "Votes"):
        path = tmp_path_factory.mktemp("c") / f"{table}.xml"
        path.write_bytes(data.replace(b"posts>", table.lower().encode() + b">"))
        task = ranges.RangeTask(0, table, "s", str(path), f"{table}.xml", 0, path.stat().st_size, True, True,
                                on_bad_row, 50, 1 << 20)
        fast = ranges.scan_posts(task) if table == "Posts" else ranges.scan_votes(task)
        if fast is None:
            continue
        with mock.patch.object(ranges, "scan_posts", return_value=None), \
                mock.patch.object(ranges, "scan_votes", return_value=None):
            slow = ranges.read_range(task)
        assert slow.error is None and fast.error is None
        assert _calls(fast) == _calls(slow) and _votes(fast) == _votes(slow) and fast.newlines == slow.newlines
    with mock.patch.object(ranges, "_count_votes", None):
        by_regex = ranges.tally_votes(data, "s", {})
    assert ranges.tally_votes(data, "s", {}) == by_regex


@given(data=xml_mutation(), cap=st.integers(1024, 4096), chunk=st.sampled_from([1, 3, 97, 4096]))
def test_xml_row_cap_never_changes_short_rows(data, cap, chunk):
    try:
        rows, big = parse(data, chunk, max_row_bytes=cap)
    except IngestError:
        return
    assert not big  # every row of these documents is short
    assert rows == parse(data, len(data) or 1, max_row_bytes=1 << 20)[0]


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
pair_line = st.fixed_dictionaries(
    {"prompt": json_value | st.text(max_size=30), "chosen": json_value | st.text(max_size=30),
     "rejected": json_value | st.text(max_size=30)},
    optional={"chosen_score": json_value, "rejected_score": json_value, "question_id": json_value,
              "site": json_value, "license": json_value},
).map(lambda d: json.dumps(d, allow_nan=True))
raw_line = st.text(max_size=60) | st.sampled_from(['{"chosen": "\\ud800", "rejected": "x"}', "Infinity", "[]",
                                                    '{"prompt": 1e999}', "\ufeff{}", '{"a": "\\u0000"}'])


def _lines_file(tmp_path: Path, name: str, lines: list[str], compress: bool) -> Path:
    data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    path = tmp_path / (name + (".zst" if compress else ""))
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)
    return path


@given(lines=st.lists(pair_line | raw_line, min_size=1, max_size=8), compress=st.booleans())
def test_pairs_reader_accounts_for_every_line(tmp_path_factory, lines, compress):
    path = _lines_file(tmp_path_factory.mktemp("pairs"), "pairs.jsonl", lines, compress)
    sink = ListSink()
    try:
        read_pairs_file(path, sink, on_bad_row="quarantine", max_line_bytes=256)
    except IngestError:
        return
    assert sink.counts[(str(path), "rows")] == len(sink.pairs) + len(sink.quarantined)
    for pair in sink.pairs:
        (pair.prompt + pair.chosen + pair.rejected).encode("utf-8")  # text, no lone surrogates


comment = st.fixed_dictionaries(
    {"id": json_value, "parent_id": st.sampled_from(["t3_p", "t1_x"]) | json_value, "link_id": st.just("t3_p"),
     "subreddit": json_value | st.just("s"), "score": json_value, "created_utc": json_value, "body": json_value},
    optional={"author": json_value, "distinguished": json_value},
).map(json.dumps)


@given(lines=st.lists(comment | raw_line, min_size=1, max_size=8), compress=st.booleans())
def test_reddit_reader_reads_or_refuses(tmp_path_factory, lines, compress):
    path = _lines_file(tmp_path_factory.mktemp("rc"), "RC_2015-01.jsonl", lines, compress)
    sink = ListSink()
    try:
        read_reddit(path, sink, on_bad_row="quarantine", max_line_bytes=256)
    except IngestError:
        return
    for post in sink.posts:
        assert -(2**63) <= post.score < 2**63


@given(data=st.binary(max_size=300), cut=st.integers(0, 400))
def test_zstd_reader_reads_or_refuses(tmp_path_factory, data, cut):
    good = zstandard.ZstdCompressor().compress(b'{"id": "a", "parent_id": "t3_p", "body": "x"}\n' * 3)
    for blob in (data, good[:cut], good[:cut] + data):
        path = tmp_path_factory.mktemp("zst") / "RC_2015-01.zst"
        path.write_bytes(blob)
        try:
            read_reddit(path, ListSink(), on_bad_row="quarantine")
        except IngestError:
            pass


def _small_archive() -> bytes:
    import py7zr

    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w") as z:
        z.writestr(GOOD, "Posts.xml")
    return buf.getvalue()


@given(edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4), cut=st.integers(0, 500))
def test_7z_reader_reads_or_refuses(tmp_path_factory, edits, cut):
    from alignflow.tasks.ingest.stackexchange import read_site, resolve_sites

    data = bytearray(_ARCHIVE)
    for pos, byte in edits:
        if pos < len(data):
            data[pos] = byte
    path = tmp_path_factory.mktemp("7z") / "s.stackexchange.com.7z"
    path.write_bytes(bytes(data[:cut]) if cut < len(data) else bytes(data))
    try:
        (site,) = resolve_sites([path])
        read_site(site, ListSink(), on_bad_row="quarantine")
    except IngestError:
        pass


_ARCHIVE = _small_archive()

config_text = st.text(max_size=200) | st.sampled_from([
    "ingest: {max_pairs_per_question: -1}", "ingest: !!python/object:os.system {}", "&a [*a]",
    "a: &x [&y [*x]]", "ingest:\n  prompt_template: '{title'", "pm: 3", "[1, 2]", "\x00", "ingest: {format: x}",
])
override = st.text(max_size=40) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["ingest.max_pairs_per_question", "pm.site", "ingest", "x.y", "ingest.split.train", ""]), st.text(max_size=20))


@given(text=config_text, overrides=st.lists(override, max_size=3))
def test_config_loader_loads_or_refuses(tmp_path_factory, text, overrides):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path, overrides)
    except ConfigError as exc:
        assert str(exc)


@pytest.mark.parametrize("case", sorted(p.name for p in CORPUS.iterdir()))
def test_crash_corpus(tmp_path, case):
    """Inputs that once made a reader fail with something else than its documented error, or expand an entity."""
    src = CORPUS / case
    kind = case.split("-", 1)[0]
    if kind == "xml":
        from alignflow.tasks.ingest.stackexchange import read_site, resolve_sites

        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "Posts.xml").write_bytes(src.read_bytes())
        sink = ListSink()
        try:
            (site,) = resolve_sites([tmp_path / "site"])
            read_site(site, sink, on_bad_row="quarantine")
        except IngestError as exc:
            assert "EXPANDED" not in str(exc)
        assert not any("EXPANDED" in p.title + p.body for p in sink.posts)
    elif kind in ("pairs", "reddit"):
        dst = tmp_path / ("pairs.jsonl" if kind == "pairs" else "RC_2015-01.jsonl")
        dst.write_bytes(src.read_bytes())
        reader = read_pairs_file if kind == "pairs" else read_reddit
        try:
            reader(dst, ListSink(), on_bad_row="quarantine")
        except IngestError:
            pass
    elif kind == "config":
        try:
            load_config(src)
        except ConfigError:
            pass
    else:
        pytest.fail(f"unknown corpus kind {kind!r} in {case}")
