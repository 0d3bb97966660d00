"""Reddit and already-paired inputs through the whole build (store, pairing, contracts, report)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import zstandard

from alignflow.config import load_config
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.run import detect_format, execute_ingest, plan_ingest


def ingest(tmp_path, *sources, overrides=(), fmt=None):
    cfg = load_config(None, list(overrides)).ingest
    return execute_ingest(plan_ingest([str(s) for s in sources], tmp_path / "work", cfg, fmt), cfg)


def write_jsonl(path: Path, objs, *, zst=False) -> Path:
    data = "".join(json.dumps(o) + "\n" for o in objs).encode()
    if zst:
        params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
        path.write_bytes(zstandard.ZstdCompressor(compression_params=params).compress(data))
    else:
        path.write_bytes(data)
    return path


def submission(pid, score=50, author="op"):
    return {"id": pid, "title": f"Why is {pid} so &amp; odd?", "selftext": "Context\r\nhere", "score": score,
            "num_comments": 4, "subreddit": "askscience", "created_utc": 1_600_000_000, "over_18": False,
            "author": author}


def comment(cid, post, score, t, author="u", body=None, parent=None, distinguished=None):
    return {"id": cid, "parent_id": parent or f"t3_{post}", "link_id": f"t3_{post}", "subreddit": "askscience",
            "subreddit_id": "t5_2qm4e", "author": author, "body": body or f"Answer {cid} &gt; quoted",
            "score": score, "ups": score, "created_utc": t, "edited": False, "controversiality": 0, "gilded": 0,
            "distinguished": distinguished, "stickied": False, "retrieved_on": t + 100}


@pytest.mark.parametrize("zst", [False, True])
def test_reddit_submissions_and_comments_make_shp_pairs(tmp_path, zst):
    ext = ".zst" if zst else ".jsonl"
    rs = write_jsonl(tmp_path / f"RS_2015-01{ext}", [submission("p1"), submission("p2", score=3)], zst=zst)
    rc = write_jsonl(tmp_path / f"RC_2015-01{ext}", [
        comment("c1", "p1", 4, 100),
        comment("c2", "p1", 20, 200),  # later and 5x the score of c1 -> c2 > c1
        comment("c3", "p1", 9, 50),  # beats c1 but was written before it: c3 > c1 fails "written later"
        comment("c4", "p1", 30, 300, author="op"),  # the post's author: dropped
        comment("c5", "p1", 5, 400, body="[deleted]"),  # quarantined
        comment("r1", "p1", 99, 500, parent="t1_c1"),  # a reply: skipped
        comment("c6", "p2", 10, 100), comment("c7", "p2", 40, 200),  # post score 3 < 10: no pairs
        comment("c8", "p9", 10, 100),  # its submission is not in the input: counted, not paired
    ], zst=zst)
    result = ingest(tmp_path, rs, rc)
    assert result.report["adds_up"]
    pairs = pd.read_parquet(result.datasets["pairs"]["path"])
    got = sorted(zip(pairs.chosen_id, pairs.rejected_id))
    assert ("c2", "c1") in got and ("c2", "c3") in got and ("c3", "c1") not in got
    assert all("c4" not in p for p in got) and all(p[0] != "c6" and p[1] != "c6" for p in got)
    assert (pairs.site == "reddit/askscience").all() and (pairs.source == "reddit").all()
    assert "&amp;" not in pairs.prompt.iloc[0] and "&" in pairs.prompt.iloc[0]
    q = pd.read_parquet(result.datasets["quarantine"]["path"])
    assert sorted(q.reason) == ["deleted_body", "orphan_answer"]
    rc_counts = result.report["files"][str(rc)]
    assert rc_counts["rows"] == 9 and rc_counts["skipped:reply"] == 1 and rc_counts["adds_up"]


def test_pairs_jsonl_and_parquet(tmp_path):
    rows = [{"prompt": "P1", "chosen": "good", "rejected": "bad"},
            {"prompt": "P1", "chosen": "better", "rejected": "bad"},
            {"prompt": "P2", "chosen": "yes", "rejected": "no", "chosen_score": 3, "rejected_score": 1},
            {"prompt": "P2", "chosen": "same", "rejected": "same"}]
    jl = write_jsonl(tmp_path / "mine.jsonl", rows)
    pq_path = tmp_path / "theirs.parquet"
    pd.DataFrame(rows[:3]).to_parquet(pq_path)
    assert detect_format(jl) == "pairs" and detect_format(pq_path) == "pairs"
    result = ingest(tmp_path, jl, pq_path)
    pairs = pd.read_parquet(result.datasets["pairs"]["path"])
    assert len(pairs) == 6 and set(pairs.site) == {"mine", "theirs"}
    # All pairs of one prompt share a split.
    assert (pairs.groupby(["site", "question_id"]).split.nunique() == 1).all()
    q = pd.read_parquet(result.datasets["quarantine"]["path"])
    assert list(q.reason) == ["identical_texts"]
    assert result.datasets["prompts"]["rows"] == 4


def test_pairs_file_missing_a_column_fails_with_its_name(tmp_path):
    bad = tmp_path / "bad.parquet"
    pd.DataFrame([{"prompt": "p", "chosen": "c"}]).to_parquet(bad)
    with pytest.raises(IngestError, match="rejected"):
        ingest(tmp_path, bad)
    assert not (tmp_path / "work" / "data" / "ingest" / "LATEST").exists()


def test_json_line_that_is_not_json(tmp_path):
    f = tmp_path / "RC_2015-01.jsonl"
    f.write_text(json.dumps(comment("c1", "p1", 4, 100)) + "\n{not json\n")
    with pytest.raises(IngestError, match=r"RC_2015-01.jsonl, line 2"):
        ingest(tmp_path, f)


def test_truncated_zst_is_an_error(tmp_path):
    f = write_jsonl(tmp_path / "RC_2015-01.zst", [comment(f"c{i}", "p1", i, i) for i in range(2000)], zst=True)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(IngestError, match="truncated"):
        ingest(tmp_path, f)


def test_unknown_jsonl_keys_ask_for_a_format(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"a": 1}])
    with pytest.raises(IngestError, match="--format"):
        detect_format(f)
