"""The columnar walk over Stack Exchange questions builds exactly what the row walk builds.

``Builder.columnar`` off builds every question as rows (``Builder.add_question``), the reference;
on, Stack Exchange questions are built a chunk at a time as Arrow columns (``tasks/ingest/columnar.py``).
Both must give the same files, byte for byte, and the same report, on inputs that exercise every
branch the columns take: several sites in one chunk, a site without Votes.xml (scores from Score),
orphan answers, answers under different licences, capped pairs and ties, a template with every
field and literal braces, and row groups and contract batches cut in the middle of chunks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.config import load_config
from alignflow.data_contracts import validate
from alignflow.tasks.ingest.build import (
    CONTRACT_MB, CONTRACT_MB_PUSHSHIFT, Builder, BuildSummary, DatasetWriter, rows_to_table,
)
from alignflow.tasks.ingest.columnar import pm_scores, render_prompts
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
from alignflow.tasks.ingest.scoring import pm_score
from alignflow.tasks.ingest.store import StagingStore
from alignflow.tasks.ingest.synthetic import generate_dump

SMALL_BATCHES = ("ingest.batch_rows=100", "ingest.batch_mb=1", "ingest.contract_rows=300")
TEMPLATE = "ingest.prompt_template={{{site}}} [{tags}] {title}\\n\\n{body}"


def ingest(sources, workdir: Path, *overrides: str):
    cfg = load_config(None, list(overrides)).ingest
    return execute_ingest(plan_ingest([str(s) for s in sources], workdir, cfg), cfg)


def without_timings(report: dict) -> str:
    report = json.loads(json.dumps(report, default=str))
    for stats in report.get("contracts", {}).values():
        stats.pop("seconds", None)
        stats.pop("seconds_gx", None)
    return json.dumps(report, sort_keys=True)


def build_both_ways(sources, tmp_path: Path, monkeypatch, overrides):
    """Ingest ``sources`` as rows, then as columns; assert the same files and report; return the columns' result."""
    monkeypatch.setattr(Builder, "columnar", False)
    rows = ingest(sources, tmp_path / "rows", *overrides)
    monkeypatch.setattr(Builder, "columnar", True)
    columns = ingest(sources, tmp_path / "columns", *overrides)
    assert {k: (v["rows"], v["digest"]) for k, v in columns.datasets.items()} == \
        {k: (v["rows"], v["digest"]) for k, v in rows.datasets.items()}
    assert without_timings(columns.report) == without_timings(rows.report)
    assert columns.report["adds_up"]
    return columns


def _sources(tmp_path: Path, fixtures_dir: Path) -> list[Path]:
    conlang = tmp_path / "conlang.meta.stackexchange.com"
    shutil.copytree(fixtures_dir / "conlang.meta-2020", conlang)
    lines = (conlang / "Posts.xml").read_text(encoding="utf-8").splitlines(keepends=True)
    answer = next(line for line in lines if 'PostTypeId="2"' in line)
    orphans = [answer.replace('Id="2"', f'Id="{9000 + i}"', 1).replace('ParentId="1"', 'ParentId="8888"', 1)
               for i in range(3)]
    lines[30:30] = orphans  # answers whose question is not in the input
    (conlang / "Posts.xml").write_text("".join(lines), encoding="utf-8")
    # another site's Votes.xml: its counts are read (upvotes) but the scores come from Score
    foreign = tmp_path / "datascience.meta.stackexchange.com"
    shutil.copytree(fixtures_dir / "datascience.meta-2024", foreign)
    shutil.copy(conlang / "Votes.xml", foreign / "Votes.xml")
    generated = generate_dump(tmp_path / "generated", questions=300, seed=5)
    (generated / "Votes.xml").unlink()  # no Votes.xml: scored from Score, no upvotes
    return [conlang, foreign, generated]


@pytest.mark.parametrize(("workers", "cap"), [("1", 2), ("2", 2), ("1", 10)])
def test_columns_and_rows_build_the_same_files(fixtures_dir, tmp_path, monkeypatch, workers, cap):
    """With a cap of 2 pairs most questions go through rank_pairs' seeded choice; with 10 (the default) most
    are paired as arrays."""
    sources = _sources(tmp_path, fixtures_dir)
    overrides = (f"ingest.workers={workers}", f"ingest.max_pairs_per_question={cap}", TEMPLATE, *SMALL_BATCHES)
    columns = build_both_ways(sources, tmp_path, monkeypatch, overrides)
    # the inputs did take the branches they are here for
    quarantine = pd.read_parquet(columns.datasets["quarantine"]["path"])
    assert (quarantine.reason == "orphan_answer").sum() == 3
    pairs = pd.read_parquet(columns.datasets["pairs"]["path"])
    assert pairs.license.str.contains(" + ", regex=False).any()
    assert pairs.prompt.str.startswith("{conlang.meta.stackexchange.com} [").any()
    assert columns.report["pairs"]["dropped:tie"] > 0 and columns.report["pairs"]["dropped:capped"] > 0
    posts = pd.read_parquet(columns.datasets["posts"]["path"])
    answers = posts[posts.kind == "answer"]
    assert answers[answers.site == "synthetic.stackexchange.com"].upvotes.isna().all()
    assert answers[answers.site != "synthetic.stackexchange.com"].upvotes.notna().all()
    assert columns.report["score_source"] == {"conlang.meta.stackexchange.com": "votes",
                                              "datascience.meta.stackexchange.com": "score",
                                              "synthetic.stackexchange.com": "score"}
    assert columns.report["contracts"]["posts"]["batches"] > 3


