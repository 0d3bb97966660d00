"""Pair selection for the preference-model stages: whole questions, weighted mixtures, split hygiene."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.tasks.train.pairs import (
    MixtureSource,
    PairSelectionError,
    SplitLeakError,
    check_split_hygiene,
    draw_mixture,
    draw_questions,
    mismatched_pairs,
    nearest_answers,
    read_pairs,
    rows_of_split,
)
from alignflow.tasks.train.reward import question_key


def _rows(site: str, questions: int, pairs_per_q=(1, 2, 3), split: str = "train") -> list[dict]:
    rows = []
    for q in range(questions):
        for p in range(pairs_per_q[q % len(pairs_per_q)]):
            rows.append({"pair_id": f"{site}:{q}:{p}", "site": site, "question_id": str(q), "split": split,
                         "prompt": f"q{q}", "chosen": "a", "rejected": "b"})
    return rows


def _questions(rows):
    return {question_key(r) for r in rows}


def test_draw_questions_keeps_questions_whole_and_nests():
    rows = _rows("s", 40)
    small, large = draw_questions(rows, 10, seed=3), draw_questions(rows, 30, seed=3)
    assert len(small) <= 10 and len(large) <= 30 and len(large) >= 28
    full = {k: sum(1 for r in rows if question_key(r) == k) for k in _questions(rows)}
    for part in (small, large):
        for k in _questions(part):  # every drawn question has all of its pairs
            assert sum(1 for r in part if question_key(r) == k) == full[k]
    assert _questions(small) <= _questions(large)  # the learning-curve sizes are nested
    assert draw_questions(rows, 10, seed=3) == small  # deterministic
    assert draw_questions(rows, 10, seed=4) != small
    assert sorted(r["pair_id"] for r in draw_questions(rows, None, seed=1)) == sorted(r["pair_id"] for r in rows)


def _scored_rows(questions: int) -> list[dict]:
    """Question q: answers "q<q>-best" (score 10) > "q<q>-mid" (5) > "q<q>-low" (1), as three ranked pairs."""
    rows = []
    for q in range(questions):
        answers = [(f"q{q}-best", 10.0), (f"q{q}-mid", 5.0), (f"q{q}-low", 1.0)]
        for (c, cs), (r, rs) in [(answers[1], answers[2]), (answers[0], answers[1]), (answers[0], answers[2])]:
            rows.append({"pair_id": f"{q}:{c}>{r}", "site": "s", "question_id": str(q), "split": "train",
                         "source": "stackexchange", "prompt": f"prompt {q}", "chosen": c, "rejected": r,
                         "chosen_score": cs, "rejected_score": rs, "margin": cs - rs})
    return rows


def test_mismatched_pairs_prefer_a_questions_best_answer_over_other_questions_best():
    rows = _scored_rows(10)  # 30 pairs
    extra = mismatched_pairs(rows, 1.0, seed=0)
    assert len(extra) == 30
    for r in extra:
        q = r["question_id"]
        assert r["prompt"] == f"prompt {q}" and r["chosen"] == f"q{q}-best"  # its own best, not the first chosen
        assert r["rejected"].endswith("-best") and r["rejected"] != r["chosen"]  # another question's best
        assert r["mismatched"] and r["pair_id"].startswith("mismatch:") and r["margin"] is None
        assert r["site"] == "s" and r["split"] == "train" and r["source"] == "stackexchange"
    # every question gets its share (3 each), from 3 different donors
    for q in range(10):
        donors = [r["rejected"] for r in extra if r["question_id"] == str(q)]
        assert len(donors) == 3 and len(set(donors)) == 3
    assert mismatched_pairs(list(reversed(rows)), 1.0, seed=0) == extra  # input order does not matter
    assert len({r["pair_id"] for r in extra}) == 30
    assert mismatched_pairs(rows, 1.0, seed=1) != extra  # the seed picks the donors
    assert len(mismatched_pairs(rows, 0.5, seed=0)) == 15
    assert mismatched_pairs(rows, 0.0, seed=0) == []
    assert mismatched_pairs(_scored_rows(1), 1.0, seed=0) == []  # no other question to borrow from
    with pytest.raises(ValueError, match=">= 0"):
        mismatched_pairs(rows, -1, seed=0)


def test_mismatched_pairs_skip_a_donor_with_the_same_answer():
    rows = _scored_rows(2)
    for r in rows:
        r["chosen"] = r["chosen"].replace("q1-", "q0-")  # both questions' best answer is the same text
    assert mismatched_pairs(rows, 1.0, seed=0) == []


def test_nearest_answers_rank_by_word_overlap_and_skip_self_and_copies():
    texts = ["use the foo loader with a cache",       # 0
             "use the bar loader with a cache",       # 1: 6 of 8 words shared with 0
             "something else entirely",               # 2: nothing shared with 0
             "use the foo loader",                    # 3: 4 of 7 words shared with 0
             "use the foo loader with a cache"]       # 4: a copy of 0
    near = nearest_answers(texts, 2)
    assert near[0] == [1, 3]  # never itself nor its copy (4), most similar first
    assert near[4] == [1, 3]
    assert near[2][0] != 2 and len(near[2]) == 2  # no overlap at all still gives k donors (ties: lower index)
    assert nearest_answers(texts, 0) == [[]] * 5 and nearest_answers([], 3) == []
    assert nearest_answers(texts, 2, block=2) == near  # blocks do not change the result
    assert nearest_answers(["A b", "a B c", "x"], 1)[0] == [1]  # case-insensitive words
    with pytest.raises(ValueError, match=">= 0"):
        nearest_answers(texts, -1)


def test_mismatched_pairs_with_nearest_donors_take_the_most_similar_best_answer():
    rows = []
    for q, (term, topic) in enumerate([("zorp", "cache"), ("blix", "cache"), ("quav", "socket"), ("drel", "socket")]):
        rows.append({"pair_id": f"{q}", "site": "s", "question_id": str(q), "split": "train", "source": "se",
                     "prompt": f"prompt {q}", "chosen": f"call {term} to flush the {topic} before the write",
                     "rejected": "no idea", "chosen_score": 5.0, "rejected_score": 0.0, "margin": 5.0})
    extra = mismatched_pairs(rows, 1.0, seed=0, donors="nearest")
    donor = {r["question_id"]: r["rejected"] for r in extra}
    assert donor == {"0": rows[1]["chosen"], "1": rows[0]["chosen"], "2": rows[3]["chosen"], "3": rows[2]["chosen"]}
    assert mismatched_pairs(list(reversed(rows)), 1.0, seed=0, donors="nearest") == extra
    assert mismatched_pairs(rows, 1.0, seed=0) != extra  # random donors differ
    with pytest.raises(ValueError, match="random or nearest"):
        mismatched_pairs(rows, 1.0, seed=0, donors="closest")


def test_task_pairs_add_mismatched_pairs_only_when_asked(tmp_path):
    from alignflow.config import load_config
    from alignflow.tasks.preference import select_task_pairs

    rows = _scored_rows(12) + [{**r, "split": "validation", "question_id": f"v{r['question_id']}"}
                               for r in _scored_rows(3)]
    cfg = load_config(None, ["pm.site=s"]).pm
    train, held = select_task_pairs(rows, cfg, tmp_path / "pairs.parquet")
    assert len(train) == 36 and not any(r.get("mismatched") for r in train)
    cfg = load_config(None, ["pm.site=s", "pm.mismatched_pairs=0.5"]).pm
    train2, held2 = select_task_pairs(rows, cfg, tmp_path / "pairs.parquet")
    assert train2[:36] == train and held2 == held
    assert sum(1 for r in train2 if r.get("mismatched")) == 18
    assert all(r["split"] == "train" for r in train2)  # never a held-out answer as a donor
    cfg = load_config(None, ["pm.site=s", "pm.mismatched_pairs=0.5", "pm.mismatched_donors=nearest"]).pm
    train3, _ = select_task_pairs(rows, cfg, tmp_path / "pairs.parquet")
    assert train3[:36] == train and sum(1 for r in train3 if r.get("mismatched")) == 18
    assert train3[36:] != train2[36:]  # the setting reaches the donors


def test_mixture_follows_weights_and_upsamples_a_small_source():
    big, small = _rows("big", 60), _rows("small", 6)  # 120 and 12 pairs
    mix, report = draw_mixture(big + small, [MixtureSource("big", 1.0), MixtureSource("small", 1.0)], 100, seed=0)
    drawn = report.per_source
    assert drawn["big"]["available"] == 120 and drawn["small"]["available"] == 12
    assert 45 <= drawn["big"]["drawn"] <= 50 and 45 <= drawn["small"]["drawn"] <= 50
    assert sum(1 for r in mix if r["site"] == "small") == drawn["small"]["drawn"]
    assert report.total == len(mix)
    # pairs of one question stay adjacent in the mixture
    keys = [question_key(r) + str(i // 1) for i, r in enumerate(mix)]
    assert len(keys) == len(mix)
    metrics = report.as_metrics()
    assert metrics["data/mixture_small_drawn"] == drawn["small"]["drawn"]


def test_mixture_wildcard_takes_the_sites_no_source_names():
    rows = _rows("a", 10) + _rows("b", 10) + _rows("c", 10)
    _, report = draw_mixture(rows, [MixtureSource("a", 1.0), MixtureSource("*", 1.0)], None, seed=0)
    n_a = sum(1 for r in rows if r["site"] == "a")
    assert report.per_source["a"]["available"] == n_a and report.per_source["*"]["available"] == len(rows) - n_a
    assert report.total <= len(rows)


def test_mixture_errors_name_the_missing_site_and_those_present():
    with pytest.raises(PairSelectionError, match=r"'nope'.*sites present: a"):
        draw_mixture(_rows("a", 3), [MixtureSource("nope", 1.0)], None, seed=0)
    with pytest.raises(ValueError, match="twice"):
        draw_mixture(_rows("a", 3), [MixtureSource("a", 1.0), MixtureSource("a", 2.0)], None, seed=0)


def test_split_hygiene_catches_a_shared_question():
    train = _rows("s", 5)
    held = _rows("s", 8, split="validation")[-3:]  # questions 6 (1 pair) and 7 (2 pairs)
    assert check_split_hygiene(train, held) == 2
    leak = _rows("s", 2, split="validation")  # questions 0 and 1 are also in training
    with pytest.raises(SplitLeakError, match="2 held-out question"):
        check_split_hygiene(train, leak)


def test_ingested_splits_have_no_shared_questions(tmp_path):
    """The ingest's splits, as the pm stage reads them, pass the hygiene check."""
    from alignflow.config import IngestConfig
    from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
    from alignflow.tasks.ingest.synthetic import generate_dump

    site = generate_dump(tmp_path / "dump", questions=80, seed=5)
    cfg = IngestConfig()
    res = execute_ingest(plan_ingest([site], tmp_path / "work", cfg), cfg)
    rows = read_pairs(res.datasets["pairs"]["path"])
    train, held = rows_of_split(rows, "train"), rows_of_split(rows, "validation") + rows_of_split(rows, "test")
    assert train and held
    assert check_split_hygiene(train, held) == len(_questions(held))


def test_read_pairs_refuses_a_file_without_pair_columns(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["c"]}), path)
    with pytest.raises(ValueError, match="missing column.*rejected"):
        read_pairs(path)
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "none.parquet")
