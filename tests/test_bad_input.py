"""Each kind of bad dump input: a clear error naming the file and position, and no output left behind."""

from __future__ import annotations

from pathlib import Path

import py7zr
import pytest

from alignflow.config import IngestConfig
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
from alignflow.tasks.ingest.xmlstream import RowParser, parse_file

HEAD = b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n'
GOOD_ROWS = (
    b'<posts>\r\n'
    b'  <row Id="1" PostTypeId="1" Score="2" Title="T" Body="&lt;p&gt;q&lt;/p&gt;" />\r\n'
    b'  <row Id="2" PostTypeId="2" ParentId="1" Score="2" Body="&lt;p&gt;a&lt;/p&gt;" />\r\n'
    b'  <row Id="3" PostTypeId="2" ParentId="1" Score="0" Body="&lt;p&gt;b&lt;/p&gt;" />\r\n'
    b'</posts>\r\n'
)

CASES = {
    "truncated": (HEAD + GOOD_ROWS[:150], r"line \d+: truncated or malformed XML"),
    "malformed_row": (HEAD + GOOD_ROWS.replace(b'Id="2" PostTypeId', b'Id="2 PostTypeId'), r"line 4: .*malformed XML"),
    "not_utf8": (HEAD + GOOD_ROWS.replace(b"&lt;p&gt;a", b"\xff\xfea"), r"line 4: bytes that are not valid UTF-8"),
    "billion_laughs": (
        b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n <!ENTITY lol2 "&lol;&lol;&lol;&lol;">\n'
        b' <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;">\n]>\n<posts><row Id="1" PostTypeId="1" Title="&lol3;" Score="1"/></posts>',
        r"line 7: document type declaration \(DTD\) before this root element refused",
    ),
    "xxe": (
        b'<?xml version="1.0"?>\n<!DOCTYPE posts [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
        b'<posts><row Id="1" PostTypeId="1" Title="&xxe;" Score="1"/></posts>',
        r"DTD\) before this root element refused",
    ),
    "empty": (b"", r"empty file"),
    "only_bom": (b"\xef\xbb\xbf\r\n", r"empty file"),
    "wrong_table": (HEAD + b"<votes>\r\n  <row Id=\"1\" PostId=\"1\" VoteTypeId=\"2\" />\r\n</votes>\r\n",
                    r"root element is <votes>, expected <posts>"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_posts_xml(tmp_path, case):
    data, pattern = CASES[case]
    site = tmp_path / "site"
    site.mkdir()
    (site / "Posts.xml").write_bytes(data)
    work = tmp_path / "work"
    with pytest.raises(IngestError, match=pattern) as err:
        cfg = IngestConfig()
        execute_ingest(plan_ingest([site], work, cfg), cfg)
    assert "Posts.xml" in str(err.value)
    # Nothing half-written: no dataset folder, no temporary folder, no LATEST marker.
    ingest_dir = work / "data" / "ingest"
    assert not ingest_dir.exists() or list(ingest_dir.iterdir()) == []


def test_entities_are_never_expanded_even_inline(tmp_path):
    # An entity reference without a DTD is a well-formedness error, not an expansion.
    f = tmp_path / "Posts.xml"
    f.write_bytes(b'<posts>\n<row Id="&foo;" PostTypeId="1"/>\n</posts>')
    with pytest.raises(IngestError, match="Posts.xml"):
        parse_file(f, lambda a, line: None, root="posts")


def test_push_parser_handles_any_chunking(tmp_path):
    rows: list[tuple[str, int]] = []
    parser = RowParser("mem", lambda a, line: rows.append((a["Id"], line)), root="posts")
    data = HEAD + GOOD_ROWS
    for i in range(0, len(data), 7):  # 7-byte chunks split the BOM, tags and attributes
        parser.feed(data[i:i + 7])
    parser.close()
    assert rows == [("1", 3), ("2", 4), ("3", 5)]


def test_folder_without_posts_xml(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "Comments.xml").write_text("<comments/>")
    with pytest.raises(IngestError, match=r"site: folder has no Posts.xml"):
        plan_ingest([tmp_path / "site"], tmp_path / "work", IngestConfig())


def test_missing_source(tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        plan_ingest([tmp_path / "nope"], tmp_path / "work", IngestConfig())


def test_7z_member_escaping_the_folder_is_refused(tmp_path):
    src = tmp_path / "Posts.xml"
    src.write_bytes(HEAD + GOOD_ROWS)
    archive = tmp_path / "evil.stackexchange.com.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        z.write(src, arcname="Posts.xml")
        z.write(src, arcname="../../escape.xml")
    with pytest.raises(IngestError, match=r"evil.stackexchange.com.7z: archive member path '../../escape.xml' escapes"):
        plan_ingest([archive], tmp_path / "work", IngestConfig())
    assert not (tmp_path.parent / "escape.xml").exists()


def test_truncated_7z_is_an_error(tmp_path):
    src = tmp_path / "Posts.xml"
    src.write_bytes(HEAD + GOOD_ROWS * 1)
    archive = tmp_path / "cut.stackexchange.com.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        z.write(src, arcname="Posts.xml")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(IngestError, match="cut.stackexchange.com.7z"):
        cfg = IngestConfig()
        execute_ingest(plan_ingest([archive], tmp_path / "work", cfg), cfg)


def test_7z_without_posts(tmp_path):
    src = tmp_path / "Comments.xml"
    src.write_text("<comments/>")
    archive = tmp_path / "x.stackexchange.com.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        z.write(src, arcname="Comments.xml")
    with pytest.raises(IngestError, match="no Posts.xml"):
        plan_ingest([archive], tmp_path / "work", IngestConfig())
