"""Posts.xml rows read from their bytes in C (tasks/ingest/_fastposts.c) give exactly what libxml2 and
PostRowReader give: the same store rows in the same order, the same quarantined rows, the same counts.
A range the C reader does not take (a line that is not a plain row) goes to libxml2 whole."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from alignflow.tasks.ingest import ranges

pytestmark = pytest.mark.skipif(ranges._fastposts is None or not ranges.SHARDS,
                                reason="installed without a C compiler or libsqlite3: tasks/ingest/_fastposts.c is "
                                       "not built")

HEAD = b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n<posts>\r\n'
TAIL = b"</posts>\r\n"


def _escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("\n", "&#xA;").replace("\r", "&#xD;").replace("\t", "&#x9;"))


def _row(attrs: list[tuple[str, str]], rng: random.Random, single_quotes: bool = False) -> bytes:
    lead = rng.choice(["  ", "  ", "", "\t"])
    end = rng.choice([" />", " />", "/>", "   />"])
    return (lead + "<row" + "".join(_attr(k, v, rng, single_quotes) for k, v in attrs) + end).encode() + \
        rng.choice([b"\r\n", b"\n"])


def _attr(name: str, value: str, rng: random.Random, single_quotes: bool) -> str:
    """`` name="value"``; with ``single_quotes``, now and then `` name='value'`` as some XML libraries write it, a
    double quote in the value then written as itself."""
    if single_quotes and rng.random() < 0.3:
        return f" {name}='" + value.replace("'", "&apos;").replace("&quot;", '"') + "'"
    return f' {name}="{value}"'


_TEXTS = ["plain words", "  spaced\u00a0out  ", "tabs\there", "ünïcödé ✓ 𝄞", "thin\u2009space", "ideo\u3000space",
          "line\nbreak", "", "   ", "<p>para &amp; more</p>", "x" * 50, "&lt;b&gt;", "zero\u200bwidth", "\u0085next"]
_BODIES = ["<p>Hello <b>world</b></p>", "<p>a</p>\n<pre><code>x = 1\n</code></pre>", "", "   ", "plain text body",
           "<ul><li>one</li><li>two</li></ul>", "<p>" + "long " * 30 + "</p>", "<p>caf\u00e9 &amp; \u2603</p>",
           "<div><p>nested</p></div>", "<p>broken <b>tag</p>", "<p>\u00a0</p>", "<br>"]


def _attrs(rng: random.Random, next_id: list[int]) -> list[tuple[str, str]]:
    """Attributes of a row as a dump writes them, with odd values now and then."""
    next_id[0] += 1
    pid = str(next_id[0])
    kind = rng.choices(["1", "2", "3", "5", "01", "x", None], [40, 45, 4, 3, 2, 2, 1])[0]
    attrs: list[tuple[str, str]] = []
    if rng.random() > 0.01:
        attrs.append(("Id", rng.choice([pid] * 20 + [" " + pid, "0" + pid, "-" + pid, "1" * 19, "abc"])))
    if kind is not None:
        attrs.append(("PostTypeId", kind))
    if kind in ("2", "3") or rng.random() < 0.05:
        attrs.append(("ParentId", rng.choice([str(max(1, next_id[0] - rng.randint(1, 5)))] * 10 + ["", "q", "+3"])))
    if rng.random() < 0.3:
        attrs.append(("AcceptedAnswerId", str(next_id[0] + 1)))
    attrs.append(("CreationDate", "2020-01-02T03:04:05.678"))
    if rng.random() > 0.02:
        attrs.append(("Score", rng.choice([str(rng.randint(-5, 50))] * 10 + ["+4", " 3", "9" * 19, "1.5", "", "-0"])))
    attrs.append(("Body", _escape(rng.choice(_BODIES))))
    if rng.random() < 0.5:
        attrs.append(("OwnerUserId", rng.choice(["7", "", "-1"])))
    if rng.random() < 0.3:
        attrs.append(("OwnerDisplayName", _escape(rng.choice(_TEXTS))))
    if kind == "1" or rng.random() < 0.05:
        attrs.append(("Title", _escape(rng.choice(_TEXTS[:8] * 3 + _TEXTS))))
        attrs.append(("Tags", _escape(rng.choice(["<a><b-c>", "|x|y|", "", "<<>>", "one"]))))
    attrs.append(("ContentLicense", rng.choice(["CC BY-SA 4.0", "CC BY-SA 3.0"])))
    rng.shuffle(attrs) if rng.random() < 0.1 else None
    return attrs


def _mutate(rng: random.Random, line: bytes) -> bytes:
    data = bytearray(line)
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(data))
        op = rng.random()
        if op < 0.3:
            del data[i]
        elif op < 0.8:
            data[i:i] = rng.choice([b'"', b"<", b">", b"&", b"&#0;", b"&#x10FFFF;", b"&bogus;", b"\t", b"\x01",
                                    b"\xc3", b"\xef\xbf\xbe", b" xmlns=\"u\"", b" Id=\"9\"", b"=", b"/", b"\r"])
        else:
            data[i] = rng.randrange(256)
    return bytes(data)


def _calls(result: ranges.RangeResult) -> tuple[list, list, dict]:
    """A range's posts (as the parent loads them: from its SQLite image), other calls, and counts."""
    result = ranges.pack(result)  # the parser's path: its posts into an image, as workers hand them over
    posts: list = []
    if result.shard is not None:
        db = sqlite3.connect(":memory:")
        db.deserialize(result.shard)
        posts = db.execute("SELECT * FROM posts ORDER BY rowid").fetchall()
        db.close()
    others = [c for c in result.calls if c[0] not in ("post", "count")]
    counts: dict = {}
    for c in result.calls:
        if c[0] == "count":
            counts[c[1:3]] = counts.get(c[1:3], 0) + c[3]
    return posts, others, counts