def _writer(kind: str, path: Path, store, summary, **sizes) -> DatasetWriter:
    path.parent.mkdir()
    return DatasetWriter(kind, path, store, summary, max_chars=10_000, docs_dir=path.parent / "docs",
                         validate=validate, **sizes)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_table_of_questions_is_cut_where_rows_one_by_one_are(tmp_path, seed):
    """Row groups and contract batches close at the end of the question where the rows, or their text, first
    reach the bound, whether the questions come as rows (add + maybe_flush) or as tables (add_table)."""
    rng = np.random.default_rng(seed)
    questions = [rng.integers(0, 6) for _ in range(400)]  # rows per question, some none
    rows, n = [], 0
    for q, k in enumerate(questions):
        for _ in range(k):
            char = ("x", "é", "€", "😀")[int(rng.integers(0, 4))]  # 1 to 4 bytes in UTF-8
            rows.append(dict(prompt_id=f"p{n}", prompt=char * int(rng.integers(1, 400)), question_id=str(q),
                             site="s.com", source="stackexchange", split="train", _source_file="f", _line=n))
            n += 1
    ends = np.cumsum(questions)
    sizes = dict(batch_rows=100, batch_bytes=3_000, contract_rows=250, contract_bytes=9_000)
    store = StagingStore(tmp_path / "store.sqlite")
    one = _writer("prompts", tmp_path / "one" / "prompts.parquet", store, BuildSummary(), **sizes)
    start = 0
    for end in ends:
        for row in rows[start:end]:
            one.add(row)
        one.maybe_flush()
        start = end
    one.close()
    many = _writer("prompts", tmp_path / "many" / "prompts.parquet", store, BuildSummary(), **sizes)
    table = rows_to_table(rows, many.batch_schema)
    cuts = sorted(set(rng.choice(len(questions), 12, replace=False).tolist()) | {0, len(questions)})
    for a, b in zip(cuts, cuts[1:]):  # questions a..b-1 as one table, then one question as rows
        first, last = (ends[a - 1] if a else 0), ends[b - 1]
        many.add_table(table.slice(first, last - first), ends[a:b] - first)
    many.close()
    assert one.batches == many.batches > 5
    assert pq.ParquetFile(one.path).metadata.num_row_groups > 20
    assert (tmp_path / "one" / "prompts.parquet").read_bytes() == (tmp_path / "many" / "prompts.parquet").read_bytes()


def test_a_row_groups_text_is_bounded_in_utf8_bytes_not_characters(tmp_path):
    """A row group closes once its text reaches ``batch_bytes`` bytes of UTF-8: 100 characters of "€" are 300
    bytes, so a bound of 1,000 bytes closes a group of such rows after 4 of them (by characters: after 10)."""
    def row(n: int) -> dict:
        return dict(prompt_id=f"p{n}", prompt="€" * 100, question_id=str(n), site="s", source="stackexchange",
                    split="train", _source_file="f", _line=n)

    extra = sum(len(v) for k, v in row(0).items() if isinstance(v, str) and k != "prompt")  # ASCII fields
    assert 3 * (300 + extra) < 1_000 <= 4 * (300 + extra)
    sizes = dict(batch_rows=1_000, batch_bytes=1_000, contract_rows=1_000, contract_bytes=1_000)
    store = StagingStore(tmp_path / "store.sqlite")
    rows = [row(n) for n in range(20)]
    for how in ("rows", "table"):
        writer = _writer("prompts", tmp_path / how / "prompts.parquet", store, BuildSummary(), **sizes)
        if how == "rows":
            for r in rows:
                writer.add(r)
                writer.maybe_flush()
        else:
            writer.add_table(rows_to_table(rows, writer.batch_schema), np.arange(1, 21))
        writer.close()
        meta = pq.ParquetFile(writer.path).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 4, 4, 4], how


