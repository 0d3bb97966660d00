"""Hostile dump XML: DTDs wherever they hide, other encodings, rows too long to read."""

from __future__ import annotations

import pytest

from alignflow.config import IngestConfig
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
from alignflow.tasks.ingest.xmlstream import RowParser

ENTITY = b'<!DOCTYPE posts [<!ENTITY x "EXPANDED">]>'
ROWS = (b'<posts>\n  <row Id="1" PostTypeId="1" Score="2" Title="&x;" Body="q" />\n'
        b'  <row Id="2" PostTypeId="2" ParentId="1" Score="2" Body="&x;" />\n</posts>\n')

DTD_CASES = {
    "after_comment": b'<?xml version="1.0"?>\n<!-- <a> looks like a root -->\n' + ENTITY + b"\n" + ROWS,
    "after_pi": b'<?xml version="1.0"?>\n<?style <b> ?>\n' + ENTITY + b"\n" + ROWS,
    "after_bom_and_blank_lines": b"\xef\xbb\xbf\n\n\n" + ENTITY + b"\n" + ROWS,
    "lowercase_in_comment_first": b"<!-- <!doctype --><!-- <row> -->" + ENTITY + ROWS,
    "no_entities": b'<!DOCTYPE posts>\n<posts><row Id="1" PostTypeId="1" Score="1" Title="t" Body="b"/></posts>',
    "external_subset": b'<!DOCTYPE posts SYSTEM "file:///etc/passwd">\n<posts><row Id="1" PostTypeId="1"/></posts>',
    "parameter_entity": b'<!DOCTYPE posts [<!ENTITY % p "x"> %p;]>\n' + ROWS.replace(b"&x;", b"t"),
    "rows_in_one_chunk_after_long_comment": b"<!--" + b"<c>" * 5000 + b"-->" + ENTITY + ROWS,
}


@pytest.mark.parametrize("case", sorted(DTD_CASES))
@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_dtd_refused_whatever_precedes_it(case, chunk):
    rows = []
    parser = RowParser("Posts.xml", lambda a, line: rows.append(dict(a)), root="posts")
    data = DTD_CASES[case]
    with pytest.raises(IngestError, match=r"DTD\) .*refused") as err:
        for i in range(0, len(data), chunk):
            parser.feed(data[i:i + chunk])
        parser.close()
    assert rows == []  # no row (and so no expanded entity) ever reached the caller
    assert "EXPANDED" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_refused_with_a_clear_message(tmp_path, codec):
    doc = ('<?xml version="1.0" encoding="UTF-16"?>\n<!DOCTYPE posts [<!ENTITY x "EXPANDED">]>\n'
           '<posts><row Id="1" PostTypeId="1" Score="1" Title="&x;"/></posts>').encode(codec)
    site = tmp_path / "site"
    site.mkdir()
    (site / "Posts.xml").write_bytes(doc)
    cfg = IngestConfig()
    with pytest.raises(IngestError, match=r"Posts.xml, line 1: UTF-16 or UTF-32 text: dump tables are UTF-8"):
        execute_ingest(plan_ingest([site], tmp_path / "work", cfg), cfg)


def test_other_declared_encodings_are_read_as_utf8():
    rows = []
    parser = RowParser("Posts.xml", lambda a, line: rows.append(a["Title"]), root="posts")
    parser.feed('<?xml version="1.0" encoding="ISO-8859-1"?>\n<posts><row Title="café"/></posts>'.encode())
    parser.close()
    assert rows == ["café"]


def test_character_references_and_builtin_entities_still_work():
    rows = []
    parser = RowParser("Posts.xml", lambda a, line: rows.append(a["Body"]), root="posts")
    parser.feed(b'<posts><row Body="&lt;p&gt;&#233;&amp;&quot;" /></posts>')
    parser.close()
    assert rows == ['<p>é&"']


def _rows_doc(sizes: list[int]) -> bytes:
    out = [b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n<posts>\r\n']
    for i, n in enumerate(sizes, 1):
        out.append(b'  <row Id="%d" Body="%s" />\r\n' % (i, b"x" * n))
    out.append(b"</posts>\r\n")
    return b"".join(out)


@pytest.mark.parametrize("chunk", [1, 7, 500, 4096, 1 << 20])
def test_oversized_rows_are_cut_out_with_their_line(chunk):
    data = _rows_doc([10, 5000, 20, 3000, 3000, 30])
    rows, big = [], []
    parser = RowParser("Posts.xml", lambda a, line: rows.append((a["Id"], line)), root="posts",
                       max_row_bytes=1024, on_oversize=lambda line, head: big.append((line, head[:12])))
    for i in range(0, len(data), chunk):
        parser.feed(data[i:i + chunk])
    parser.close()
    assert rows == [("1", 3), ("3", 5), ("6", 8)]
    assert big == [(4, b'<row Id="2" '), (6, b'<row Id="4" '), (7, b'<row Id="5" ')]
    assert parser.rows == 6


def test_oversized_row_without_a_handler_is_an_error():
    parser = RowParser("Posts.xml", lambda a, line: None, root="posts", max_row_bytes=1024)
    with pytest.raises(IngestError, match=r"Posts.xml, line 4: a <row> longer than 1024 bytes"):
        parser.feed(_rows_doc([10, 5000]))
        parser.close()


@pytest.mark.parametrize("doc, message", [
    (b"<posts>" + b" " * 5000 + b"<row/></posts>", "not a <row>"),
    (b"<posts><row a='" + b"x" * 5000 + b"'></row></posts>", "does not end with '/>'"),
    (b"<posts><row a='" + b"x" * 5000, "ends inside a <row>"),
])
def test_oversized_elements_that_are_not_rows(doc, message):
    parser = RowParser("Posts.xml", lambda a, line: None, root="posts", max_row_bytes=1024,
                       on_oversize=lambda line, head: None)
    with pytest.raises(IngestError, match=message):
        parser.feed(doc)
        parser.close()


def test_ingest_quarantines_oversized_rows_and_adds_up(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    body = b"&lt;p&gt;answer&lt;/p&gt;"
    (site / "Posts.xml").write_bytes(
        b'<posts>\n<row Id="1" PostTypeId="1" Score="3" Title="Question" Body="&lt;p&gt;q&lt;/p&gt;" />\n'
        b'<row Id="2" PostTypeId="2" ParentId="1" Score="5" Body="' + body + b'" />\n'
        b'<row Id="3" PostTypeId="2" ParentId="1" Score="0" Body="' + body * 400 + b'" />\n'
        b'<row Id="4" PostTypeId="2" ParentId="1" Score="1" Body="another ' + body + b'" />\n</posts>\n')
    cfg = IngestConfig(max_row_bytes=4096)
    result = execute_ingest(plan_ingest([site], tmp_path / "work", cfg), cfg)
    import pyarrow.parquet as pq

    q = pq.read_table(result.out_dir + "/quarantine.parquet").to_pylist()
    assert [(r["reason"], r["row_id"], r["line"]) for r in q] == [("too_large", "3", 4)]
    assert q[0]["raw"].startswith('<row Id="3"') and len(q[0]["raw"]) == 200
    report = result.report["files"]
    (entry,) = report.values()
    assert entry["adds_up"] and entry["rows"] == 4 and entry["quarantined:too_large"] == 1
