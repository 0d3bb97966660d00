"""Ordinary Pushshift comments checked in C (``_fastreddit``) and zstd months decompressed by ``stream_reader``
give exactly what the reader gives without them."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading

import pytest
import zstandard

from alignflow.tasks.ingest import reddit_parallel
from alignflow.tasks.ingest.clean import clean_plain_text
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.lines import ZstdFramesReader, open_binary, zstd_frames_whole
from alignflow.tasks.ingest.reddit import read_reddit
from alignflow.tasks.ingest.records import ListSink

fast = pytest.importorskip("alignflow.tasks.ingest._fastreddit",
                           reason="built without a C compiler: the reader checks every line in Python")

# Values each field takes in the generated lines: the ordinary ones first (most lines), then every form the
# reader treats another way (an error, a quarantine, a conversion).
FIELDS = {
    "id": ["c{i}", " c{i} ", "", "   ", 17, None, True, ["x"], "c{i}\u00e9", "c\u3000{i}"],
    "parent_id": ["t3_p{q}", "t1_c{j}", " t3_p{q} ", "t3_", "t2_x", 5, None, "", "t1_\u00e9{j}"],
    "link_id": ["t3_p{q}", None, "t3_", "x", 7, " t3_p{q}\t", "t3_\u00e9", "\u3000t3_p{q}"],
    "subreddit": ["AskX", " AskX ", "", "  ", None, 3, "S\u00fcd"],
    "score": [3, -2, 0, 9223372036854775807, 9223372036854775808, -9223372036854775809, 12.0, 2.5, "7", "x",
              True, None, 10**30, "-07", "+7", " 7 ", "123456789012345678", "1234567890123456789", "1e3"],
    "ups": [None, 4, "4", 1.0],
    "created_utc": [1420070400, 1420070400.25, "1420070400", " 14 ", "", None, True, 1e300, 10**20,
                    -9223372036854775809, "1420070400.125", "-5", "1e9", "1_000", "nan", "0x10", "5."],
    "author": ["u{i}", "", None, 12, "\u00fcser", "[deleted]"],
    "distinguished": [None, "moderator", "", 0, 1, False, [], {"a": 1}],
    "body": ["answer {i} text", "  padded {i}\t\n", "line one\nline two", "two\n\nparas", "three\n\n\nnewlines",
             "trailing \nspace", "tab\t\nend", "x &amp; y &gt; z &lt; &quot;q&quot; &apos;a&apos;",
             "&amp;gt; once", "num &#33; &#x21; &#X7e; &#126;", "space &#32; ref", "nbsp&nbsp;x", "AMP &AMP; x",
             "bare & and &; and &#; and &#x; and &a; and &1a;", "long &#12345678; &#x1234567; ref",
             "&abcdefghijklmnopqrstuvwxyzabcdefg; long name", "ctrl \x0b x", "del \x7f x", "nul \x00 x",
             "cr \r\n x", "caf\u00e9 {i}", "cafÃ© mojibake", "[deleted]", " [removed] ", "[deleted] but more",
             "", "   ", None, 5, "&#10;&#10;", "&gt;", "a\u2028b", "\U0001f600 emoji"],
}


SUBMISSION_FIELDS = {
    **{k: FIELDS[k] for k in ("id", "subreddit", "score", "ups", "created_utc", "author")},
    "title": ["Why is {i}?", "  padded {i} ", "&amp; why &gt; {i}", "[deleted]", "[deleted by user]", " [removed] ",
              "", "   ", "caf\u00e9 {i}", "cr\r\ntitle", "&nbsp;x", None, 5, "\u3000[deleted]", "&#32;"],
    "selftext": ["Body {i} text", None, "", "  ", "[deleted]", " [removed]\n", "x &amp; y", "caf\u00e9",
                 "\u3000[deleted]", "a\r\nb", "three\n\n\nnl", 7, ["x"]],
}


def generated_lines(n: int, seed: int, fields: dict = FIELDS) -> list[bytes]:
    rnd = random.Random(seed)
    lines = []
    for i in range(n):
        obj = {}
        for key, values in fields.items():
            # three lines in four take each field's ordinary value; the others any value, or none
            value = values[0] if rnd.random() < 0.75 else rnd.choice(values + ["<absent>"])
            if value == "<absent>":
                continue
            if isinstance(value, str):
                value = value.format(i=i, j=i - 1, q=i % 7)
            obj[key] = value
        if rnd.random() < 0.05:
            obj["extra"] = {"nested": [1.5, {"deep": rnd.choice([1e19, -1e19, 2.0 ** 63, 1.0])}]}
        if rnd.random() < 0.3:
            obj = dict(reversed(list(obj.items())))
        lines.append(json.dumps(obj, ensure_ascii=rnd.random() < 0.5).encode())
    lines[3] = b"not json"
    lines[4] = b"[1, 2]"
    lines[5] = b'{"id": "x", "body": "\\ud800 lone"}'
    lines[6] = b""
    lines[7] = lines[8] + b"\r"
    return lines


def rows_of(image: bytes | None) -> dict[str, list[tuple]]:
    if image is None:
        return {}
    db = sqlite3.connect(":memory:")
    db.deserialize(image)
    tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {name: db.execute(f"SELECT * FROM {name} ORDER BY rowid").fetchall() for name in tables}


def parse(lines: list[bytes], *, pack: bool, with_replies: bool, kind: str = "comment"):
    task = ("RC_2015-01.zst", kind, 10, [b"\n".join(lines)], "cc-by", "quarantine", 1 << 20, with_replies, pack)
    (calls, counts, (posts, replies)), kind, non_blank = reddit_parallel.parse_chunk(task)
    return calls, counts, rows_of(posts), rows_of(replies), kind, non_blank


@pytest.mark.parametrize("kind", ["comment", "submission"])
@pytest.mark.parametrize("pack, images", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("with_replies", [True, False])
def test_fast_path_gives_what_the_reader_gives(monkeypatch, kind, pack, images, with_replies):
    """The reader alone (rows in Python lists, images by sqlite3) against the C checks, with the rows written
    into the images in C (``images``) or kept in the lists."""
    lines = generated_lines(3000, seed=11 + pack + 2 * with_replies,
                            fields=FIELDS if kind == "comment" else SUBMISSION_FIELDS)
    taken = []

    def counting(real):
        def wrapper(obj, *args):
            out = real(obj, *args)
            taken.append(out is not None)
            return out
        return wrapper

    with monkeypatch.context() as m:
        m.setattr(reddit_parallel, "_comment_fields", None)  # built without the C module: the reader alone
        m.setattr(reddit_parallel, "_Image", None)
        slow = parse(lines, pack=pack, with_replies=with_replies, kind=kind)
    for name in (f"_{kind}_fields", f"_store_{kind}"):
        monkeypatch.setattr(reddit_parallel, name, counting(getattr(reddit_parallel, name)))
    if not images:
        monkeypatch.setattr(reddit_parallel, "_Image", None)
    quick = parse(lines, pack=pack, with_replies=with_replies, kind=kind)
    assert quick == slow
    # both paths were exercised: most lines the fast one, a fair share the reader's
    assert 0.2 < sum(taken) / len(lines) < 0.9, sum(taken) / len(lines)
    calls, counts, *_ = slow
    assert counts["rows"] == len(lines) - 1  # the blank line is not a row
    assert {c[0] for c in calls} >= {"q"}


def test_an_image_holds_its_rows_in_order_with_their_types():
    image = fast.Image([("t", "a TEXT, b INT, c REAL, d TEXT"), ("u", "x INT")])
    image.add(0, ("one", 1, 1.5, None))
    image.add(0, ("two\x00nul", -(2 ** 63), 2.0, "caf\u00e9"))
    assert (image.rows(0), image.rows(1)) == (2, 0)
    with pytest.raises(ValueError, match="a row of 3 values for 4 columns"):
        image.add(0, ("x", 1, 2.0))
    with pytest.raises(TypeError, match="a row holds a list"):
        image.add(0, ("x", 1, 2.0, []))
    with pytest.raises(ValueError, match="no such table"):
        image.add(2, (1,))
    # the stores' rows go only into images of the stores' tables
    with pytest.raises(TypeError, match="Images of the stores' tables"):
        fast.store_comment({}, image, None, 1, "lic", "f", False)
    assert rows_of(image.serialize()) == {"t": [("one", 1, 1.5, None), ("two\x00nul", -(2 ** 63), 2.0, "caf\u00e9")],
                                          "u": []}


# bodies decided in C (the stripped text, the common references decoded) and bodies left to clean_plain_text
C_BODIES = ["answer text", "  padded\t\n", "line one\nline two", "two\n\nparas", "tab\tinside",
            "x &amp; y &gt; z &lt; &quot;q&quot; &apos;a&apos;", "&amp;gt; once", "num &#33; &#x21; &#X7e; &#126;",
            "&#0033;", "x&#x3C;y", "bare & and &; and &#; and &#x; and &a; and &1a;",
            "long &#12345678; &#x1234567; refs", "&abcdefghijklmnopqrstuvwxyzabcdefg; long name", "&gt;"]
PY_BODIES = ["three\n\n\nnewlines", "trailing \nspace", "tab\t\nend", "space &#32; ref", "nbsp&nbsp;x",
             "AMP &AMP; x", "ctrl \x0b x", "del \x7f x", "nul \x00 x", "cr \r\n x", "caf\u00e9", "cafÃ© mojibake",
             "&#10;&#10;x", "a\u2028b", "a\u00e9 &amp; b"]


def fields_of(body):
    return fast.comment_fields({"id": "c1", "parent_id": "t3_p", "subreddit": "s", "score": 1, "created_utc": 5,
                                "body": body})


@pytest.mark.parametrize("body", C_BODIES)
def test_a_body_decided_in_c_is_the_text_clean_plain_text_gives(body):
    fields = fields_of(body)
    assert fields[9] == 1 and fields[8] == clean_plain_text(body)


@pytest.mark.parametrize("body", PY_BODIES)
def test_other_bodies_are_left_to_clean_plain_text(body):
    fields = fields_of(body)
    assert fields[9] == 0 and fields[8] is body


@pytest.mark.parametrize("body", ["", "   ", "[deleted]", " [removed]\n", None, 5])
def test_a_body_the_reader_quarantines_or_refuses_is_not_taken(body):
    assert fields_of(body) is None


def test_fields_of_an_ordinary_submission():
    obj = {"id": "p1", "subreddit": "AskX", "score": 12, "created_utc": 1420070400.5, "author": "op",
           "title": " Why &amp; how? ", "selftext": "I looked.\nIt was &gt; blue."}
    assert fast.submission_fields(obj) == ("p1", "reddit/AskX", 12, 1420070400.5, "name:op", "Why & how?",
                                           "I looked.\nIt was > blue.", 1)
    assert fast.submission_fields(dict(obj, selftext=None))[6:] == ("", 1)  # a link post
    assert fast.submission_fields(dict(obj, selftext=" [removed] "))[6:] == ("", 1)
    assert fast.submission_fields(dict(obj, selftext="caf\u00e9"))[6:] == ("caf\u00e9", 0)  # cleaned in Python
    for title in ("[deleted by user]", "  ", "caf\u00e9", "a\r\nb", 5):
        assert fast.submission_fields(dict(obj, title=title)) is None


def test_fields_of_an_ordinary_comment():
    obj = {"id": " c9 ", "parent_id": "t1_c8", "link_id": "t3_p1", "subreddit": " AskX ", "score": -3,
           "created_utc": 1420070400, "author": "u", "distinguished": "moderator", "body": "  x &gt; y  "}
    assert fast.comment_fields(obj) == ("c9", "t1_c8", "p1", "reddit/AskX", -3, 1420070400.0, "name:u", 1,
                                        "x > y", 1, 1)
    top = dict(obj, parent_id="t3_p1", link_id=None, score=None, ups=4, author="", distinguished=None)
    assert fast.comment_fields(top) == ("c9", "t3_p1", "p1", "reddit/AskX", 4, 1420070400.0, "", 0,
                                        "x > y", 1, 0)
    reply_without_link = dict(obj, link_id=7)
    assert fast.comment_fields(reply_without_link)[2] == ""
    # numbers written as strings in their plain form are converted as the reader converts them
    strings = fast.comment_fields(dict(obj, score="-12", created_utc=" 1420070400.25"))
    assert strings[4:6] == (-12, 1420070400.25)
    for score in ("+12", "1_2", "12.0", "", "1234567890123456789", " ", "\u0663"):
        assert fast.comment_fields(dict(obj, score=score)) is None, score
    for created in ("1e9", "1_000", ".5", "5.", "nan", "-", "1.2.3"):
        assert fast.comment_fields(dict(obj, created_utc=created)) is None, created
    assert fast.comment_fields([obj]) is None
    assert fast.comment_fields(dict(obj, extra=[{"a": [2.0 ** 63]}])) is None  # a 64-bit overflow, as orjson reads it
    deep = 1.0
    for _ in range(300):
        deep = [deep]
    assert fast.comment_fields(dict(obj, extra=deep)) is None  # too deep to check in C: the reader decides


# --------------------------------------------------------------------------- zstd months


def frames(*parts: bytes, **kw) -> bytes:
    return b"".join(zstandard.ZstdCompressor(**kw).compress(p) for p in parts)


def payload(n: int, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    return b"".join(json.dumps({"id": f"c{i}", "body": "w" * rnd.randrange(0, 400)}).encode() + b"\n"
                    for i in range(n))


@pytest.mark.parametrize("kw", [{}, {"write_checksum": True}, {"write_content_size": False},
                                {"level": 19, "write_checksum": True}, {"write_dict_id": False}])
def test_whole_frames_are_read_by_the_stream_reader_and_give_the_same_bytes(tmp_path, kw):
    data = [payload(3000, 1), payload(10, 2), b"", payload(2000, 3)]
    path = tmp_path / "RC_2015-01.zst"
    path.write_bytes(frames(*data, **kw))
    with open(path, "rb") as fh:
        assert zstd_frames_whole(fh)
    with open_binary(path) as stream:
        assert isinstance(stream.raw, zstandard.ZstdDecompressionReader)
        assert stream.read() == b"".join(data)


def test_long_window_and_rle_blocks_are_whole_frames_and_read_calls_stay_bounded(tmp_path):
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True)
    path = tmp_path / "RC_2015-02.zst"
    path.write_bytes(zstandard.ZstdCompressor(compression_params=params).compress(b"\0" * (64 << 20) + payload(50)))
    assert path.stat().st_size < 64 << 10
    with open(path, "rb") as fh:
        assert zstd_frames_whole(fh)
    total = biggest = 0
    with open_binary(path) as stream:
        while block := stream.read1(1 << 20):
            total, biggest = total + len(block), max(biggest, len(block))
    assert total == (64 << 20) + len(payload(50)) and biggest <= 1 << 20


def test_anything_but_whole_frames_goes_to_the_frame_reader(tmp_path):
    whole = frames(payload(3000, 1), payload(2000, 2), write_checksum=True)
    expected = payload(3000, 1) + payload(2000, 2)
    first_frame = len(frames(payload(3000, 1), write_checksum=True))
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd"
    cases = {
        "garbage after": whole + b"garbage",
        "a skippable frame": skippable + whole,
        "not zstd": b"this is not zstd at all\n",
        "a lone magic": b"\x28\xb5\x2f\xfd",
    }
    for cut in range(1, len(whole), max(1, len(whole) // 97)):
        if cut != first_frame:
            cases[f"cut at {cut}"] = whole[:cut]
    for name, data in cases.items():
        path = tmp_path / "case.zst"
        path.write_bytes(data)
        with open(path, "rb") as fh:
            assert not zstd_frames_whole(fh), name
        with open_binary(path) as stream:
            assert isinstance(stream.raw, ZstdFramesReader), name
            out = b""
            try:
                while block := stream.read1(1 << 16):
                    out += block
            except Exception:  # noqa: BLE001 - the frame reader's error for what it is; the bytes before it count
                pass
            # read from the file's first byte: what came out is the start of what went in, and past the middle
            # of the file many blocks came out before the error
            assert expected.startswith(out), name
            if name == "garbage after" or name.startswith("cut") and int(name[7:]) > len(whole) // 2:
                assert len(out) > len(expected) // 4, name
    path.write_bytes(whole[:first_frame])  # cut at a frame's end: a shorter file of whole frames
    with open(path, "rb") as fh:
        assert zstd_frames_whole(fh)


def test_a_cut_month_still_says_truncated_and_a_corrupt_block_names_its_line(tmp_path):
    data = payload(4000, 5)
    whole = frames(data, write_checksum=True)
    cut = tmp_path / "RC_2015-03.zst"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(IngestError, match="truncated zstd stream"):
        read_reddit(cut, ListSink(), on_bad_row="quarantine", workers=2)
    # framing intact, a block's bytes changed: the decompressor (or the checksum) refuses it
    bad = bytearray(whole)
    for k in range(len(bad) // 2, len(bad) // 2 + 8):
        bad[k] ^= 0x5A
    corrupt = tmp_path / "RC_2015-04.zst"
    corrupt.write_bytes(bytes(bad))
    for workers in (1, 2):
        with pytest.raises(IngestError, match="zstd") as exc:
            read_reddit(corrupt, ListSink(), on_bad_row="quarantine", workers=workers)
        assert "RC_2015-04.zst" in str(exc.value) and exc.value.line >= 1


def test_a_month_read_from_a_pipe_goes_to_the_frame_reader(tmp_path):
    data = payload(500, 9)
    fifo = tmp_path / "RC_2015-05.zst"
    os.mkfifo(fifo)
    compressed = frames(data)

    def feed():
        with open(fifo, "wb") as out:
            out.write(compressed)

    writer = threading.Thread(target=feed)
    writer.start()
    with open_binary(fifo) as stream:
        assert isinstance(stream.raw, ZstdFramesReader) and stream.read() == data
    writer.join()