def _votes(result: ranges.RangeResult) -> dict:
    """A range's vote counts ``(site, post_id) -> [up, down, accepted]``, as a dict or from its SQLite image (whose
    rows must then be in the byte order of their post ids, the parent's key order)."""
    votes = {key: list(counts) for key, counts in result.votes.items()}
    if result.shard is not None:
        db = sqlite3.connect(":memory:")
        db.deserialize(result.shard)
        rows = db.execute("SELECT site, post_id, up, down, acc FROM votes ORDER BY rowid").fetchall()
        db.close()
        keys = [(site, post_id.encode()) for site, post_id, *_ in rows]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        for site, post_id, *counts in rows:
            assert (site, post_id) not in votes
            votes[(site, post_id)] = counts
    return votes


def _both(path: Path, monkeypatch, *, range_bytes: int, chunk: int, on_bad_row: str = "quarantine",
          max_chars: int = 300):
    tasks = ranges.range_tasks("s", "Posts", path, "Posts.xml", range_bytes=range_bytes, on_bad_row=on_bad_row,
                               max_chars=max_chars, max_row_bytes=1 << 20)
    for task in tasks:
        fast = ranges.scan_posts(task, chunk=chunk)
        with monkeypatch.context() as m:
            m.setattr(ranges, "scan_posts", lambda task, chunk=0: None)
            slow = ranges.read_range(task)
        yield task, fast, slow


def _same(fast: ranges.RangeResult, slow: ranges.RangeResult) -> None:
    assert slow.error is None and fast.error is None
    fast_posts, fast_others, fast_counts = _calls(fast)
    slow_posts, slow_others, slow_counts = _calls(slow)
    assert fast_posts == slow_posts
    assert fast_others == slow_others
    assert fast_counts == slow_counts
    assert fast.newlines == slow.newlines


def test_generated_rows_read_as_libxml2_and_the_reader_read_them(tmp_path, monkeypatch):
    rng = random.Random(5)
    next_id = [0]
    lines = [_row(_attrs(rng, next_id), rng) for _ in range(1500)]
    path = tmp_path / "Posts.xml"
    path.write_bytes(HEAD + b"".join(lines) + TAIL)
    taken = 0
    for _, fast, slow in _both(path, monkeypatch, range_bytes=6_000, chunk=2_000):
        if fast is not None:
            _same(fast, slow)
            taken += 1
    posts, others, counts = _calls(ranges.read_range(ranges.range_tasks(
        "s", "Posts", path, "Posts.xml", range_bytes=1 << 30, on_bad_row="quarantine", max_chars=300,
        max_row_bytes=1 << 20)[0]))
    # every branch is exercised: posts, quarantines, skipped types, rows refused by the plain form (tabs)
    assert len(posts) > 600 and len(others) > 100
    assert any(k[1].startswith("skipped:") for k in counts)
    assert 10 < taken < 120