def test_where_the_input_lies_does_not_move_the_row_groups(tmp_path):
    """A row's ``_source_file`` (the path it was read from, for the quarantine) is not written and not counted in a
    row group's text: the same rows read from a longer path give the same file, byte for byte (before, the path's
    length moved the cuts, and with them the dataset's digest)."""
    def rows(source: str) -> list[dict]:
        return [dict(prompt_id=f"p{n}", prompt="w" * 200, question_id=str(n), site="s", source="stackexchange",
                     split="train", _source_file=source, _line=n) for n in range(40)]

    sizes = dict(batch_rows=1_000, batch_bytes=1_000, contract_rows=1_000, contract_bytes=1_000)
    store = StagingStore(tmp_path / "store.sqlite")
    files = {}
    for source in ("/d/Posts.xml", "/" + "deeper/" * 30 + "Posts.xml"):
        for how in ("rows", "table"):
            name = f"{how}-{len(source)}"
            writer = _writer("prompts", tmp_path / name / "prompts.parquet", store, BuildSummary(), **sizes)
            if how == "rows":
                for r in rows(source):
                    writer.add(r)
                    writer.maybe_flush()
            else:
                writer.add_table(rows_to_table(rows(source), writer.batch_schema), np.arange(1, 41))
            writer.close()
            files[name] = writer.path.read_bytes()
    assert len(set(files.values())) == 1
    assert pq.ParquetFile(writer.path).metadata.num_row_groups == 8  # rows of ~220 bytes of text: 5 reach 1,000


def test_pm_scores_are_the_scalar_rule():
    rng = np.random.default_rng(0)
    up = rng.integers(-3, 5000, 2000)
    vote_score = rng.integers(-50, 5000, 2000)
    accepted = rng.integers(0, 2, 2000)
    expected = [pm_score(int(u), int(v), bool(a)) for u, v, a in zip(up, vote_score, accepted)]
    assert pm_scores(up, vote_score, accepted).tolist() == expected


@pytest.mark.parametrize("template", ["{title}\n\n{body}", "Q: {body}", "{{literal}} {site}|{tags}|{title}",
                                      "no fields at all", "{body}"])
def test_prompts_render_as_str_format(template):
    fields = {"title": pa.array(["t1", "ü {x}", ""]), "body": pa.array(["b1", "b2\n", "b3"]),
              "site": pa.array(["a.com", "b.com", "c.com"]), "tags": pa.array(["x|y", "", "z"])}
    rendered = render_prompts(template, fields, 3).to_pylist()
    rows = [{k: v[i].as_py() for k, v in fields.items()} for i in range(3)]
    assert rendered == [template.format(**row) for row in rows]


def _reddit_month(tmp_path: Path) -> list[Path]:
    """A generated Pushshift month, plus a comments file whose submissions are not in the input (orphans)."""
    import io

    import zstandard

    from alignflow.tasks.ingest.synthetic_reddit import generate_month

    month = generate_month(tmp_path / "month", rc_bytes=1_500_000, seed=11)
    rc = tmp_path / "month" / "RC_2015-01.zst"
    lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(rc.open("rb")), encoding="utf-8").readlines()
    top = [json.loads(line) for line in lines if '"parent_id":"t3_' in line][:4]
    for i, c in enumerate(top):
        c.update(id=f"orph{i}", parent_id="t3_gone", link_id="t3_gone")
    extra = tmp_path / "RC_2015-02.zst"
    extra.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(c) + "\n" for c in top).encode()))
    assert month is not None
    return [tmp_path / "month" / "RS_2015-01.zst", rc, extra]


@pytest.mark.parametrize(("workers", "cap", "replies"), [("1", 2, "false"), ("2", 5, "true")])
def test_reddit_columns_and_rows_build_the_same_files(tmp_path, monkeypatch, workers, cap, replies):
    """Reddit submissions, built as columns with the SHP rules called per submission, give the files and the
    report of the row walk: with a cap of 2 most submissions are capped; reply pairs (built apart) on or off."""
    sources = _reddit_month(tmp_path)
    overrides = (f"ingest.workers={workers}", f"ingest.reddit.max_pairs_per_post={cap}",
                 f"ingest.reddit_reply_pairs={replies}", TEMPLATE, *SMALL_BATCHES)
    columns = build_both_ways(sources, tmp_path, monkeypatch, overrides)
    pairs = columns.report["pairs"]
    assert pairs["kept"] > 40 and pairs["dropped:capped"] > 0 and pairs["dropped:not_written_later"] > 0
    quarantine = pd.read_parquet(columns.datasets["quarantine"]["path"])
    assert (quarantine.reason == "orphan_answer").sum() == 4
    assert columns.report["contracts"]["posts"]["batches"] > 3


@pytest.mark.parametrize(("setting", "pushshift", "mib"), [
    (0, False, CONTRACT_MB), (0, True, CONTRACT_MB_PUSHSHIFT), (5, False, 5), (5, True, 5),
])
def test_contract_batches_hold_the_configured_text_or_the_inputs_default(tmp_path, setting, pushshift, mib):
    cfg = load_config(None, [f"ingest.contract_mb={setting}"]).ingest
    store = StagingStore(tmp_path / "store.sqlite")
    builder = Builder(store, tmp_path, cfg, validate=validate, pushshift=pushshift)
    assert {w.contract_bytes for w in builder.writers.values()} == {max(mib << 20, cfg.batch_mb << 20)}
    store.close()
