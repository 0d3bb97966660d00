"""Ingest of the real Stack Exchange dumps in tests/fixtures, with hand-verified counts.

The expected figures were counted independently of alignflow, with a plain
xml.etree pass over the fixture files (questions, answers, answer pairs, votes
on posts absent from Posts.xml), and agree with the fixtures' README.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import py7zr
import pytest

from alignflow.config import load_config
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.run import execute_ingest, latest_datasets, plan_ingest


def ingest(tmp_path: Path, *sources, overrides=(), workdir=None, fmt=None):
    cfg = load_config(None, list(overrides)).ingest
    plan = plan_ingest([str(s) for s in sources], workdir or tmp_path / "work", cfg, fmt)
    return execute_ingest(plan, cfg)


def frames(result) -> dict[str, pd.DataFrame]:
    return {k: pd.read_parquet(v["path"]) for k, v in result.datasets.items()}


def test_conlang_2020_with_votes(fixtures_dir, tmp_path):
    result = ingest(tmp_path, fixtures_dir / "conlang.meta-2020")
    r = result.report
    posts_file = str(fixtures_dir / "conlang.meta-2020" / "Posts.xml")
    votes_file = str(fixtures_dir / "conlang.meta-2020" / "Votes.xml")
    assert r["adds_up"]
    assert r["files"][posts_file] == {
        "rows": 177, "accounted": 177, "adds_up": True, "kept:question": 54, "kept:answer": 115,
        "skipped:tag_wiki": 4, "skipped:tag_wiki_excerpt": 4,
    }
    # 1,119 votes: 25 of other types (favourites, closes, ...); of the up/down/accept votes,
    # 18 point at posts missing from Posts.xml (deleted).
    assert r["files"][votes_file] == {
        "rows": 1119, "accounted": 1119, "adds_up": True, "skipped:other_vote_type": 25,
        "kept:votes_on_posts_read": 1076, "dropped:votes_on_posts_not_kept": 18,
    }
    assert r["score_source"] == {"conlang.meta-2020": "votes"}
    # 29 questions with 2+ answers -> 187 answer pairs; 62 tie on pm_score; 125 left, 51 over the cap of 10.
    assert r["pairs"] == {"candidates": 187, "dropped:tie": 62, "dropped:capped": 51, "kept": 74}
    assert result.datasets["posts"]["rows"] == 169
    assert result.datasets["prompts"]["rows"] == 54
    assert result.datasets["demos"]["rows"] == 48
    assert result.datasets["quarantine"]["rows"] == 0
    f = frames(result)
    pairs = f["pairs"]
    assert (pairs.chosen_score > pairs.rejected_score).all()
    assert (pairs.chosen != pairs.rejected).all()
    assert pairs.pair_id.is_unique
    assert pairs.groupby("question_id").size().max() <= 10
    # Attribution kept: authors by id or display name, licences as written in the dump.
    posts = f["posts"]
    assert set(posts.license) == {"CC BY-SA 3.0", "CC BY-SA 4.0"}
    assert (posts.author.str.startswith("name:")).sum() == 6
    assert (posts[posts.kind == "answer"].score < 0).sum() == 14
    # Tags in the pre-2024 <a><b> format come out as a|b.
    q1 = posts[(posts.kind == "question") & (posts.post_id == "1")].iloc[0]
    assert "<" not in q1.tags and "|" in q1.tags or q1.tags


def test_conlang_scores_from_score_without_votes(fixtures_dir, tmp_path):
    result = ingest(tmp_path, fixtures_dir / "conlang.meta-2020", overrides=["ingest.score_source=score"])
    assert result.report["score_source"] == {"conlang.meta-2020": "score"}
    # From Score alone 132 pairs differ in pm_score; capped at 10 per question -> 75.
    assert result.report["pairs"]["kept"] == 75
    assert result.report["pairs"]["dropped:tie"] == 187 - 132
    assert not any("Votes.xml" in f for f in result.report["files"])


def test_datascience_2024_pipe_tags_and_out_of_order_rows(fixtures_dir, tmp_path):
    result = ingest(tmp_path, fixtures_dir / "datascience.meta-2024" / "Posts.xml")
    r = result.report
    posts_file = str(fixtures_dir / "datascience.meta-2024" / "Posts.xml")
    assert r["files"][posts_file] == {
        "rows": 624, "accounted": 624, "adds_up": True, "kept:question": 257, "kept:answer": 341,
        "skipped:tag_wiki": 13, "skipped:tag_wiki_excerpt": 13,
    }
    assert r["score_source"] == {"datascience.meta-2024": "score"}
    # 74 questions with 2+ answers -> 310 answer pairs; 182 differ in pm_score; 165 after the cap.
    assert r["pairs"] == {"candidates": 310, "dropped:tie": 128, "dropped:capped": 17, "kept": 165}
    assert result.datasets["demos"]["rows"] == 199
    posts = frames(result)["posts"]
    q6 = posts[(posts.post_id == "6") & (posts.kind == "question")].iloc[0]
    assert q6.tags == "feature-request|status-completed"
    assert "$\\sqrt{2}$" in q6.body
    # Every answer found its question although all answers come after all questions.
    answers = posts[posts.kind == "answer"]
    assert set(answers.question_id) <= set(posts[posts.kind == "question"].post_id)


def test_two_sites_in_one_run_keep_their_site(fixtures_dir, tmp_path):
    result = ingest(tmp_path, fixtures_dir / "conlang.meta-2020", fixtures_dir / "datascience.meta-2024")
    pairs = frames(result)["pairs"]
    assert pairs.groupby("site").size().to_dict() == {"conlang.meta-2020": 74, "datascience.meta-2024": 165}
    assert result.report["adds_up"]


def test_split_hygiene_no_question_in_two_splits(fixtures_dir, tmp_path):
    result = ingest(tmp_path, fixtures_dir / "conlang.meta-2020", fixtures_dir / "datascience.meta-2024")
    for kind, df in frames(result).items():
        if kind == "quarantine" or df.empty:
            continue
        per_question = df.groupby(["site", "question_id"])["split"].nunique()
        assert (per_question == 1).all(), kind
    f = frames(result)
    # The same question gets the same split in every dataset.
    merged = f["pairs"][["site", "question_id", "split"]].drop_duplicates().merge(
        f["prompts"][["site", "question_id", "split"]], on=["site", "question_id"], suffixes=("_p", "_q"))
    assert (merged.split_p == merged.split_q).all()


def test_rerun_is_a_cache_hit_with_identical_files(fixtures_dir, tmp_path):
    first = ingest(tmp_path, fixtures_dir / "conlang.meta-2020")
    second = ingest(tmp_path, fixtures_dir / "conlang.meta-2020")
    assert not first.cache_hit and second.cache_hit
    assert first.datasets == second.datasets
    # A fresh work directory rebuilds from scratch: byte-identical outputs (same digests).
    third = ingest(tmp_path, fixtures_dir / "conlang.meta-2020", workdir=tmp_path / "other")
    assert not third.cache_hit
    assert {k: v["digest"] for k, v in third.datasets.items()} == {k: v["digest"] for k, v in first.datasets.items()}
    # A config change is new work.
    fourth = ingest(tmp_path, fixtures_dir / "conlang.meta-2020", overrides=["ingest.max_pairs_per_question=5"])
    assert not fourth.cache_hit and fourth.datasets["pairs"]["rows"] < first.datasets["pairs"]["rows"]
    assert latest_datasets(tmp_path / "work") == Path(fourth.out_dir)


def test_pair_cap_override(fixtures_dir, tmp_path):
    result = ingest(tmp_path, fixtures_dir / "conlang.meta-2020", overrides=["ingest.max_pairs_per_question=1000"])
    assert result.report["pairs"]["kept"] == 125 and result.report["pairs"]["dropped:capped"] == 0


def test_prompt_template_is_applied_everywhere(fixtures_dir, tmp_path):
    result = ingest(tmp_path, fixtures_dir / "conlang.meta-2020", overrides=["ingest.prompt_template=Q [{site}]: {title}\n"])
    f = frames(result)
    for kind in ("pairs", "demos", "prompts"):
        assert f[kind].prompt.str.startswith("Q [conlang.meta-2020]: ").all(), kind


def _conlang_archive(fixtures_dir: Path, archive: Path, posts: bytes | None = None) -> Path:
    with py7zr.SevenZipFile(archive, "w") as z:
        for name in ("Posts.xml", "Votes.xml", "Comments.xml"):
            if name == "Posts.xml" and posts is not None:
                z.writestr(posts, name)
            else:
                z.write(fixtures_dir / "conlang.meta-2020" / name, arcname=name)
    return archive


def _decompressed(result) -> bool:
    """Whether the ingest decompressed archive tables to read them in ranges (else: streamed them)."""
    seconds = json.loads((Path(result.out_dir) / "profile.json").read_text())["seconds"]
    return "read: decompress archive tables (its thread's CPU)" in seconds


def test_7z_archive_tables_are_read_in_ranges_with_the_streamed_datasets(fixtures_dir, tmp_path, monkeypatch):
    """A dump as published: its archive's tables are decompressed beside the staging store and read in byte
    ranges on the workers; the datasets and report are those of the tables streamed out of the archive (too
    little free disk), with 1 worker or 3, and no decompressed copy is left behind."""
    from alignflow.tasks.ingest import run as run_module

    archive = _conlang_archive(fixtures_dir, tmp_path / "conlang.meta.stackexchange.com.7z")
    one = ingest(tmp_path / "one", archive, overrides=["ingest.workers=1"])
    many = ingest(tmp_path / "many", archive, overrides=["ingest.workers=3", "ingest.range_mb=0.02"])
    monkeypatch.setattr(run_module, "SPOOL_FREE_MARGIN", 1 << 62)  # no disk has that much free: streamed
    streamed = ingest(tmp_path / "streamed", archive, overrides=["ingest.workers=3", "ingest.range_mb=0.02"])
    assert _decompressed(one) and _decompressed(many) and not _decompressed(streamed)
    digests = [{k: v["digest"] for k, v in r.datasets.items()} for r in (one, many, streamed)]
    assert digests[0] == digests[1] == digests[2]
    keys = ("files", "pairs", "datasets", "score_source", "adds_up")  # the contracts' part holds timings
    assert [{k: r.report[k] for k in keys} for r in (one, many)] == [{k: streamed.report[k] for k in keys}] * 2
    assert many.report["pairs"]["kept"] == 74
    assert many.report["score_source"] == {"conlang.meta.stackexchange.com": "votes"}
    assert many.report["files"][f"{archive}!Posts.xml"]["rows"] == 177
    workers = json.loads((Path(many.out_dir) / "profile.json").read_text())["seconds"]
    assert workers["read: Posts.xml CPU (worker seconds)"] > 0
    for work in ("one", "many"):
        assert not list((tmp_path / work).rglob("*.spool.xml*"))


def test_an_archives_tables_are_decompressed_in_one_pass(fixtures_dir, tmp_path, monkeypatch):
    """A site's archive is one solid stream, Votes.xml after Posts.xml: reading the tables one at a time
    decompressed Posts.xml twice (once to reach Votes.xml). One pass decompresses each byte once."""
    import py7zr.py7zr as core

    archive = _conlang_archive(fixtures_dir, tmp_path / "conlang.meta.stackexchange.com.7z")
    with py7zr.SevenZipFile(archive) as z:
        sizes = {i.filename: i.uncompressed for i in z.list()}
    decompressed = []
    real = core.calculate_crc32
    monkeypatch.setattr(core, "calculate_crc32", lambda data, value=0: (decompressed.append(len(data)),
                                                                         real(data, value))[1])
    result = ingest(tmp_path, archive, overrides=["ingest.workers=2"])
    assert _decompressed(result) and result.report["pairs"]["kept"] == 74
    assert sum(decompressed) <= sum(sizes.values()) < sizes["Posts.xml"] * 2 + sizes["Votes.xml"]


def test_an_error_in_a_7z_table_is_the_same_read_in_ranges_or_streamed(fixtures_dir, tmp_path, monkeypatch):
    from alignflow.tasks.ingest import run as run_module

    lines = (fixtures_dir / "conlang.meta-2020" / "Posts.xml").read_bytes().splitlines(keepends=True)
    lines[150] = lines[150].replace(b'Score="', b"Score=", 1)
    archive = _conlang_archive(fixtures_dir, tmp_path / "conlang.meta.stackexchange.com.7z", b"".join(lines))
    with pytest.raises(IngestError) as ranged:
        ingest(tmp_path / "ranged", archive, overrides=["ingest.workers=3", "ingest.range_mb=0.02"])
    monkeypatch.setattr(run_module, "SPOOL_FREE_MARGIN", 1 << 62)
    with pytest.raises(IngestError) as streamed:
        ingest(tmp_path / "streamed", archive, overrides=["ingest.workers=3", "ingest.range_mb=0.02"])
    assert str(ranged.value) == str(streamed.value)
    assert str(ranged.value).startswith(f"{archive}!Posts.xml, line 151: ") and "AttValue" in str(ranged.value)
    assert not list((tmp_path / "ranged").rglob("*.spool.xml*"))


def test_stack_overflow_style_per_table_archives(fixtures_dir, tmp_path):
    for table in ("Posts", "Votes"):
        with py7zr.SevenZipFile(tmp_path / f"meta.example.com-{table}.7z", "w") as z:
            z.write(fixtures_dir / "conlang.meta-2020" / f"{table}.xml", arcname=f"{table}.xml")
    result = ingest(tmp_path, tmp_path / "meta.example.com-Posts.7z", tmp_path / "meta.example.com-Votes.7z")
    assert result.report["score_source"] == {"meta.example.com": "votes"}
    assert result.report["pairs"]["kept"] == 74


# -- row-level problems: counted and quarantined, the run goes on ------------------------------------
def _dump(folder: Path, rows: list[str], root: str = "posts", name: str = "Posts.xml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = '\ufeff<?xml version="1.0" encoding="utf-8"?>\r\n<' + root + ">\r\n"
    text += "".join(f"  {r}\r\n" for r in rows) + f"</{root}>\r\n"
    (folder / name).write_text(text, encoding="utf-8")
    return folder


Q = '<row Id="{id}" PostTypeId="1" Score="3" Body="&lt;p&gt;How do I {id}?&lt;/p&gt;" Title="Question {id}" Tags="|a|b|" ContentLicense="CC BY-SA 4.0" OwnerUserId="1" />'
A = '<row Id="{id}" PostTypeId="2" ParentId="{parent}" Score="{score}" Body="{body}" ContentLicense="CC BY-SA 4.0" OwnerUserId="{id}" />'


def test_orphans_empty_bodies_and_duplicates_are_quarantined(tmp_path):
    site = _dump(tmp_path / "site", [
        Q.format(id=1),
        A.format(id=2, parent=1, score=5, body="&lt;p&gt;five&lt;/p&gt;"),
        A.format(id=3, parent=1, score=0, body="&lt;p&gt;zero&lt;/p&gt;"),
        A.format(id=4, parent=99, score=1, body="&lt;p&gt;orphan&lt;/p&gt;"),  # question deleted
        A.format(id=5, parent=1, score=2, body="&lt;p&gt;&lt;/p&gt;"),  # empty after cleaning
        A.format(id=3, parent=1, score=9, body="&lt;p&gt;dup&lt;/p&gt;"),  # same Id again
    ])
    result = ingest(tmp_path, site)
    q = frames(result)["quarantine"]
    assert sorted(zip(q.row_id, q.reason)) == [("3", "duplicate_id"), ("4", "orphan_answer"), ("5", "empty_body")]
    assert q.line.notna().all() and (q.source_file == str(site / "Posts.xml")).all()
    report = result.report["files"][str(site / "Posts.xml")]
    assert report["rows"] == 6 and report["adds_up"]
    assert report["kept:answer"] == 2 and report["kept:question"] == 1
    assert result.datasets["pairs"]["rows"] == 1


def test_malformed_row_is_an_error_by_default_and_quarantined_on_request(tmp_path):
    site = _dump(tmp_path / "site", [Q.format(id=1), '<row Id="x7" PostTypeId="2" ParentId="1" Score="1" Body="b" />'])
    with pytest.raises(IngestError) as err:
        ingest(tmp_path, site)
    assert "Posts.xml" in str(err.value) and "line 4" in str(err.value) and "Id" in str(err.value)
    assert not list((tmp_path / "work" / "data" / "ingest").glob("*")) or not any(
        p.name != "LATEST" and not p.name.startswith(".") for p in (tmp_path / "work" / "data" / "ingest").iterdir())
    result = ingest(tmp_path, site, overrides=["ingest.on_bad_row=quarantine"])
    q = frames(result)["quarantine"]
    assert list(q.reason) == ["malformed_row"] and q.detail.iloc[0].startswith("Id")


def test_bad_score_names_the_field(tmp_path):
    site = _dump(tmp_path / "site", [Q.format(id=1).replace('Score="3"', 'Score="many"')])
    with pytest.raises(IngestError, match=r"line 3.*field Score"):
        ingest(tmp_path, site)
