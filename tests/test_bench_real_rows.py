"""bench/ingest/real_rows.py: the fixtures' real rows repeated with their ids shifted apart, for a large site of real
rows (the issue's independent 300 MB check is made on such a file)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from lxml import etree

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("bench_real_rows", REPO / "bench" / "ingest" / "real_rows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    return [dict(e.attrib) for _, e in etree.iterparse(str(path), tag="row")]


def test_copies_are_the_fixtures_rows_with_distinct_ids(tmp_path):
    rr = _module()
    site = rr.write_site(tmp_path, reps=2)
    posts, votes = _rows(site / "Posts.xml"), _rows(site / "Votes.xml")
    per_copy = sum(len(_rows(rr.FIXTURES / s / "Posts.xml")) for s in rr.SITES)
    assert per_copy == 177 + 624 and len(posts) == 2 * per_copy
    assert len(votes) == 2 * 1119
    ids = [int(r["Id"]) for r in posts]
    assert len(set(ids)) == len(ids)
    # the second copy is the first with every id 2 * SHIFT higher, and nothing else changed
    first, second = posts[:per_copy], posts[per_copy:]
    for a, b in zip(first, second):
        for key in a:
            if key in ("Id", "ParentId", "AcceptedAnswerId"):
                assert int(b[key]) == int(a[key]) + 2 * rr.SHIFT
            else:
                assert a[key] == b[key]
    # an answer points at its own copy's question
    by_id = {int(r["Id"]) for r in posts}
    parents = [int(r["ParentId"]) for r in posts if r.get("PostTypeId") == "2"]
    assert parents and sum(p in by_id for p in parents) == len(parents)
    # each dump's own line endings kept: conlang's 177 rows end in CRLF (2 copies), datascience's in LF; 3 lines ours
    assert (site / "Posts.xml").read_bytes().count(b"\r\n") == 2 * 177 + 3
    assert not list(site.glob(".*tmp*"))


def test_the_default_is_a_posts_file_of_about_300_mb():
    rr = _module()
    one_copy = sum(len(line) for s in rr.SITES for line in rr.rows(rr.FIXTURES / s / "Posts.xml"))
    default = int(re.search(r'"--reps", type=int, default=(\d+)', (REPO / "bench/ingest/real_rows.py").read_text())[1])
    assert 300e6 <= one_copy * default <= 320e6  # ids grow by a few digits per row: the file is a little larger


def test_one_line_is_the_same_rows_with_no_line_end_between_them(tmp_path):
    """``--one-line``: the table as an XML library writes it, every row on the line after the declaration; an XML
    parser reads the same rows as from the dump's layout."""
    rr = _module()
    dump = rr.write_site(tmp_path / "dump", reps=2)
    one = rr.write_site(tmp_path / "one", reps=2, one_line=True)
    for name in ("Posts.xml", "Votes.xml"):
        data = (one / name).read_bytes()
        assert data.startswith(b"<?xml version='1.0' encoding='UTF-8'?>\n<") and data.count(b"\n") == 1
        assert _rows(one / name) == _rows(dump / name)


def test_the_archive_holds_the_tables_as_written(tmp_path):
    import py7zr

    rr = _module()
    site = rr.write_site(tmp_path, reps=1)
    archive = rr.write_archive(site)
    assert archive == tmp_path / "real.stackexchange.com.7z"
    with py7zr.SevenZipFile(archive) as z:
        assert sorted(z.getnames()) == ["Posts.xml", "Votes.xml"]
        z.extractall(path=tmp_path / "out")
    for name in ("Posts.xml", "Votes.xml"):
        assert (tmp_path / "out" / name).read_bytes() == (site / name).read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))
