"""Ingest on several worker processes: byte ranges cut at row lines, identical datasets.

Every test reads the same input with ``ingest.workers=1`` (one process, no
ranges) and with several workers and tiny ranges (so a small file is cut into
many), and compares the dataset digests, the report and, for bad input, the
one error line a user sees.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from alignflow.config import load_config
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.ranges import cut_points, plain_head
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
from alignflow.tasks.ingest.synthetic import generate_dump


def run(sources, workdir: Path, *overrides: str):
    cfg = load_config(None, list(overrides)).ingest
    plan = plan_ingest([str(s) for s in sources], workdir, cfg)
    return execute_ingest(plan, cfg)


def digests(result) -> dict[str, str]:
    return {k: v["digest"] for k, v in result.datasets.items()}


def same_accounting(a: dict, b: dict) -> bool:
    keys = ("files", "pairs", "datasets", "score_source", "adds_up")
    return {k: a[k] for k in keys} == {k: b[k] for k in keys}


def both(sources, tmp_path: Path, *overrides: str):
    one = run(sources, tmp_path / "w1", "ingest.workers=1", *overrides)
    many = run(sources, tmp_path / "w3", "ingest.workers=3", "ingest.range_mb=0.02", *overrides)
    return one, many


def test_cut_points_start_at_row_lines(fixtures_dir):
    posts = fixtures_dir / "conlang.meta-2020" / "Posts.xml"
    data = posts.read_bytes()
    ranges = cut_points(posts, 20_000)
    assert len(ranges) > 5
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for start, _ in ranges[1:]:
        assert data[start - 1:start] == b"\n" and data[start:].lstrip(b" \t").startswith(b"<row ")
    assert plain_head(posts, "posts") and not plain_head(posts, "votes")


def _one_line(src: Path, dst: Path) -> Path:
    """The dump tables of site folder ``src`` as lxml writes them: the same rows, all on one line after the
    declaration, with lxml's quoting and character references."""
    from lxml import etree

    dst.mkdir(parents=True)
    for name in ("Posts.xml", "Votes.xml"):
        if not (src / name).exists():
            continue
        root = etree.parse(str(src / name)).getroot()
        root.text = None
        for row in root:
            row.tail = None
        (dst / name).write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))
    return dst


def test_a_site_with_every_row_on_one_line_gives_the_same_datasets(fixtures_dir, tmp_path):
    """A table an XML library wrote (no line ends between rows) is cut into ranges at its rows and read as fast
    as a dump; the datasets are those of the dump, with 1 worker or 3. Before, such a table was one range, read
    by libxml2 in one process that held all its rows (a 302 MiB Posts.xml: 23 s and 1.7 GiB)."""
    src = fixtures_dir / "conlang.meta-2020"
    site = _one_line(src, tmp_path / "lxml" / src.name)
    head = (site / "Posts.xml").read_bytes()[:120]
    assert head.startswith(b"<?xml version='1.0' encoding='UTF-8'?>\n<posts><row ")
    assert (site / "Posts.xml").read_bytes().count(b"\n") == 1
    cuts = cut_points(site / "Posts.xml", 20_000)
    assert len(cuts) > 5 and all((site / "Posts.xml").read_bytes()[a:a + 5] == b"<row " for a, _ in cuts[1:])
    dump = run([src], tmp_path / "dump", "ingest.workers=1")
    one, many = both([site], tmp_path)
    kinds = ("posts", "pairs", "demos", "prompts")
    assert {k: digests(one)[k] for k in kinds} == {k: digests(dump)[k] for k in kinds} == \
        {k: digests(many)[k] for k in kinds}
    assert digests(one) == digests(many)  # the quarantine too (its rows' lines: the second line, for all)
    assert one.datasets["pairs"]["rows"] > 0
    for report in (one.report, many.report):
        assert report["adds_up"] and report["datasets"] == dump.report["datasets"]
        assert report["pairs"] == dump.report["pairs"]
    profile = json.loads((Path(many.out_dir) / "profile.json").read_text())["seconds"]
    from alignflow.tasks.ingest import ranges

    if ranges._fastposts is not None:  # every Posts.xml range read in C (tasks/ingest/_fastposts.c), none by libxml2
        assert any(k.startswith("read: Posts.xml rows read in C") for k in profile)
        assert not any(k.startswith("read: Posts.xml parse") for k in profile)
    if ranges._fastvotes is not None:  # and every Votes.xml range counted in C (tasks/ingest/_fastvotes.c)
        tasks = ranges.range_tasks("s", "Votes", site / "Votes.xml", "Votes.xml", range_bytes=20_000,
                                   on_bad_row="error", max_chars=100, max_row_bytes=1 << 20)
        assert len(tasks) > 3 and all(ranges.scan_votes(t) is not None for t in tasks)