def test_bodies_rendered_from_c_as_html_to_text_renders_them(tmp_path, monkeypatch):
    """The C reader renders a body by calling html_to_text's C renderer on its bytes (clean.c_renderer), and
    html_to_text itself for the rest: the same store rows as with html_to_text for every body and as libxml2's
    path. Bodies at and past the character limit in characters of 1, 2 and 4 UTF-8 bytes, blank ones by
    str.isspace (Unicode spaces included), and bodies outside the C renderer's subset."""
    from alignflow.tasks.ingest import clean

    if clean.c_renderer() is None:
        pytest.skip("installed without a C compiler: tasks/ingest/_fasthtml.c is not built")
    bodies = ["", "   ", "\u3000", " \u2003\n\u3000 ", "\u0085", "\u00a0", "x" * 300, "x" * 301,
              "<p>" + "\u00e9" * 300 + "</p>", "<p>" + "\u00e9" * 301 + "</p>", "<p>" + "\U0001d11e" * 300 + "</p>",
              "<p>" + "\U0001d11e" * 301 + "</p>", "<p>a<p>b", "<p>\u2009</p>", "<p> </p>", "<br>", "<p>ok</p>"]
    rng = random.Random(3)
    lines = []
    for n, body in enumerate(bodies * 2):
        question = n % 2 == 0
        attrs = [("Id", str(n + 1)), ("PostTypeId", "1" if question else "2"), ("Score", "3"), ("Body", _escape(body))]
        attrs += [("Title", "t"), ("Tags", _escape("<a>"))] if question else [("ParentId", str(n))]
        lines.append(_row(attrs, rng).replace(b"\t", b" "))
    path = tmp_path / "Posts.xml"
    path.write_bytes(HEAD + b"".join(lines) + TAIL)
    task = ranges.range_tasks("s", "Posts", path, "Posts.xml", range_bytes=1 << 20, on_bad_row="quarantine",
                              max_chars=300, max_row_bytes=1 << 20)[0]
    called: list[str] = []  # the bodies html_to_text was called for

    def html_to_text(html: str) -> str:
        called.append(html)
        return clean_html_to_text(html)

    clean_html_to_text = clean.html_to_text
    monkeypatch.setattr(clean, "html_to_text", html_to_text)
    direct = ranges.scan_posts(task)
    in_python = list(called)
    with monkeypatch.context() as m:
        m.setattr(clean, "c_renderer", lambda: None)
        by_str = ranges.scan_posts(task)
        m.setattr(ranges, "scan_posts", lambda task, chunk=0: None)
        slow = ranges.read_range(task)
    assert direct is not None and by_str is not None
    _same(direct, by_str)
    _same(direct, slow)
    posts = _calls(direct)[0]
    assert 10 < len(posts) < len(lines)  # some bodies kept, the empty answers and those past the limit not
    # html_to_text renders in Python only what the C renderer leaves: blank bodies and those outside its subset
    assert "" in in_python and "<p>a<p>b" in in_python and "<p>ok</p>" not in in_python
    assert 0 < len(in_python) < len(called) - len(in_python)


def test_mutated_rows_either_match_or_go_to_libxml2(tmp_path, monkeypatch):
    """One mutated row per file: whatever the C reader takes, it reads as libxml2 does; the rest it leaves."""
    rng = random.Random(9)
    taken = left = 0
    for case in range(250):
        next_id = [0]
        rows = [_row(_attrs(rng, next_id), rng).replace(b"\t", b" ") for _ in range(6)]
        k = rng.randrange(len(rows))
        rows[k] = _mutate(rng, rows[k])
        path = tmp_path / f"Posts{case}.xml"
        path.write_bytes(HEAD + b"".join(rows) + TAIL)
        for _, fast, slow in _both(path, monkeypatch, range_bytes=1 << 20, chunk=1 << 20):
            if fast is None:
                left += 1
                continue
            _same(fast, slow)
            taken += 1
    assert taken > 50 and left > 50


def test_the_real_dumps_are_read_in_c_as_libxml2_reads_them(fixtures_dir, monkeypatch):
    for path in sorted(fixtures_dir.glob("*/Posts.xml")):
        results = list(_both(path, monkeypatch, range_bytes=1 << 15, chunk=1 << 13, max_chars=20_000))
        assert len(results) > 3
        for _, fast, slow in results:
            assert fast is not None, path  # every line of the real dumps is a plain row
            _same(fast, slow)


