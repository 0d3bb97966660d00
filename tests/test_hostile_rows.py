"""Hostile rows in every source: bombs, bad numbers, bad text. Each is quarantined (or refused) and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import zstandard

from alignflow.config import IngestConfig
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.paired import read_pairs_file
from alignflow.tasks.ingest.records import ListSink
from alignflow.tasks.ingest.reddit import iter_text_lines, read_reddit
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest


def zst_bomb(path: Path, before: list[str], line_bytes: int, after: list[str]) -> Path:
    """A .zst of a few KB holding one JSON line of ``line_bytes`` bytes between ordinary lines."""
    cctx = zstandard.ZstdCompressor(level=19)
    with open(path, "wb") as fh, cctx.stream_writer(fh, closefd=False) as w:
        w.write(("\n".join(before) + "\n").encode())
        w.write(b'{"id": "bomb", "body": "')
        block = b"x" * (1 << 20)
        left = line_bytes - 30
        while left > 0:
            w.write(block[:left])
            left -= len(block)
        w.write(b'"}\n')
        w.write(("\n".join(after) + "\n").encode())
    return path


def comment(i: int, **kw) -> str:
    row = {"id": f"c{i}", "parent_id": "t3_p", "link_id": "t3_p", "subreddit": "test", "score": 3,
           "created_utc": 1_400_000_000 + i, "body": f"comment {i}", "author": f"u{i}"}
    row.update(kw)
    return json.dumps(row)


def test_zstd_line_bomb_is_quarantined_with_its_first_bytes(tmp_path):
    path = zst_bomb(tmp_path / "RC_2015-01.zst", [comment(1)], 64 << 20, [comment(2), comment(3)])
    assert path.stat().st_size < 64 << 10
    sink = ListSink()
    read_reddit(path, sink, max_line_bytes=1 << 20)
    assert [c.post_id for c in sink.posts] == ["c1", "c2", "c3"]
    (q,) = sink.quarantined
    assert (q["reason"], q["line"]) == ("too_large", 2) and q["raw"].startswith('{"id": "bomb"') and len(q["raw"]) == 200
    assert sink.counts[(str(path), "rows")] == 4


@pytest.mark.parametrize("size", [1023, 1024, 1025, 5000])
def test_line_limit_boundary(tmp_path, size):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"a" * (size - 1) + b"\n" + b"short\n")
    lines = list(iter_text_lines(path, max_line_bytes=1024))
    assert [type(t).__name__ for _, t in lines] == (["str", "str"] if size - 1 <= 1024 else ["OversizedLine", "str"])
    assert lines[1] == (2, "short")


def test_zstd_decompression_output_is_bounded_per_call(tmp_path):
    """A zstd stream of RLE blocks (a few bytes each, 128 KiB out each) never yields more than 16 MiB at once."""
    from alignflow.tasks.ingest.reddit import ZstdFramesReader

    data = zstandard.ZstdCompressor(level=1).compress(b"\0" * (256 << 20))
    src = tmp_path / "zeros.zst"
    src.write_bytes(data)
    reader = ZstdFramesReader(open(src, "rb"))
    biggest = total = 0
    while out := reader._decompress_more() if not reader._done else b"":
        biggest, total = max(biggest, len(out)), total + len(out)
    reader.close()
    assert total == 256 << 20 and biggest <= 16 << 20


def pairs_rows() -> list[str]:
    good = [json.dumps({"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}",
                        "chosen_score": 5, "rejected_score": 1}) for i in range(6)]
    return good[:2] + [
        json.dumps({"prompt": "mislabelled?", "chosen": "worse", "rejected": "better", "chosen_score": 1,
                    "rejected_score": 5}),
        json.dumps({"prompt": "long " * 10_000, "chosen": "a", "rejected": "b"}),
        '{"prompt": "inf?", "chosen": "a", "rejected": "b", "chosen_score": Infinity, "rejected_score": 1}',
        '{"prompt": "surrogate?", "chosen": "\\ud800", "rejected": "b"}',
    ] + good[2:]


def test_pairs_file_bad_rows_are_quarantined_and_counted(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(pairs_rows()) + "\n")
    cfg = IngestConfig(on_bad_row="quarantine")
    result = execute_ingest(plan_ingest([path], tmp_path / "work", cfg), cfg)
    entry = result.report["files"][str(path)]
    assert entry["adds_up"] and entry["rows"] == 10
    assert entry["kept:pair"] == 6
    q = pq.read_table(Path(result.out_dir) / "quarantine.parquet").to_pylist()
    by_line = {}
    for r in q:
        by_line.setdefault(r["line"], []).append(r["reason"])
    assert by_line[3] == ["contract:pairs"]  # chosen_score <= rejected_score
    assert "contract:pairs" in by_line[4]  # prompt over the length limit (its prompt row is derived)
    assert by_line[5] == ["bad_value"] and by_line[6] == ["bad_value"]
    assert entry["quarantined:contract:pairs"] == 2 and entry["quarantined:bad_value"] == 2
    assert all(len(r["detail"]) < 1000 for r in q)


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": Infinity}', "not a finite number"),
    ('{"prompt": "p", "chosen": "\\udfff x", "rejected": "b"}', "unpaired surrogate"),
])
def test_pairs_bad_values_are_one_line_errors_by_default(tmp_path, line, reason):
    path = tmp_path / "pairs.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(IngestError, match=rf"pairs.jsonl, line 1.*{reason}"):
        read_pairs_file(path, ListSink())


def test_reddit_lone_surrogate_and_huge_score(tmp_path):
    path = tmp_path / "RC_2015-02.jsonl"
    path.write_text("\n".join([comment(1, body="\ud800 x".encode("utf-8", "surrogatepass").decode("utf-8", "replace")),
                               comment(2).replace('"body": "comment 2"', '"body": "\\ud800"'),
                               comment(3, score=2**63), comment(4, score=-(2**63)), comment(5)]) + "\n")
    sink = ListSink()
    read_reddit(path, sink, on_bad_row="quarantine")
    assert [p.post_id for p in sink.posts] == ["c1", "c4", "c5"]
    assert [(q["line"], q["reason"]) for q in sink.quarantined] == [(2, "bad_value"), (3, "bad_value")]


POSTS = (b'<posts>\n<row Id="1" PostTypeId="1" Score="3" Title="Q" Body="q" />\n'
         b'<row Id="2" PostTypeId="2" ParentId="1" Score="2" Body="a" />\n'
         b'<row Id="3" PostTypeId="2" ParentId="1" Score="1" Body="b" />\n</posts>\n')


@pytest.mark.parametrize("old, new, field", [
    (b'Score="2"', b'Score="9223372036854775808"', "Score"),
    (b'Score="2"', b'Score="-9223372036854775809"', "Score"),
    (b'Id="2"', "Id=\"\u0661\u0662\"".encode(), "Id"),
    (b'Id="2"', "Id=\"\u00b9\"".encode(), "Id"),
    (b'ParentId="1"', "ParentId=\"\u0661\"".encode(), "ParentId"),
    (b'Score="2"', b'Score="1_000"', "Score"),
])
def test_stackexchange_integers_are_ascii_and_64_bit(tmp_path, old, new, field):
    site = tmp_path / "site"
    site.mkdir()
    (site / "Posts.xml").write_bytes(POSTS.replace(old, new, 1))
    cfg = IngestConfig()
    with pytest.raises(IngestError, match=rf"Posts.xml, line 3, .*field {field}"):
        execute_ingest(plan_ingest([site], tmp_path / "work", cfg), cfg)
    cfg = IngestConfig(on_bad_row="quarantine")
    result = execute_ingest(plan_ingest([site], tmp_path / "work2", cfg), cfg)
    (entry,) = result.report["files"].values()
    assert entry["adds_up"] and entry["quarantined:malformed_row"] == 1


def test_votes_with_non_ascii_digits_are_bad_rows(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "Posts.xml").write_bytes(POSTS)
    (site / "Votes.xml").write_bytes("<votes>\n<row Id=\"1\" PostId=\"\u0662\" VoteTypeId=\"2\" />\n</votes>\n".encode())
    cfg = IngestConfig()
    with pytest.raises(IngestError, match=r"Votes.xml, line 2, .*field PostId"):
        execute_ingest(plan_ingest([site], tmp_path / "work", cfg), cfg)


def _archive(path: Path, data: bytes, name: str = "Posts.xml") -> Path:
    import py7zr

    with py7zr.SevenZipFile(path, "w") as z:
        z.writestr(data, name)
    return path


def test_7z_decompression_stops_at_the_first_error(tmp_path, monkeypatch):
    import py7zr.py7zr as core

    rows = b'<row Id="9" PostTypeId="1" Score="1" Title="t" Body="b" />\n' * ((4 << 20) // 60)
    data = b'<!-- x --><!DOCTYPE posts [<!ENTITY e "E">]>\n<posts>\n' + rows * 16 + b"</posts>\n"
    path = _archive(tmp_path / "s.stackexchange.com.7z", data)
    chunks = []
    real = core.calculate_crc32
    monkeypatch.setattr(core, "calculate_crc32", lambda data, value=0: (chunks.append(len(data)), real(data, value))[1])
    cfg = IngestConfig()
    with pytest.raises(IngestError, match=r"s.stackexchange.com.7z!Posts.xml, line 2: document type declaration"):
        execute_ingest(plan_ingest([path], tmp_path / "work", cfg), cfg)
    assert len(data) > 60 << 20 and sum(chunks) <= 8 << 20  # one or two chunks of the 64 MiB member


def test_7z_attribute_bomb_is_quarantined(tmp_path):
    body = b"x" * (40 << 20)
    data = (b'<posts>\n<row Id="1" PostTypeId="1" Score="3" Title="Q" Body="q" />\n'
            b'<row Id="2" PostTypeId="2" ParentId="1" Score="2" Body="' + body + b'" />\n'
            b'<row Id="3" PostTypeId="2" ParentId="1" Score="1" Body="b" />\n'
            b'<row Id="4" PostTypeId="2" ParentId="1" Score="0" Body="c" />\n</posts>\n')
    path = _archive(tmp_path / "s.stackexchange.com.7z", data)
    assert path.stat().st_size < 1 << 20
    cfg = IngestConfig()
    result = execute_ingest(plan_ingest([path], tmp_path / "work", cfg), cfg)
    (entry,) = result.report["files"].values()
    assert entry["adds_up"] and entry["rows"] == 4 and entry["quarantined:too_large"] == 1
    q = pq.read_table(Path(result.out_dir) / "quarantine.parquet").to_pylist()
    assert [(r["row_id"], r["line"], len(r["raw"])) for r in q] == [("2", 3, 200)]


def test_header_encrypted_archive_message(tmp_path):
    import py7zr

    path = tmp_path / "s.7z"
    with py7zr.SevenZipFile(path, "w", password="pw", header_encryption=True) as z:
        z.writestr(b"<posts/>", "Posts.xml")
    cfg = IngestConfig()
    with pytest.raises(IngestError) as err:
        plan_ingest([path], tmp_path / "work", cfg)
    assert str(err.value).endswith("encrypted archive: alignflow cannot read password-protected dumps")