def test_comments_before_the_root_still_let_a_table_be_cut(tmp_path):
    path = tmp_path / "Posts.xml"
    for head, cut in ((b'<?xml version="1.0"?>\n<!-- made by a tool -->\n<?pi x?>\n<posts>', True),
                      (b'<!--x--><posts>', True), (b'<?xml version="1.0"?><!DOCTYPE posts>\n<posts>', False),
                      (b'<?xml version="1.0"?><!-- ' + b"x" * 5_000 + b' -->\n<posts>', False),
                      (b'<?xml version="1.0"?><!-- unclosed <posts>', False)):
        path.write_bytes(head + b'\n<row Id="1" />\n</posts>\n')
        assert plain_head(path, "posts") == cut, head[:60]


def test_a_large_table_that_cannot_be_cut_is_streamed_with_the_same_datasets(fixtures_dir, tmp_path):
    """A table larger than a range whose head it cannot be cut after (here a comment longer than the 4 KiB read) is
    streamed into the store in the command's process, as an archive's table is, rather than read as one range that
    holds all its rows before they are loaded (a 302 MiB Posts.xml: 1.7 GiB): the same datasets as in ranges."""
    src = fixtures_dir / "conlang.meta-2020"
    site = tmp_path / "long-head" / src.name
    site.mkdir(parents=True)
    shutil.copy(src / "Votes.xml", site / "Votes.xml")
    data = (src / "Posts.xml").read_bytes()
    end = data.index(b"?>") + 2
    # on the declaration's line, so that every row keeps its line number (the quarantine's lines)
    (site / "Posts.xml").write_bytes(data[:end] + b"<!-- " + b"x" * 5_000 + b" -->" + data[end:])
    assert not plain_head(site / "Posts.xml", "posts")
    ranged = run([src], tmp_path / "ranged", "ingest.workers=2", "ingest.range_mb=0.02")
    streamed = run([site], tmp_path / "streamed", "ingest.workers=2", "ingest.range_mb=0.02")
    assert digests(streamed) == digests(ranged)
    assert sorted(streamed.report["files"].values(), key=str) == sorted(ranged.report["files"].values(), key=str)
    assert streamed.report["adds_up"] and streamed.datasets["pairs"]["rows"] > 0
    profile = json.loads((Path(streamed.out_dir) / "profile.json").read_text())["seconds"]
    assert not any(k.startswith("read: Posts.xml") for k in profile)  # no range of it read by a worker
    ranged_profile = json.loads((Path(ranged.out_dir) / "profile.json").read_text())["seconds"]
    assert any(k.startswith("read: Posts.xml") for k in ranged_profile)


def _with_rows_in_markup(src: Path, dst: Path, *, close: bool = True) -> Path:
    """Site ``src`` with copies of its answer rows, ids moved out of the way, one to a line inside a comment, a
    CDATA section and a processing instruction between its rows: markup that a cut after a row's ``>`` can fall
    in, each several ranges long. None of them is a row."""
    shutil.copytree(src, dst)
    lines = (dst / "Posts.xml").read_bytes().splitlines(keepends=True)
    rows = [line for line in lines if b'PostTypeId="2"' in line]
    hidden = [line.replace(b' Id="', b' Id="8', 1).replace(b"-", b"_") for line in rows * 8]  # no "--" in a comment
    blocks = ((b"  <!-- answers taken out by hand:\n", b"  -->\n"), (b"  <![CDATA[\n", b"  ]]>\n"),
              (b"  <?kept\n", b"  ?>\n"))
    for at, (open_, close_) in zip((200, 120, 40), blocks):
        lines[at:at] = [open_, *hidden, *([close_] if close else [])]
        if not close:
            break
    (dst / "Posts.xml").write_bytes(b"".join(lines))
    return dst


def test_rows_inside_comments_are_not_read_when_a_cut_falls_in_them(fixtures_dir, tmp_path):
    """A cut falls at a ``<row`` after a ``>``, which may be inside a comment, a CDATA section or a processing
    instruction: the range before it is read again joined to the next ones (``ranges.rejoin_cuts``), and the rows
    inside are not rows. Before, such a valid table failed with "Comment not terminated"."""
    src = fixtures_dir / "conlang.meta-2020"
    site = _with_rows_in_markup(src, tmp_path / "marked" / src.name)
    data = (site / "Posts.xml").read_bytes()
    inside = [a for a, _ in cut_points(site / "Posts.xml", 20_000) if b' Id="8' in data[a:a + 12]]
    assert len(inside) >= 6  # cuts inside each block, every block longer than two ranges
    plain = run([src], tmp_path / "plain", "ingest.workers=1")
    one, many = both([site], tmp_path)
    assert digests(one) == digests(many) == digests(plain)
    assert one.report["datasets"] == many.report["datasets"] == plain.report["datasets"]
    assert many.report["adds_up"] and many.datasets["pairs"]["rows"] > 0