def test_rows_several_to_a_line_read_as_libxml2_reads_them(tmp_path, monkeypatch):
    """A table an XML library writes has no line ends between rows, or some, and may quote values with ``'``: cut
    into ranges at a ``<row`` inside a line and into pieces that end before a ``<``, it is read in C as libxml2 reads
    it: the same store rows with the same line numbers, the same quarantined rows, the same counts."""
    rng = random.Random(11)
    next_id = [0]
    rows = [_row(_attrs(rng, next_id), rng, single_quotes=True).strip(b" \t\r\n") for _ in range(1500)]
    gaps = [b"", b"", b"", b" ", b"\n", b"\r\n", b"  \r\n\t", b"\n\n "]
    path = tmp_path / "Posts.xml"
    path.write_bytes(b"<?xml version='1.0' encoding='UTF-8'?><posts>" + b"".join(r + rng.choice(gaps) for r in rows)
                     + b"</posts>")
    data = path.read_bytes()
    taken = total = 0
    mid_line = 0
    for task, fast, slow in _both(path, monkeypatch, range_bytes=6_000, chunk=2_000):
        total += 1
        mid_line += task.start > 0 and data[task.start - 1:task.start] != b"\n"
        assert task.start == 0 or data[task.start:].lstrip(b" \t").startswith(b"<row")
        if fast is not None:
            _same(fast, slow)
            taken += 1
    assert mid_line > 10  # ranges that start inside a line
    assert total > 40 and taken > total // 3, (taken, total)


def test_a_lone_carriage_return_between_rows_goes_to_libxml2(tmp_path):
    """XML reads a lone "\r" as a line end, which the ranges' line counts (of "\n") would miss: not plain."""
    row = b'<row Id="1" PostTypeId="1" Score="2" Title="t" Body="b" />'
    path = tmp_path / "Posts.xml"
    for gap, plain in ((b"\r\n", True), (b"\r", False), (b" \r ", False)):
        path.write_bytes(HEAD + row + gap + row.replace(b'"1"', b'"3"', 1) + b"\r\n" + TAIL)
        task = ranges.range_tasks("s", "Posts", path, "Posts.xml", range_bytes=1 << 20, on_bad_row="quarantine",
                                  max_chars=100, max_row_bytes=1 << 20)[0]
        assert (ranges.scan_posts(task) is not None) == plain, gap


@pytest.mark.parametrize("slack", [0, -1])
def test_a_row_is_measured_to_the_next_tag_as_the_parser_measures_it(tmp_path, monkeypatch, slack):
    """The parser's path skips a ``<row>`` longer than ``max_row_bytes`` from its ``<`` to the next ``<`` (white space
    after it included). The C reader takes a row that fits that measure, and leaves the range to libxml2 when one
    does not: either way the result is libxml2's."""
    first = b'<row Id="1" PostTypeId="1" Score="2" Title="t" Body="' + b"w" * 200 + b'" />'
    gap = b"   \r\n  "
    second = b'<row Id="2" PostTypeId="2" ParentId="1" Score="1" Body="b" />'
    path = tmp_path / "Posts.xml"
    path.write_bytes(HEAD + first + gap + second + b"\r\n" + TAIL)
    cap = len(first + gap) + slack
    task = ranges.range_tasks("s", "Posts", path, "Posts.xml", range_bytes=1 << 20, on_bad_row="quarantine",
                              max_chars=1_000, max_row_bytes=cap)[0]
    fast = ranges.scan_posts(task)
    with monkeypatch.context() as m:
        m.setattr(ranges, "scan_posts", lambda task, chunk=0: None)
        slow = ranges.read_range(task)
    slow_posts, slow_others, _ = _calls(slow)
    if slack == 0:  # fits: the C reader takes it, and libxml2 keeps it too
        assert fast is not None
        _same(fast, slow)
        assert [p[2] for p in slow_posts] == ["1", "2"]
    else:  # one byte over: libxml2 skips it (quarantined), the C reader leaves the range to it
        assert fast is None
        assert [p[2] for p in slow_posts] == ["2"] and len(slow_others) == 1