def test_a_comment_left_open_is_the_same_error_however_the_table_is_cut(fixtures_dir, tmp_path):
    src = fixtures_dir / "conlang.meta-2020"
    site = _with_rows_in_markup(src, tmp_path / "open" / src.name, close=False)
    with pytest.raises(IngestError) as one:
        run([site], tmp_path / "w1", "ingest.workers=1")
    with pytest.raises(IngestError) as many:
        run([site], tmp_path / "w3", "ingest.workers=3", "ingest.range_mb=0.02")
    assert str(one.value) == str(many.value)
    assert "Comment not terminated <!-- answers taken out by hand" in str(many.value)  # libxml2 quotes its start


class _Growing:
    """A table written a few bytes at a time, as :class:`~alignflow.tasks.ingest.stackexchange.ArchiveSpool` writes
    an archive's member: each wait lets some more bytes in (none when told to fail part way)."""

    def __init__(self, data: bytes, path: Path, step: int, fail_at: int | None = None) -> None:
        self.data, self.path, self.step, self.fail_at = data, path, step, fail_at
        self.written, self.done, self.error = 0, False, None
        path.write_bytes(b"")

    def wait_for(self, size: int) -> int:
        while self.written < size and not self.done:
            end = min(len(self.data), self.written + self.step)
            if self.fail_at is not None and end >= self.fail_at:
                self.error, self.done = IngestError("archive could not be decompressed", path="x.7z!Posts.xml"), True
                break
            with open(self.path, "ab") as fh:
                fh.write(self.data[self.written:end])
            self.written = end
            self.done = end == len(self.data)
        return self.written


def test_a_table_being_written_is_cut_where_the_written_table_is_cut(fixtures_dir, tmp_path):
    from alignflow.tasks.ingest.ranges import growing_range_tasks

    data = (fixtures_dir / "conlang.meta-2020" / "Posts.xml").read_bytes()
    (tmp_path / "whole.xml").write_bytes(data)
    for range_bytes, step in ((20_000, 777), (20_000, 1 << 20), (3_000, 50), (1 << 20, 4096)):
        spool = _Growing(data, tmp_path / "growing.xml", step)
        tasks = list(growing_range_tasks(spool, "s", "Posts", "x.7z!Posts.xml", range_bytes=range_bytes,
                                         on_bad_row="error", max_chars=100, max_row_bytes=1 << 20))
        assert [(t.start, t.end) for t in tasks] == cut_points(tmp_path / "whole.xml", range_bytes)
        assert [t.first for t in tasks] == [True] + [False] * (len(tasks) - 1)
        assert [t.last for t in tasks] == [False] * (len(tasks) - 1) + [True]


@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_while_making_tasks_comes_after_the_results_before_it(fixtures_dir, tmp_path, workers):
    from alignflow.tasks.ingest.ranges import growing_range_tasks, run_tasks

    data = (fixtures_dir / "conlang.meta-2020" / "Posts.xml").read_bytes()
    spool = _Growing(data, tmp_path / "growing.xml", 500, fail_at=len(data) // 2)
    tasks = growing_range_tasks(spool, "s", "Posts", "x.7z!Posts.xml", range_bytes=10_000, on_bad_row="error",
                                max_chars=100, max_row_bytes=1 << 20)
    seen = []
    with pytest.raises(IngestError, match="could not be decompressed"):
        for task, result in run_tasks(tasks, workers, ahead=False):
            assert result.error is None
            seen.append(task.index)
    assert seen == list(range(len(seen))) and len(seen) >= 3  # every range written before the failure, in order


def test_real_sites_identical_with_three_workers(fixtures_dir, tmp_path):
    sources = [fixtures_dir / "conlang.meta-2020", fixtures_dir / "datascience.meta-2024"]
    one, many = both(sources, tmp_path)
    assert one.report["adds_up"] and many.report["adds_up"]
    assert digests(one) == digests(many)
    assert same_accounting(one.report, many.report)
    assert one.datasets["pairs"]["rows"] > 0
    # the number of workers is not part of the cache key: the same datasets are found again
    again = run(sources, tmp_path / "w1", "ingest.workers=2", "ingest.range_mb=0.05")
    assert again.cache_hit and digests(again) == digests(one)


def test_generated_dump_identical_with_three_workers(tmp_path):
    site = generate_dump(tmp_path / "dump", questions=400, seed=3)
    one, many = both([site], tmp_path)
    assert digests(one) == digests(many)
    assert same_accounting(one.report, many.report)
    assert one.datasets["posts"]["rows"] > 1000
    profile = json.loads((Path(many.out_dir) / "profile.json").read_text())["seconds"]
    from alignflow.tasks.ingest import ranges

    rows = ("Posts.xml rows read in C (parse, decode, checks, store rows)" if ranges._fastposts is not None
            else "Posts.xml rows (decode, checks, records)")  # tasks/ingest/_fastposts.c, or libxml2 and Python
    assert profile[f"read: {rows} (worker seconds)"] > 0
    assert profile["read: Posts.xml HTML to text (worker seconds)"] > 0
    assert profile["build: waiting for contracts (second process)"] >= 0 and profile["build (wall)"] > 0
    assert profile["build: contracts CPU (second process)"] > 0


def _site_with_bad_rows(folder: Path, fixtures_dir: Path) -> Path:
    """The conlang site with broken rows scattered through Posts.xml (quarantined, not fatal)."""
    shutil.copytree(fixtures_dir / "conlang.meta-2020", folder)
    lines = (folder / "Posts.xml").read_text(encoding="utf-8").splitlines(keepends=True)
    bad = [
        '  <row Id="x9" PostTypeId="2" ParentId="1" Score="1" Body="&lt;p&gt;no id&lt;/p&gt;" />\n',
        '  <row Id="90001" PostTypeId="2" Score="1" Body="&lt;p&gt;no parent&lt;/p&gt;" />\n',
        '  <row Id="90002" PostTypeId="1" Score="z" Title="t" Body="b" />\n',
        '  <row Id="90003" PostTypeId="1" Score="1" Title="   " Body="b" />\n',
    ]
    for i, row in enumerate(bad):
        lines.insert(20 + 40 * i, row)
    (folder / "Posts.xml").write_text("".join(lines), encoding="utf-8")
    return folder


def test_quarantined_rows_keep_their_lines(fixtures_dir, tmp_path):
    site = _site_with_bad_rows(tmp_path / "site", fixtures_dir)
    one, many = both([site], tmp_path, "ingest.on_bad_row=quarantine")
    assert digests(one) == digests(many)
    import pandas as pd

    q = pd.read_parquet(many.datasets["quarantine"]["path"])
    assert len(q) == 4
    text = (site / "Posts.xml").read_text(encoding="utf-8").splitlines()
    for line, row_id in zip(q.line, q.row_id):
        assert f'Id="{row_id}"' in text[int(line) - 1]


def test_error_in_a_later_range_names_the_same_line(fixtures_dir, tmp_path):
    site = _site_with_bad_rows(tmp_path / "site", fixtures_dir)
    with pytest.raises(IngestError) as one:
        run([site], tmp_path / "w1", "ingest.workers=1")
    with pytest.raises(IngestError) as many:
        run([site], tmp_path / "w3", "ingest.workers=3", "ingest.range_mb=0.02")
    assert str(one.value) == str(many.value)
    assert "line 21" in str(many.value)
    # nothing half-built is left behind for a rerun to trust
    for work in (tmp_path / "w1", tmp_path / "w3"):
        assert not [p for p in (work / "data" / "ingest").iterdir() if not p.name.startswith(".")]


def test_malformed_xml_deep_in_the_file(fixtures_dir, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(fixtures_dir / "conlang.meta-2020", site)
    lines = (site / "Posts.xml").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[150] = lines[150].replace('Score="', 'Score=', 1)
    (site / "Posts.xml").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(IngestError) as one:
        run([site], tmp_path / "w1", "ingest.workers=1")
    with pytest.raises(IngestError) as many:
        run([site], tmp_path / "w3", "ingest.workers=3", "ingest.range_mb=0.02")
    assert str(one.value) == str(many.value)
    assert "line 151" in str(many.value)


def test_contract_rejections_are_the_same_on_the_second_process(tmp_path):
    """With several workers the contracts run on their own process; what they reject is quarantined the same."""
    rows = [{"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}",
             "chosen_score": 5, "rejected_score": 1} for i in range(30)]
    rows[7] = {"prompt": "mislabelled?", "chosen": "worse", "rejected": "better", "chosen_score": 1,
               "rejected_score": 5}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    one, many = both([path], tmp_path, "ingest.batch_rows=100", "ingest.contract_rows=100")
    assert digests(one) == digests(many)
    assert same_accounting(one.report, many.report)
    assert many.report["files"][str(path)]["quarantined:contract:pairs"] == 1
    assert one.report["contracts"]["pairs"]["batches"] == many.report["contracts"]["pairs"]["batches"]
    profile = json.loads((Path(many.out_dir) / "profile.json").read_text())["seconds"]
    assert "build: waiting for contracts (second process)" in profile


# -- Votes.xml counted from its bytes ---------------------------------------------------------
from alignflow.tasks.ingest.ranges import RangeTask, count_vote_lines, read_range, scan_votes  # noqa: E402
from test_fast_posts import _votes  # noqa: E402  a range's vote counts, from a dict or its SQLite image

_HEAD = b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n<votes>\r\n'
_ROWS = (b'  <row Id="1" PostId="7" VoteTypeId="2" CreationDate="2018-02-06T00:00:00.000" />\r\n'
         b'  <row Id="2" PostId="7" VoteTypeId="3" UserId="4" CreationDate="2018-02-06T00:00:00.000" />\r\n'
         b'  <row Id="3" PostId="8" VoteTypeId="5" UserId="4" CreationDate="2018-02-06T00:00:00.000" />\r\n'
         b'  <row Id="4" PostId="7" VoteTypeId="2" CreationDate="2018-02-06T00:00:00.000" />\r\n'
         b'  <row Id="5" PostId="9" VoteTypeId="1" CreationDate="2018-02-06T00:00:00.000" />\r\n')


def _votes_task(path: Path, start: int = 0, end: int | None = None, first=True, last=True) -> RangeTask:
    return RangeTask(0, "Votes", "s", str(path), "Votes.xml", start, path.stat().st_size if end is None else end,
                     first, last, "error", 20_000, 1 << 20)


def test_count_vote_lines_counts_only_plain_rows():
    counts, lines = count_vote_lines(_ROWS)
    assert lines == 5 and counts == {b'7" VoteTypeId="2': 2, b'7" VoteTypeId="3': 1, b'8" VoteTypeId="5': 1,
                                     b'9" VoteTypeId="1': 1}
    assert count_vote_lines(b"") == ({}, 0)
    # rows several to a line, as an XML library writes them, and blank lines between rows: the same votes
    joined = b"".join(line.strip() for line in _ROWS.splitlines())
    assert count_vote_lines(joined) == count_vote_lines(_ROWS + b"\n \r\n") == (counts, 5)
    # anything a parser could read differently: entities, another attribute, spaces, a missing '/>', text or a
    # lone CR (a line end to XML) between rows
    for odd in (b'<row Id="1" PostId="&#55;" VoteTypeId="2" />\n', b'<row Id="1" PostId="7" VoteTypeId="2" X="1" />\n',
                b'<row Id="1" PostId=" 7" VoteTypeId="2" />\n', b'<row Id="1" PostId="7" VoteTypeId="2">\n',
                b'x\n', b'\r', b'<row Id="1" PostId="\xd9\xa2" VoteTypeId="2" />\n'):
        assert count_vote_lines(_ROWS + odd) is None, odd


def _vote_line(rng) -> bytes:
    """A vote row as the dumps write it, or close to it (lengths at and past the limits, odd types)."""
    def num(low=1, high=18):
        n = high + 1 if rng.random() < 0.02 else rng.choice([low, high, rng.randint(low, high)])
        return "".join(rng.choice("0123456789") for _ in range(n))

    parts = [rng.choice(["", "  ", "\t", " \t "]), f'<row Id="{num()}" PostId="{num()}"',
             f' VoteTypeId="{rng.choice(["1", "2", "3", "5", "02", "10", num()])}"']
    if rng.random() < 0.5:
        parts.append(f' UserId="{rng.choice(["", "-"])}{num()}"')
    if rng.random() < 0.7:
        n = 41 if rng.random() < 0.03 else rng.choice([1, 23, 40])
        parts.append(' CreationDate="' + "".join(rng.choice("0123456789T:.-") for _ in range(n)) + '"')
    if rng.random() < 0.2:
        parts.append(f' BountyAmount="{num()}"')
    parts.append(rng.choice([" />", "/>"]) if rng.random() < 0.97 else rng.choice(["  />", " >"]))
    return "".join(parts).encode() + (rng.choice([b"\n", b"\r\n"]) if rng.random() < 0.97 else b"\r\r\n")


def _mutated(rng, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(data) + 1)
        op = rng.random()
        if op < 0.4 and i < len(data):
            del data[i]
        elif op < 0.8:
            data[i:i] = bytes([rng.choice(b' "<>/=\r\n\t-0123456789TIdPostVyxe\xc3\xa9')])
        elif i < len(data):
            data[i] = rng.randrange(256)
    return bytes(data)


def test_tally_votes_in_c_counts_what_the_regular_expression_counts(monkeypatch):
    """tasks/ingest/_fastvotes.c against count_vote_lines on generated and mutated lines (same counts, same
    refusals), with votes already in the table."""
    from alignflow.tasks.ingest import ranges

    if ranges._count_votes is None:
        pytest.skip("installed without a C compiler: tasks/ingest/_fastvotes.c is not built")
    rng = random.Random(12)
    refused = counted = 0
    for case in range(3000):
        data = b"".join(_vote_line(rng) for _ in range(rng.randint(0, 6)))
        if case % 2:
            data = _mutated(rng, data)
        if rng.random() < 0.2 and data.endswith(b"\n"):
            data = data[:-1]
        start = {("s", "7"): [1, 2, 3]}
        fast_votes, slow_votes = {k: list(v) for k, v in start.items()}, {k: list(v) for k, v in start.items()}
        fast = ranges.tally_votes(data, "s", fast_votes)
        with monkeypatch.context() as m:
            m.setattr(ranges, "_count_votes", None)
            slow = ranges.tally_votes(data, "s", slow_votes)
        assert fast == slow, data
        assert fast_votes == slow_votes, data
        refused += fast is None
        counted += fast is not None and fast[0] > 0
    assert refused > 500 and counted > 500  # both branches are exercised


def test_a_ranges_tally_in_c_gives_the_image_of_what_count_votes_counts():
    """open_tally / tally_lines / tally_image (tasks/ingest/_fastvotes.c) against count_votes and shard_image:
    lines counted piece by piece give, in the image, the rows of the dict count_votes sums over the same pieces, in
    the byte order of the post ids ("07" and "7" are two posts; "10" comes before "9"; "1" * 16 before "1" * 16 +
    "0"), with an empty posts table;
    a piece count_votes refuses, tally_lines refuses too."""
    import sqlite3

    from alignflow.tasks.ingest import ranges
    from alignflow.tasks.ingest.store import POST_TYPES, VOTE_TYPES, shard_image

    if ranges._fastvotes is None or not ranges.SHARDS:
        pytest.skip("installed without a C compiler or libsqlite3: tasks/ingest/_fastvotes.c is not built")

    def rows(image: bytes) -> tuple[list, int]:
        db = sqlite3.connect(":memory:")
        db.deserialize(image)
        got = db.execute("SELECT * FROM votes ORDER BY rowid").fetchall(), db.execute("SELECT count(*) FROM posts")
        return got[0], got[1].fetchone()[0]

    rng = random.Random(7)
    # past 16 digits, ids are ordered by more than the sort's key: ids that share their first 16 digits
    ids = ["7", "07", "70", "8", "9", "10", "0", "1" * 15 + "2", "1" * 16, "1" * 17, "1" * 18, "1" * 16 + "0",
           "1" * 16 + "2", "1" * 16 + "02", "9" * 18]
    refused = imaged = 0
    for case in range(400):
        tally, counted = ranges._fastvotes.open_tally(), {}
        many = case == 0  # past the table's first size (1,024 posts)
        for _ in range(rng.randint(1, 4)):
            lines = [f'  <row Id="{rng.randint(1, 99)}" PostId="{n if many else rng.choice(ids)}" '
                     f'VoteTypeId="{rng.choice("12358")}" CreationDate="2020-01-01T00:00:00.000" />\r\n'.encode()
                     for n in range(5000 if many else rng.randint(0, 12))]
            if rng.random() < 0.1:
                lines.insert(rng.randint(0, len(lines)), _mutated(rng, _vote_line(rng)))
            piece = b"".join(lines)
            fast = ranges._fastvotes.tally_lines(tally, piece)
            assert fast == ranges._count_votes(piece, "s", counted), piece
            if fast is None:
                refused += 1
                break
        else:
            imaged += 1
            got, posts = rows(ranges._fastvotes.tally_image(tally, "s", POST_TYPES, VOTE_TYPES))
            expected = sorted(rows(shard_image([], counted))[0], key=lambda r: r[1].encode())
            assert got == expected and posts == 0
            assert len(got) == (5000 if many else len({k for k in counted}))
    assert refused > 10 and imaged > 100  # both branches are exercised


def test_scan_votes_equals_the_parser(tmp_path):
    path = tmp_path / "Votes.xml"
    path.write_bytes(_HEAD + _ROWS + b"</votes>\r\n")
    fast = scan_votes(_votes_task(path), chunk=100)
    assert fast is not None
    assert _votes(fast) == {("s", "7"): [2, 1, 0], ("s", "9"): [0, 0, 1]}
    assert fast.newlines == path.read_bytes().count(b"\n")
    counts = {(c[2]): c[3] for c in fast.calls}
    assert counts == {"rows": 5, "skipped:other_vote_type": 1}
    # the same through lxml (a head the scan does not take: a declaration that names no encoding)
    slow_path = tmp_path / "Votes2.xml"
    slow_path.write_bytes(b'<?xml version="1.0"?>\n<votes>\n' + _ROWS + b"</votes>\n")
    assert scan_votes(_votes_task(slow_path)) is None
    slow = read_range(_votes_task(slow_path))
    assert slow.votes == _votes(fast)
    slow_counts: dict = {}
    for c in slow.calls:
        slow_counts[c[2]] = slow_counts.get(c[2], 0) + c[3]
    assert slow_counts == counts


def test_a_ranges_pieces_are_its_bytes_cut_at_line_ends(tmp_path):
    """ranges._line_chunks: the pieces of a range, views of one reused buffer, are its bytes in order, each ending
    at a line end (the last at the range's end); a line longer than a piece is carried whole; a range up to a
    quarter over the piece size is one piece."""
    from alignflow.tasks.ingest import ranges

    rng = random.Random(4)
    lines = [b"x" * rng.choice([0, 3, 40, 99, 250, 1000]) + b"\n" for _ in range(400)]
    path = tmp_path / "Votes.xml"
    path.write_bytes(b"".join(lines) + b"tail without a newline")
    data = path.read_bytes()
    for start, end, chunk in [(0, len(data), 100), (0, len(data), 7), (5, len(data) - 3, 64), (0, 120, 100),
                              (0, 126, 100), (0, len(data), 1 << 20)]:
        task = _votes_task(path, start, end)
        pieces = [bytes(buffer[a:b]) for buffer, a, b in ranges._line_chunks(task, chunk)]
        assert b"".join(pieces) == data[start:end]
        assert all(piece.endswith(b"\n") for piece in pieces[:-1]) and all(pieces)
        if end - start <= chunk + chunk // 4:
            assert len(pieces) == 1
        else:
            assert len(pieces) > 1
        if chunk < 1000 < end - start - 2000:
            assert max(map(len, pieces)) > chunk  # lines longer than a piece came whole


def test_scan_votes_leaves_odd_ranges_to_the_parser(tmp_path):
    path = tmp_path / "Votes.xml"
    path.write_bytes(_HEAD + _ROWS + b"</votes>\r\n<!-- after -->\n")
    assert scan_votes(_votes_task(path)) is None  # bytes after the root
    path.write_bytes(_HEAD + _ROWS)
    assert scan_votes(_votes_task(path)) is None  # no closing tag: truncated
    middle = len(_HEAD) + _ROWS.index(b"  <row Id=\"3\"")
    path.write_bytes(_HEAD + _ROWS + b"</votes>\n")
    head = scan_votes(_votes_task(path, 0, middle, first=True, last=False))
    tail = scan_votes(_votes_task(path, middle, None, first=False, last=True))
    assert head is not None and tail is not None
    assert _votes(head) == {("s", "7"): [1, 1, 0]}
    assert _votes(tail) == {("s", "7"): [1, 0, 0], ("s", "9"): [0, 0, 1]}


def test_scan_votes_matches_lxml_on_the_real_dumps(fixtures_dir, monkeypatch):
    """The real sites' Votes.xml, cut into ranges and read in small chunks, counted as lxml reads them."""
    from alignflow.tasks.ingest import ranges

    votes_files = sorted(fixtures_dir.glob("*/Votes.xml"))
    assert votes_files
    for path in votes_files:
        site = path.parent.name
        tasks = ranges.range_tasks(site, "Votes", path, str(path), range_bytes=7_000, on_bad_row="error",
                                   max_chars=20_000, max_row_bytes=1 << 20)
        assert len(tasks) > 3
        fast = [ranges.scan_votes(t, chunk=1000) for t in tasks]
        assert all(r is not None for r in fast)
        with monkeypatch.context() as m:
            m.setattr(ranges, "scan_votes", lambda task, chunk=0: None)
            slow = [ranges.read_range(t) for t in tasks]
        for f, s in zip(fast, slow):
            assert _votes(f) == s.votes and f.newlines == s.newlines and f.error is None and s.error is None
            totals = {}
            for c in s.calls:
                totals[c[2]] = totals.get(c[2], 0) + c[3]
            assert {c[2]: c[3] for c in f.calls} == totals


@pytest.mark.parametrize("early", [True, False])
def test_the_contract_worker_starts_before_the_read_on_small_inputs_and_with_the_build_on_large(
        fixtures_dir, tmp_path, monkeypatch, early):
    """Large inputs keep the idle contract worker out of the read phase (memory; plain dump XML has its own,
    larger limit); the datasets are the same."""
    from alignflow.tasks.ingest import contract_service, run as run_module

    source = fixtures_dir / "conlang.meta-2020"
    size = contract_service.input_size([source])
    assert size == sum(p.stat().st_size for p in source.iterdir() if p.is_file()) > 0
    assert contract_service.input_size([source / "Posts.xml", tmp_path / "missing"]) == (source / "Posts.xml").stat().st_size
    (tmp_path / "RC_2015-01.zst").write_bytes(b"x" * 1000)  # compressed: counted at its estimated size
    assert contract_service.input_size([tmp_path / "RC_2015-01.zst"]) == 1000 * contract_service.COMPRESSED[".zst"]
    cfg = load_config(None, []).ingest
    plan = plan_ingest([str(source)], tmp_path / "plan", cfg)
    read_bytes = sum(s.bytes for s in plan.sources)  # what the run counts
    read_files = [f for s in plan.sources for f in s.files]
    # a site of plain XML files: the XML limit decides; the other one is for compressed and other inputs
    monkeypatch.setattr(contract_service, "EARLY_START_MAX_XML_BYTES", read_bytes if early else read_bytes - 1)
    monkeypatch.setattr(contract_service, "EARLY_START_MAX_BYTES", 0)
    assert contract_service.start_early(read_files) is early
    with monkeypatch.context() as limits:  # an input that is not all XML files: the other limit decides
        limits.setattr(contract_service, "EARLY_START_MAX_BYTES", 8 * 1000)
        limits.setattr(contract_service, "EARLY_START_MAX_XML_BYTES", 1 << 40)
        assert contract_service.start_early([tmp_path / "RC_2015-01.zst"])  # 8,000 estimated bytes
        assert not contract_service.start_early([tmp_path / "RC_2015-01.zst", *read_files])
        assert contract_service.start_early(read_files)
    events: list[str] = []
    real_read, real_service = run_module.read_sources, contract_service.ContractService

    allocators: list = []

    class Recorded(real_service):
        def __init__(self, *args, **kwargs):
            events.append("contract worker")
            allocators.append(kwargs.get("arrow_allocator"))
            super().__init__(*args, **kwargs)

    def read(*args, **kwargs):
        events.append("read")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(contract_service, "ContractService", Recorded)
    monkeypatch.setattr(run_module, "read_sources", read)
    result = run([source], tmp_path / "w", "ingest.workers=2")
    assert events == (["contract worker", "read"] if early else ["read", "contract worker"])
    assert allocators == ["jemalloc"]  # a Stack Exchange build: its contract process on the faster allocator
    reference = run([source], tmp_path / "w1", "ingest.workers=1")
    assert digests(result) == digests(reference)


# -- what a worker hands the parent: posts and votes as an SQLite image ---------------------------
def _store_rows(store) -> tuple[list, list]:
    store.flush()
    posts = store.db.execute("SELECT * FROM posts ORDER BY rid").fetchall()
    votes = store.db.execute("SELECT * FROM votes ORDER BY site, post_id").fetchall()
    return posts, votes


def test_packed_ranges_load_the_same_store_as_replayed_calls(fixtures_dir, tmp_path):
    """Every range of a real site (posts with line numbers, quarantined rows, votes of several ranges on
    one post), replayed as calls and as packed images: the same rows, in the same order, the same sums."""
    from alignflow.tasks.ingest import ranges
    from alignflow.tasks.ingest.store import StagingStore

    site = fixtures_dir / "conlang.meta-2020"
    tasks = []
    for table in ("Votes", "Posts"):
        tasks += ranges.range_tasks(site.name, table, site / f"{table}.xml", f"{table}.xml", range_bytes=9_000,
                                    on_bad_row="quarantine", max_chars=20_000, max_row_bytes=1 << 20,
                                    start_index=len(tasks))
    assert sum(t.table == "Posts" for t in tasks) > 3 and sum(t.table == "Votes" for t in tasks) > 3
    stores = {}
    for mode in ("calls", "packed"):
        store = stores[mode] = StagingStore(tmp_path / f"{mode}.sqlite")
        replay = ranges.Replayer(store)
        for task in tasks:
            result = ranges.read_range(task)
            if mode == "packed":
                result = ranges.pack(result)
                assert result.shard is not None and not result.votes
                assert not [c for c in result.calls if c[0] == "post"]
            replay.apply(task, result)
    calls, packed = _store_rows(stores["calls"]), _store_rows(stores["packed"])
    assert len(calls[0]) > 100 and len(calls[1]) > 100
    second = next(t for t in tasks if t.table == "Posts" and not t.first)
    first_range_lines = (site / "Posts.xml").read_bytes()[:second.start].count(b"\n")
    assert max(r[-1] for r in calls[0]) > first_range_lines  # lines of later ranges, moved by their offset
    assert packed == calls
    assert stores["packed"].counts == stores["calls"].counts


def test_ingest_without_sqlite_images_gives_the_same_datasets(fixtures_dir, tmp_path, monkeypatch):
    """A Python whose SQLite cannot serialise a database replays the posts as calls: the same datasets."""
    from alignflow.tasks.ingest import store

    sources = [fixtures_dir / "conlang.meta-2020"]
    packed = run(sources, tmp_path / "a", "ingest.workers=1", "ingest.range_mb=0.02")
    monkeypatch.setattr(store, "SHARDS", False)
    plain = run(sources, tmp_path / "b", "ingest.workers=1", "ingest.range_mb=0.02")
    assert digests(plain) == digests(packed) and same_accounting(plain.report, packed.report)
    assert packed.datasets["posts"]["rows"] > 100