@pytest.mark.parametrize("table", ["Posts", "Votes"])
def test_a_row_far_over_the_cap_is_never_held_by_the_c_readers(tmp_path, table):
    """A range with no row start to cut at (one attribute of 6 MiB) goes to the parser's path once the C readers'
    buffer passes ``max_row_bytes``: the parser skips the row without holding it. Before, the buffer grew to the
    whole row (a 512 MiB attribute: 1.5 GiB for the command's tree)."""
    import tracemalloc

    root = table.lower().encode()
    huge = b'<row Id="1" PostId="1" VoteTypeId="2" Body="' + b"x" * (6 << 20) + b'" />'
    path = tmp_path / f"{table}.xml"
    path.write_bytes(HEAD.replace(b"posts", root) + huge + b"\r\n" + TAIL.replace(b"posts", root))
    task = ranges.range_tasks("s", table, path, f"{table}.xml", range_bytes=1 << 20, on_bad_row="quarantine",
                              max_chars=100, max_row_bytes=1 << 20)[0]
    assert task.end == path.stat().st_size  # no cut: one range
    scan = ranges.scan_posts if table == "Posts" else ranges.scan_votes
    tracemalloc.start()
    try:
        assert scan(task, chunk=256 << 10) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # about the cap and a read or two, not the 6 MiB row
    result = ranges.read_range(task)
    assert result.error is None and ("q", "too_large") in [(c[0], c[1].get("reason")) for c in result.calls
                                                           if c[0] == "q"]


def test_a_refused_row_sends_the_range_to_libxml2(tmp_path, monkeypatch):
    """With on_bad_row="error", a row the reader refuses is reported by the parser's path, as before."""
    path = tmp_path / "Posts.xml"
    good = b'  <row Id="1" PostTypeId="1" Score="2" Title="t" Body="&lt;p&gt;b&lt;/p&gt;" />\r\n'
    bad = b'  <row Id="2" PostTypeId="2" Score="many" ParentId="1" Body="b" />\r\n'
    path.write_bytes(HEAD + good + bad + TAIL)
    task = ranges.range_tasks("s", "Posts", path, "Posts.xml", range_bytes=1 << 20, on_bad_row="error",
                              max_chars=100, max_row_bytes=1 << 20)[0]
    assert ranges.scan_posts(task) is None
    result = ranges.read_range(task)
    assert result.error is not None and result.error["line"] == 4 and result.error["field"] == "Score"
    path.write_bytes(HEAD + good + TAIL)
    fast = ranges.scan_posts(task.__class__(**{**task.__dict__, "end": path.stat().st_size}))
    assert fast is not None and _calls(fast)[0][0][2] == "1" and _calls(fast)[0][0][-1] == 3


def test_lines_the_plain_form_leaves_out_go_to_libxml2(tmp_path, monkeypatch):
    row = '  <row Id="1" PostTypeId="1" Score="2" Title="t" Body="b"{} />\r\n'
    for odd in ('\tTags="x"', ' Tags=\'x"\'"\'', ' Tags="x\'', ' xmlns="urn:x"', ' Title="again"', ' Tags="a\tb"',
                ' Tags="&nbsp;"', ' Tags="&#1;"', ' Tags="\ufffe"', ' Tags = "x"'):
        path = tmp_path / "Posts.xml"
        path.write_bytes(HEAD + row.format(odd).encode() + TAIL)
        task = ranges.range_tasks("s", "Posts", path, "Posts.xml", range_bytes=1 << 20, on_bad_row="quarantine",
                                  max_chars=100, max_row_bytes=1 << 20)[0]
        assert ranges.scan_posts(task) is None, odd
    for plain, tags in ((' Tags="&#xA;&#38;&apos;\u00e9"', "\n&'\u00e9"),
                        (' Tags=\'say "hi" &apos;x&apos;\'', 'say "hi" \'x\'')):  # either quote, the other in it
        path.write_bytes(HEAD + row.format(plain).encode() + TAIL)
        whole = task.__class__(**{**task.__dict__, "end": path.stat().st_size})
        fast = ranges.scan_posts(whole)
        assert fast is not None, plain
        with monkeypatch.context() as m:
            m.setattr(ranges, "scan_posts", lambda task, chunk=0: None)
            _same(fast, ranges.read_range(whole))  # the values as libxml2 reads them
        assert _calls(fast)[0][0][10] == tags  # the store row's tags (store.post_row)
