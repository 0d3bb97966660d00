"""Data contracts (Great Expectations 1.x) on small hand-made frames."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from alignflow.data_contracts import (
    COLUMNS,
    KINDS,
    ContractResult,
    ContractViolation,
    expectations_for,
    validate,
)

# --------------------------------------------------------------------------- frames


def posts_frame() -> pd.DataFrame:
    rows = []
    for q in range(3):
        qid = str(100 + q)
        rows.append(
            dict(site="s.stackexchange.com", source="stackexchange", post_id=qid, kind="question",
                 question_id=qid, title=f"How do I {q}?", body=f"Question body {q}", tags="a|b",
                 score=5, upvotes=6, accepted=False, pm_score=None, author="user:1",
                 license="CC BY-SA 4.0", created_at="2020-01-01T00:00:00.000", split="train")
        )
        for a in range(2):
            aid = str(1000 + 10 * q + a)
            rows.append(
                dict(site="s.stackexchange.com", source="stackexchange", post_id=aid, kind="answer",
                     question_id=qid, title=f"How do I {q}?", body=f"Answer {a} to {q}", tags="",
                     score=3 - a, upvotes=4, accepted=a == 0, pm_score=3 - a, author=f"user:{a + 2}",
                     license="CC BY-SA 4.0", created_at="2020-01-02T00:00:00.000", split="train")
            )
    df = pd.DataFrame(rows, columns=list(COLUMNS["posts"]))
    return df.astype({"upvotes": "int64", "pm_score": "Int64"})


def pairs_frame(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "pair_id": [f"p{i}" for i in range(n)],
            "prompt": [f"Question {i}?" for i in range(n)],
            "chosen": [f"good answer {i}" for i in range(n)],
            "rejected": [f"bad answer {i}" for i in range(n)],
            "chosen_score": [3.0] * n,
            "rejected_score": [1.0] * n,
            "margin": [2.0] * n,
            "question_id": [str(i) for i in range(n)],
            "site": ["s.stackexchange.com"] * n,
            "source": ["stackexchange"] * n,
            "split": ["train", "validation", "test", "train"][:n] + ["train"] * max(0, n - 4),
            "chosen_id": [f"a{i}" for i in range(n)],
            "rejected_id": [f"b{i}" for i in range(n)],
            "chosen_author": ["user:1"] * n,
            "rejected_author": ["user:2"] * n,
            "license": ["CC BY-SA 4.0"] * n,
        }
    )


def demos_frame(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "demo_id": [f"d{i}" for i in range(n)],
            "prompt": [f"Question {i}?" for i in range(n)],
            "response": [f"Best answer {i}" for i in range(n)],
            "question_id": [str(i) for i in range(n)],
            "answer_id": [str(100 + i) for i in range(n)],
            "site": ["reddit/askscience"] * n,
            "source": ["reddit"] * n,
            "split": ["train"] * n,
            "pm_score": [2] * n,
            "author": ["name:bob"] * n,
            "license": ["reddit"] * n,
        }
    )


def prompts_frame(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": [f"q{i}" for i in range(n)],
            "prompt": [f"Question {i}?" for i in range(n)],
            "question_id": [str(i) for i in range(n)],
            "site": ["s.stackexchange.com"] * n,
            "source": ["pairs"] * n,
            "split": ["test"] * n,
        }
    )


def comparisons_frame(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "response_id": [f"q{i // 2}:alignflow-policy@champion:{i % 2}" for i in range(n)],
            "item_id": [f"q{i // 2}" for i in range(n)],
            "prompt_id": [f"q{i // 2}" for i in range(n)],
            "prompt": [f"Question {i // 2}?" for i in range(n)],
            "response": [f"sampled answer {i}" for i in range(n)],
            "policy": ["alignflow-policy@champion"] * n,
            "model": ["alignflow-policy"] * n,
            "version": ["1"] * n,
            "sample": [i % 2 for i in range(n)],
            "seed": [7] * n,
            "sampling": ['{"temperature": 0.7}'] * n,
            "question_id": [str(i // 2) for i in range(n)],
            "site": ["s.stackexchange.com"] * n,
            "source": ["stackexchange"] * n,
            "split": ["test"] * n,
        }
    )


FRAMES = {"posts": posts_frame, "pairs": pairs_frame, "demos": demos_frame, "prompts": prompts_frame,
          "comparisons": comparisons_frame}


def _assert_json(result: ContractResult) -> None:
    json.dumps(result.result_json)
    json.dumps(result.statistics)


# --------------------------------------------------------------------------- clean / empty / dtypes


@pytest.mark.parametrize("kind", KINDS)
def test_clean_frame_passes(kind):
    df = FRAMES[kind]()
    res = validate(df, kind)
    assert res.kind == kind
    assert res.passed, res.failure_message()
    assert res.table_failures == []
    assert res.rejected.empty
    assert "expectation" in res.rejected.columns
    pd.testing.assert_frame_equal(res.valid, df)
    assert res.statistics["rows_in"] == res.statistics["rows_valid"] == len(df)
    assert res.statistics["rows_rejected"] == 0
    assert res.statistics["evaluated_expectations"] == len(expectations_for(kind))
    assert res.statistics["successful_expectations"] == res.statistics["evaluated_expectations"]
    assert res.docs_index is None
    res.raise_for_table_failures()  # no-op
    _assert_json(res)
    assert res.result_json["success"] is True


@pytest.mark.parametrize("kind", KINDS)
def test_empty_frame_passes(kind):
    df = FRAMES[kind]().iloc[0:0]
    res = validate(df, kind)
    assert res.passed, res.failure_message()
    assert res.valid.empty and res.rejected.empty
    assert res.statistics["rows_in"] == 0


def test_empty_frame_without_dtypes_passes():
    # e.g. pd.DataFrame(columns=...) -> object columns, zero rows
    res = validate(pd.DataFrame(columns=list(COLUMNS["pairs"])), "pairs")
    assert res.passed and res.rejected.empty


def test_frames_with_str_dtype_and_object_dtype_work():
    df = pairs_frame()
    assert df["prompt"].dtype == "str"  # pandas 3 default
    bad = df.copy()
    bad.loc[2, "chosen"] = " \n"
    res_str = validate(bad, "pairs")
    res_obj = validate(bad.astype({c: object for c in bad.columns if bad[c].dtype == "str"}), "pairs")
    for res in (res_str, res_obj):
        assert res.passed
        assert res.rejected.index.tolist() == [2]
        assert res.rejected["expectation"].tolist() == ["expect_column_values_to_match_regex(chosen)"]
    # string[python] dtype (pd.NA for missing) too
    res_na = validate(bad.astype({"prompt": "string", "chosen": "string"}), "pairs")
    assert res_na.rejected.index.tolist() == [2]


def test_index_and_order_are_kept():
    df = pairs_frame(5)
    df.index = ["e", "d", "c", "b", "a"]
    df.loc["c", "margin"] = -1.0
    res = validate(df, "pairs")
    assert res.valid.index.tolist() == ["e", "d", "b", "a"]
    assert res.rejected.index.tolist() == ["c"]
    # duplicate index labels: positions are used internally
    dup = pairs_frame(3)
    dup.index = [7, 7, 7]
    dup.iloc[1, dup.columns.get_loc("split")] = "dev"
    res = validate(dup, "pairs")
    assert res.rejected["pair_id"].tolist() == ["p1"]
    assert res.valid["pair_id"].tolist() == ["p0", "p2"]


def test_input_frame_not_modified():
    df = pairs_frame().astype(object)
    before = df.copy()
    validate(df, "pairs")
    pd.testing.assert_frame_equal(df, before)


# --------------------------------------------------------------------------- row-level rules


def _set(col, value):
    def mutate(df, row):
        df.loc[row, col] = value

    return mutate


def _copy(col, src):
    def mutate(df, row):
        df.loc[row, col] = df.loc[row, src]

    return mutate


# kind -> [(row, mutation, expected expectation name)], one bad row per rule.
# One validation per kind (GX costs ~0.1 s per validation even on tiny frames).
ROW_CASES = {
    "pairs": [
        _set("prompt", None), "expect_column_values_to_not_be_null(prompt)",
        _set("prompt", "   "), "expect_column_values_to_match_regex(prompt)",
        _set("chosen", ""), "expect_column_values_to_match_regex(chosen)",
        _set("rejected", None), "expect_column_values_to_not_be_null(rejected)",
        _set("rejected", "x" * 20_001), "expect_column_value_lengths_to_be_between(rejected)",
        _set("split", "dev"), "expect_column_values_to_be_in_set(split)",
        _set("split", None), "expect_column_values_to_not_be_null(split)",
        _set("source", "twitter"), "expect_column_values_to_be_in_set(source)",
        _copy("chosen", "rejected"), "expect_column_pair_values_to_not_be_equal(chosen, rejected)",
        _set("rejected_score", 9.0),
        "expect_column_pair_values_a_to_be_greater_than_b(chosen_score, rejected_score)",
        _set("rejected_score", 3.0),  # a tie is not a preference
        "expect_column_pair_values_a_to_be_greater_than_b(chosen_score, rejected_score)",
        _set("margin", -0.5), "expect_column_values_to_be_between(margin)",
        _set("pair_id", None), "expect_column_values_to_not_be_null(pair_id)",
        _set("site", None), "expect_column_values_to_not_be_null(site)",
    ],
    "demos": [
        _set("response", "\t"), "expect_column_values_to_match_regex(response)",
        _set("response", "r" * 20_001), "expect_column_value_lengths_to_be_between(response)",
        _set("prompt", None), "expect_column_values_to_not_be_null(prompt)",
        _set("source", "pairs!"), "expect_column_values_to_be_in_set(source)",
        _set("demo_id", None), "expect_column_values_to_not_be_null(demo_id)",
    ],
    "prompts": [
        _set("prompt", ""), "expect_column_values_to_match_regex(prompt)",
        _set("prompt", "p" * 20_001), "expect_column_value_lengths_to_be_between(prompt)",
        _set("split", "Train"), "expect_column_values_to_be_in_set(split)",
        _set("question_id", None), "expect_column_values_to_not_be_null(question_id)",
        _set("source", None), "expect_column_values_to_not_be_null(source)",
    ],
    "comparisons": [
        _set("response", "  "), "expect_column_values_to_match_regex(response)",  # an empty generation
        _set("response", None), "expect_column_values_to_not_be_null(response)",
        _set("response_id", None), "expect_column_values_to_not_be_null(response_id)",
        _set("prompt", ""), "expect_column_values_to_match_regex(prompt)",
    ],
}
# posts: rows 0, 3, 6 are questions, the others answers (see posts_frame)
POSTS_CASES = {
    1: (_set("body", "  "), "expect_column_values_to_match_regex(body)"),  # answer
    2: (_set("body", None), "expect_column_values_to_not_be_null(body)"),  # answer
    3: (_set("title", ""), "expect_column_values_to_match_regex(title)"),  # question
    6: (_set("title", None), "expect_column_values_to_not_be_null(title)"),  # question
    4: (_set("kind", "comment"), "expect_column_values_to_be_in_set(kind)"),
    5: (_set("body", "y" * 20_001), "expect_column_value_lengths_to_be_between(body)"),
    7: (_set("post_id", None), "expect_column_values_to_not_be_null(post_id)"),
    8: (_set("title", "t" * 20_001), "expect_column_value_lengths_to_be_between(title)"),
}


def _cases(kind):
    if kind == "posts":
        return dict(POSTS_CASES)
    flat = ROW_CASES[kind]
    return {2 * i + 1: (flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)}  # even rows stay clean


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_rule_rejects_exactly_its_bad_row(kind):
    cases = _cases(kind)
    df = posts_frame() if kind == "posts" else FRAMES[kind](2 * len(cases) + 1)
    for row, (mutate, _) in cases.items():
        mutate(df, row)
    res = validate(df, kind)
    assert res.passed, res.failure_message()
    expected = {row: name for row, (_, name) in sorted(cases.items())}
    assert res.rejected["expectation"].to_dict() == expected
    assert res.rejected.index.tolist() == sorted(cases)  # original order kept
    assert res.valid.index.tolist() == [i for i in df.index if i not in cases]
    pd.testing.assert_frame_equal(res.rejected.drop(columns="expectation"), df.loc[sorted(cases)])
    assert res.statistics["rows_rejected"] == len(cases)
    assert res.statistics["rows_valid"] == len(df) - len(cases)
    assert set(res.statistics["row_level_failed_expectations"]) == set(expected.values())
    # the names are those of the suite's row-level expectations
    row_names = {s.name for s in expectations_for(kind) if s.level == "row"}
    assert set(expected.values()) <= row_names
    _assert_json(res)


def test_without_json_the_verdicts_are_the_same_and_result_json_is_empty():
    kind = "pairs"
    cases = _cases(kind)
    df = FRAMES[kind](2 * len(cases) + 1)
    for row, (mutate, _) in cases.items():
        mutate(df, row)
    full, lean = validate(df, kind), validate(df, kind, with_json=False)
    assert lean.result_json == {} and full.result_json["success"] is False
    pd.testing.assert_frame_equal(lean.rejected, full.rejected)
    pd.testing.assert_frame_equal(lean.valid, full.valid)
    assert lean.passed == full.passed
    assert {k: v for k, v in lean.statistics.items() if not k.startswith("seconds")} == \
        {k: v for k, v in full.statistics.items() if not k.startswith("seconds")}


def test_consecutive_batches_of_one_suite_see_only_their_own_rows(tmp_path):
    # The GX context and suite are built once per process and reused: nothing computed for one batch
    # (metrics, loaded data) may answer for the next, which has the same shape, index and batch id.
    bad = pairs_frame()
    bad.loc[1, "chosen"] = ""
    bad.loc[3, "margin"] = -1.0
    clean = pairs_frame()
    dup = pairs_frame()
    dup.loc[2, "pair_id"] = "p0"
    first = validate(bad, "pairs")
    second = validate(clean, "pairs")
    documented = validate(bad, "pairs", docs_dir=tmp_path / "docs")  # a file context becomes GX's current one
    third = validate(dup, "pairs")
    fourth = validate(bad, "pairs", max_chars=10)  # another suite for the same kind
    fifth = validate(clean, "pairs")
    assert first.passed and first.rejected.index.tolist() == [1, 3]
    assert second.passed and second.rejected.empty and second.statistics["rows_valid"] == 4
    assert documented.rejected.index.tolist() == [1, 3] and documented.docs_index is not None
    assert [f.expectation for f in third.table_failures] == ["expect_column_values_to_be_unique(pair_id)"]
    assert third.rejected.empty
    assert fourth.rejected.index.tolist() == [0, 1, 2, 3]  # every chosen text is over 10 characters
    assert fifth.passed and fifth.rejected.empty and fifth.table_failures == []


@pytest.mark.parametrize("kind", KINDS)
def test_quick_guess_sees_every_bad_row_and_no_clean_frame(kind):
    # A batch that looks clean is first validated in GX's pass/fail mode: the guess must flag every
    # row rule (or dirty batches would pay for two GX runs) and no clean frame (or none gets the quick run).
    from alignflow.data_contracts.contracts import _may_fail_a_row, _prepare

    specs = expectations_for(kind)
    clean = FRAMES[kind]() if kind != "posts" else posts_frame()
    assert not _may_fail_a_row(_prepare(clean, kind), specs)
    cases = _cases(kind)
    for row, (mutate, name) in cases.items():
        df = posts_frame() if kind == "posts" else FRAMES[kind](2 * len(cases) + 1)
        mutate(df, row)
        assert _may_fail_a_row(_prepare(df, kind), specs), name


@pytest.mark.parametrize("kind", KINDS)
def test_quick_guess_through_pandas_sees_the_same(kind):
    # Columns that are neither Arrow texts nor numbers (here: every column as Python objects) take the pandas
    # version of each rule: it must flag the same bad rows and pass the same clean frame as the Arrow one.
    from alignflow.data_contracts.contracts import _may_fail_a_row

    def as_objects(df):  # the texts as Python objects; numbers stay numbers
        return df.astype({c: object for c in df.columns if df[c].dtype.kind not in "iufb"})

    specs = expectations_for(kind)
    clean = FRAMES[kind]() if kind != "posts" else posts_frame()
    assert not _may_fail_a_row(as_objects(clean), specs)
    for row, (mutate, name) in _cases(kind).items():
        df = posts_frame() if kind == "posts" else FRAMES[kind](2 * len(_cases(kind)) + 1)
        mutate(df, row)
        assert _may_fail_a_row(as_objects(df), specs), name


@pytest.mark.parametrize("guess", [True, False])
def test_quick_guess_never_changes_the_verdict(monkeypatch, guess):
    import alignflow.data_contracts.contracts as contracts

    runs = []
    run_gx = contracts._run_gx
    monkeypatch.setattr(contracts, "_may_fail_a_row", lambda work, specs: guess)
    monkeypatch.setattr(contracts, "_run_gx", lambda *a, **kw: runs.append(kw.get("result_format", "COMPLETE"))
                        or run_gx(*a, **kw))
    bad = pairs_frame()
    bad.loc[1, "chosen"] = ""
    bad.loc[2, "margin"] = -1.0
    dup = pairs_frame()
    dup.loc[2, "pair_id"] = "p0"
    res = validate(bad, "pairs")
    assert res.passed
    assert res.rejected["expectation"].to_dict() == {1: "expect_column_values_to_match_regex(chosen)",
                                                     2: "expect_column_values_to_be_between(margin)"}
    assert res.valid.index.tolist() == [0, 3]
    res = validate(dup, "pairs")
    assert [f.expectation for f in res.table_failures] == ["expect_column_values_to_be_unique(pair_id)"]
    assert [ex["index"] for ex in res.table_failures[0].examples] == [0, 2]
    res = validate(pairs_frame(), "pairs")
    assert res.passed and res.rejected.empty
    assert res.statistics["successful_expectations"] == len(expectations_for("pairs"))
    # a batch guessed clean gets the pass/fail run first, and the full run only if something failed
    quick = ["BOOLEAN_ONLY", "COMPLETE"] if not guess else ["COMPLETE"]
    assert runs == quick + quick + (["BOOLEAN_ONLY"] if not guess else ["COMPLETE"])


def test_posts_empty_question_body_and_empty_answer_title_are_allowed():
    df = posts_frame()
    df.loc[0, "body"] = ""  # a question
    df.loc[1, "title"] = ""  # an answer
    res = validate(df, "posts")
    assert res.passed and res.rejected.empty
    # and the quick guess sees that the rules' conditions leave these rows out
    from alignflow.data_contracts.contracts import _may_fail_a_row, _prepare

    assert not _may_fail_a_row(_prepare(df, "posts"), expectations_for("posts"))


def test_null_scores_and_margin_are_not_rejected():
    df = pairs_frame()
    df.loc[0, "chosen_score"] = np.nan
    df.loc[1, "rejected_score"] = np.nan
    df.loc[2, "margin"] = np.nan
    res = validate(df, "pairs")
    assert res.passed and res.rejected.empty


def test_row_failing_several_rules_gets_names_joined():
    df = pairs_frame()
    df.loc[2, "chosen"] = ""
    df.loc[2, "margin"] = -1.0
    df.loc[0, "split"] = "nope"
    res = validate(df, "pairs")
    assert res.rejected.index.tolist() == [0, 2]
    assert res.rejected.loc[2, "expectation"] == (
        "expect_column_values_to_match_regex(chosen); expect_column_values_to_be_between(margin)"
    )
    assert res.rejected.loc[0, "expectation"] == "expect_column_values_to_be_in_set(split)"


def test_max_chars_is_passed_through():
    df = pairs_frame()
    df.loc[3, "chosen"] = "x" * 50
    assert validate(df, "pairs").rejected.empty
    res = validate(df, "pairs", max_chars=40)
    assert res.rejected.index.tolist() == [3]
    assert res.rejected["expectation"].tolist() == ["expect_column_value_lengths_to_be_between(chosen)"]
    with pytest.raises(ValueError):
        validate(df, "pairs", max_chars=0)


@pytest.mark.parametrize("storage", ["pyarrow", "python"])
def test_only_texts_longer_than_the_limit_in_characters_are_cut(storage):
    """Texts over ``max_chars + 1`` characters are cut for GX; one with more bytes than that but not more
    characters (the column's bytes are looked at first) is left whole."""
    from alignflow.data_contracts.contracts import _prepare

    df = pairs_frame()
    df["chosen"] = df["chosen"].astype(pd.StringDtype(storage))
    df.loc[0, "chosen"] = "é" * 11  # 22 bytes, 11 characters: at the limit of 10 + 1
    df.loc[1, "chosen"] = "é" * 12
    df.loc[2, "chosen"] = "x" * 12
    work = _prepare(df, "pairs", max_chars=10)
    assert work.loc[0, "chosen"] == "é" * 11
    assert work.loc[1, "chosen"] == "é" * 11 + "…" and work.loc[2, "chosen"] == "x" * 11 + "…"
    assert df.loc[1, "chosen"] == "é" * 12  # the caller's frame is never modified
    at_limit = df.assign(chosen=pd.Series(["y" * 11] * len(df), dtype=pd.StringDtype(storage)))  # 11 bytes each
    assert _prepare(at_limit, "pairs", max_chars=10)["chosen"].tolist() == at_limit["chosen"].tolist()


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown dataset kind"):
        validate(pairs_frame(), "quarantine")


# --------------------------------------------------------------------------- table-level rules


def _raise_message(res: ContractResult) -> str:
    with pytest.raises(ContractViolation) as exc:
        res.raise_for_table_failures()
    assert exc.value.result is res
    return str(exc.value)


@pytest.mark.parametrize(
    ("kind", "id_col", "name"),
    [
        ("pairs", "pair_id", "expect_column_values_to_be_unique(pair_id)"),
        ("demos", "demo_id", "expect_column_values_to_be_unique(demo_id)"),
        ("prompts", "prompt_id", "expect_column_values_to_be_unique(prompt_id)"),
    ],
)
def test_duplicate_ids_fail_the_table(kind, id_col, name):
    df = FRAMES[kind]()
    df.loc[2, id_col] = "dup-id"
    df.loc[0, id_col] = "dup-id"
    res = validate(df, kind)
    assert not res.passed
    assert [f.expectation for f in res.table_failures] == [name]
    failure = res.table_failures[0]
    assert failure.unexpected_count == 2
    assert [ex[id_col] for ex in failure.examples] == ["dup-id", "dup-id"]
    assert [ex["index"] for ex in failure.examples] == [0, 2]
    assert res.rejected.empty  # table-level failures do not quarantine rows
    msg = _raise_message(res)
    assert kind in msg and name in msg and "dup-id" in msg


def test_posts_site_post_id_compound_unique():
    df = posts_frame()
    other_site = df.iloc[[0]].assign(site="other.stackexchange.com")
    ok = pd.concat([df, other_site], ignore_index=True)  # same post_id, other site: fine
    assert validate(ok, "posts").passed
    dup = pd.concat([df, df.iloc[[4]]], ignore_index=True)
    res = validate(dup, "posts")
    assert not res.passed
    (failure,) = res.table_failures
    assert failure.expectation == "expect_compound_columns_to_be_unique(site, post_id)"
    assert {ex["post_id"] for ex in failure.examples} == {df.loc[4, "post_id"]}
    msg = _raise_message(res)
    assert "posts" in msg and "expect_compound_columns_to_be_unique" in msg and df.loc[4, "post_id"] in msg


@pytest.mark.parametrize("kind", KINDS)
def test_question_in_two_splits_fails(kind):
    df = FRAMES[kind]()
    if kind == "posts":
        df.loc[2, "split"] = "test"  # an answer of question 100, whose other rows are train
        qid = "100"
    else:
        df.loc[1, "question_id"] = df.loc[0, "question_id"]
        df.loc[1, "split"] = "validation" if df.loc[0, "split"] != "validation" else "test"
        qid = df.loc[0, "question_id"]
    res = validate(df, kind)
    assert not res.passed
    (failure,) = res.table_failures
    assert failure.expectation == "expect_question_ids_in_one_split"
    assert failure.examples[0]["question_id"] == qid
    assert len(failure.examples[0]["split"]) == 2
    msg = _raise_message(res)
    assert kind in msg and "expect_question_ids_in_one_split" in msg and qid in msg


def test_same_question_id_on_two_sites_may_use_two_splits():
    df = prompts_frame()
    df.loc[1, "question_id"] = df.loc[0, "question_id"]
    df.loc[1, "site"] = "other.stackexchange.com"
    df.loc[1, "split"] = "train"
    assert validate(df, "prompts").passed


def test_missing_required_column_fails():
    df = pairs_frame().drop(columns=["margin", "license"])
    res = validate(df, "pairs")
    assert not res.passed
    (failure,) = res.table_failures
    assert failure.expectation == "expect_table_columns_to_match_set"
    assert failure.examples == [{"missing_column": "license"}, {"missing_column": "margin"}]
    # expectations on the absent column are skipped rather than erroring
    assert "expect_column_values_to_be_between(margin)" in res.statistics["skipped_expectations"]
    msg = _raise_message(res)
    assert "pairs" in msg and "expect_table_columns_to_match_set" in msg and "margin" in msg


def test_expectation_that_cannot_run_fails_the_table():
    df = pairs_frame()
    df["margin"] = ["a", "b", "c", "d"]  # a numeric rule on text cannot say which rows are bad
    res = validate(df, "pairs")
    assert not res.passed and res.rejected.empty
    (failure,) = res.table_failures
    assert failure.expectation == "expect_column_values_to_be_between(margin)"
    assert "could not be evaluated" in failure.message
    assert "expect_column_values_to_be_between(margin)" in _raise_message(res)


def test_extra_columns_are_allowed():
    assert validate(prompts_frame().assign(extra=1), "prompts").passed


def test_row_and_table_failures_together():
    df = pairs_frame()
    df.loc[3, "pair_id"] = "p0"
    df.loc[1, "chosen"] = None
    res = validate(df, "pairs")
    assert not res.passed
    assert res.rejected.index.tolist() == [1]
    assert [f.expectation for f in res.table_failures] == ["expect_column_values_to_be_unique(pair_id)"]


# --------------------------------------------------------------------------- Data Docs


def test_data_docs_written_and_rerun_is_fine(tmp_path):
    docs = tmp_path / "docs"
    res1 = validate(pairs_frame(), "pairs", docs_dir=docs, batch_name="run-1")
    assert res1.docs_index is not None and res1.docs_index.name == "index.html"
    assert res1.docs_index.is_file()
    assert docs in res1.docs_index.parents
    bad = pairs_frame()
    bad.loc[0, "pair_id"] = "p1"
    bad.loc[2, "chosen"] = ""
    res2 = validate(bad, "pairs", docs_dir=docs, batch_name="run-2")  # same suite again: no "already exists"
    res3 = validate(prompts_frame(), "prompts", docs_dir=docs, batch_name="run-1")
    assert not res2.passed and res2.rejected.index.tolist() == [2]
    assert res3.passed and res3.docs_index == res1.docs_index
    pages = list((res1.docs_index.parent / "validations").rglob("*.html"))
    assert len(pages) == 3  # one page per run, all linked from the index
    index_html = res1.docs_index.read_text()
    assert "run-1" in index_html and "run-2" in index_html
    # the custom expectations render with their own sentences
    suite_page = (res1.docs_index.parent / "expectations" / "alignflow_pairs.html").read_text()
    assert "must have a single" in suite_page and "must never equal" in suite_page


# Renders Data Docs twice from the same frames in a fresh process: first with GX's own code (no memo of
# alignflow's is ever installed: ``_memoized_run`` does nothing), then with the memos of a validation run.
_DOCS_WITH_AND_WITHOUT_MEMOS = r"""
import contextlib, pickle, sys
import alignflow.data_contracts.contracts as c
frames = pickle.loads(open(sys.argv[1], "rb").read())
memoized = c._memoized_run
c._memoized_run = lambda graphs=None: contextlib.nullcontext()
for kind, name, df in frames:
    c.validate(df, kind, docs_dir=sys.argv[2], batch_name=name)
c._memoized_run = memoized
for kind, name, df in frames:
    c.validate(df, kind, docs_dir=sys.argv[3], batch_name=name)
print(sum(len(cache.code) for cache in c._TEMPLATE_CODE.values()))
"""


def _docs_pages(root) -> dict[str, str]:
    """Every file of a Data Docs folder, with what differs between two renderings of the same runs (the
    run times, ids and the folder itself) replaced by placeholders."""
    import re

    def same(text: str) -> str:
        text = text.replace(str(root), "ROOT")
        text = re.sub(r"\d{8}T\d{6}\.\d+Z", "TIME", text)
        text = re.sub(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(\+00:00|Z)?", "TIME", text)
        text = re.sub(r"'_run_time_sort': [\d.]+", "'_run_time_sort': TIME", text)
        return re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "UUID", text)

    return {same(str(p.relative_to(root))): same(p.read_text(errors="replace"))
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_data_docs_are_the_same_with_the_run_memos(tmp_path):
    """Compiled templates shared between pages, config variables read once per run and the configuration
    and row-filter memos (``_memoized_run``) change nothing in the pages GX writes: a page that failed to
    render, a missing style or a stale value would differ."""
    import pickle

    bad = pairs_frame()
    bad.loc[0, "pair_id"] = "p1"
    bad.loc[2, "chosen"] = ""
    frames = [("pairs", "run-1", pairs_frame()), ("pairs", "run-2", bad), ("prompts", "run-1", prompts_frame())]
    (tmp_path / "frames.pkl").write_bytes(pickle.dumps(frames))
    gx_own, memoized = tmp_path / "gx-own", tmp_path / "memoized"
    out = subprocess.run([sys.executable, "-c", _DOCS_WITH_AND_WITHOUT_MEMOS, str(tmp_path / "frames.pkl"),
                          str(gx_own), str(memoized)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "unexpected Exception occurred during data docs rendering" not in out.stderr
    assert int(out.stdout.split()[-1]) >= 10  # the templates were compiled once and then served from the cache
    pages, expected = _docs_pages(memoized), _docs_pages(gx_own)
    assert sorted(pages) == sorted(expected)
    assert sum(name.endswith(".html") for name in pages) >= 6  # index, suites and one page per run
    assert [name for name in pages if pages[name] != expected[name]] == []


def test_config_variables_are_read_once_per_file_version_and_handed_out_as_copies(tmp_path, monkeypatch):
    from great_expectations.core import config_provider
    from great_expectations.core.config_provider import _ConfigurationVariablesConfigurationProvider

    from alignflow.data_contracts.contracts import _config_variables_read_once

    variables = tmp_path / "variables.yml"
    variables.write_text("token: abc\n")
    provider = _ConfigurationVariablesConfigurationProvider("variables.yml", root_directory=str(tmp_path))
    parse, parsed = config_provider.yaml.load, []
    monkeypatch.setattr(config_provider.yaml, "load", lambda text: parsed.append(text) or parse(text))
    with _config_variables_read_once():
        first = provider.get_values()
        first["token"] = "changed by a caller"
        assert provider.get_values() == {"token": "abc"}  # the same file: parsed once; a copy each time
        assert len(parsed) == 1
        variables.write_text("token: a longer value\n")
        assert provider.get_values() == {"token": "a longer value"}  # the file changed: parsed again
        assert len(parsed) == 2
    assert provider.get_values() == {"token": "a longer value"} and len(parsed) == 3  # outside: GX's own read


def test_concurrent_validations_share_a_docs_dir(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    frames = [("pairs", pairs_frame()), ("demos", demos_frame()), ("prompts", prompts_frame())]
    with ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(lambda kf: validate(kf[1], kf[0], docs_dir=tmp_path, batch_name="concurrent"), frames)
        )
    assert all(r.passed for r in results)
    index = results[0].docs_index
    assert index is not None and all(r.docs_index == index for r in results)
    assert len(list((index.parent / "validations").rglob("*.html"))) == 3


def test_import_does_not_import_great_expectations():
    code = "import sys, alignflow.data_contracts; assert 'great_expectations' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_non_empty_rule_is_pythons_non_space_on_every_code_point_and_runs_in_pyarrow():
    # The non-empty rule is spelled as a character class so that pandas runs it in pyarrow (RE2) rather
    # than row by row in Python's re; it must still accept and refuse exactly what r"\S" does.
    from alignflow.data_contracts.contracts import NON_EMPTY_REGEX

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    values = pd.Series([*chars, "", " \t\n\r\x0b\x0c", "\u3000\u2028 x", "\xa0\x85"], dtype="str")
    ours = values.str.contains(NON_EMPTY_REGEX)
    python = values.map(lambda v: not v.isspace() and v != "")
    assert ours.tolist() == python.tolist()
    assert int((~ours).sum()) == 29 + 3  # the 29 characters str.isspace() accepts, and three blank texts
    assert not values.array._needs_python_regex(NON_EMPTY_REGEX)
    frame = pairs_frame()
    frame.loc[1, "chosen"] = "\u2003\u3000\n"  # blank in Unicode terms only
    res = validate(frame, "pairs")
    assert res.rejected.index.tolist() == [1] and "chosen" in res.rejected.loc[1, "expectation"]


def test_batches_are_not_fingerprinted(monkeypatch):
    # GX's per-batch fingerprint hashes every cell; nothing alignflow reports depends on it, so it is turned off.
    from great_expectations.execution_engine import pandas_execution_engine

    def refuse(df):
        raise AssertionError("GX fingerprinted a batch")

    monkeypatch.setattr(pandas_execution_engine, "hash_pandas_dataframe", refuse)
    frame = pairs_frame(50)
    frame.loc[3, "chosen"] = " "
    res = validate(frame, "pairs")
    assert res.passed and res.rejected.index.tolist() == [3]


@pytest.mark.parametrize("kind", list(FRAMES))
def test_run_memos_give_the_same_verdicts(monkeypatch, kind):
    """Within a validation run GX's expectation configurations are made once (a third of GX's time) and the
    batch is filtered once per row condition; outside a run, and without the memos, the verdicts, rejected
    rows and counts are the same."""
    import contextlib

    import alignflow.data_contracts.contracts as contracts
    from great_expectations.expectations.expectation import Expectation

    def frame():  # every row rule of the kind broken once, as in test_each_row_rule_rejects_exactly_its_bad_row
        cases = _cases(kind)
        df = posts_frame() if kind == "posts" else FRAMES[kind](2 * len(cases) + 1)
        for row, (mutate, _) in cases.items():
            mutate(df, row)
        return df

    memoize = contracts._memoized_run
    queries = []
    query = pd.DataFrame.query
    monkeypatch.setattr(pd.DataFrame, "query", lambda self, expr, **kw: queries.append(expr) or query(self, expr, **kw))
    memoized = validate(frame(), kind)
    memoized_queries = list(queries)
    assert len(memoized.rejected) == len(_cases(kind))
    assert getattr(Expectation, "_alignflow_memoized", False)
    monkeypatch.setattr(contracts, "_memoized_run", contextlib.nullcontext)
    queries.clear()
    plain = validate(frame(), kind)
    assert memoized.rejected.to_dict() == plain.rejected.to_dict()
    assert memoized.valid.index.tolist() == plain.valid.index.tolist()
    keep = lambda st: {k: v for k, v in st.items() if not k.startswith("seconds")}  # noqa: E731
    assert keep(memoized.statistics) == keep(plain.statistics)
    assert memoized.result_json["results"] == plain.result_json["results"]  # meta: the runs' times
    if kind == "posts":  # two row conditions (kind == question / answer): each filters the batch once per run
        conditions = sorted(set(queries))
        assert len(conditions) == 2 and len(queries) >= 8
        assert sorted(memoized_queries) == conditions  # a batch with bad rows: one GX run
    else:
        assert memoized_queries == queries == []
    # outside a run the property is GX's: a new configuration on each access
    exp = contracts._build_gx(expectations_for(kind)[0], 0)
    assert exp.configuration is not exp.configuration
    with memoize():
        assert exp.configuration is exp.configuration


@pytest.mark.parametrize("kind", list(FRAMES))
def test_a_suites_metric_graphs_are_built_once_and_serve_its_later_batches(monkeypatch, kind):
    """A suite's metric graphs (one set per result format) are built on its first run and handed to its
    later runs: no graph is built again, and a later batch's verdicts, rejected rows, counts and results
    are those of a fresh suite, whose run builds its own graphs (GX's code path)."""
    import alignflow.data_contracts.contracts as contracts
    from great_expectations.validator.validation_graph import ValidationGraph

    def bad():  # every row rule of the kind broken once
        cases = _cases(kind)
        df = posts_frame() if kind == "posts" else FRAMES[kind](2 * len(cases) + 1)
        for row, (mutate, _) in cases.items():
            mutate(df, row)
        return df

    clean = FRAMES[kind]()
    contracts._EPHEMERAL.clear()
    validate(clean, kind)  # pass/fail mode: its graphs
    validate(bad(), kind)  # then every failing row listed: the graphs of that format
    builds = []
    build = ValidationGraph.build_metric_dependency_graph
    monkeypatch.setattr(ValidationGraph, "build_metric_dependency_graph",
                        lambda self, *a, **k: builds.append(1) or build(self, *a, **k))
    later_clean, later = validate(clean, kind), validate(bad(), kind)
    assert builds == []
    assert later_clean.passed and later_clean.rejected.empty and len(later_clean.valid) == len(clean)
    contracts._EPHEMERAL.clear()
    fresh = validate(bad(), kind)
    assert builds  # the fresh suite built its graphs
    assert len(later.rejected) == len(_cases(kind))
    assert later.rejected.to_dict() == fresh.rejected.to_dict()
    assert later.valid.index.tolist() == fresh.valid.index.tolist()
    keep = lambda st: {k: v for k, v in st.items() if not k.startswith("seconds")}  # noqa: E731
    assert keep(later.statistics) == keep(fresh.statistics)

    def results(res):  # a fresh suite's expectations have ids of their own
        out = json.loads(json.dumps(res.result_json["results"]))
        for r in out:
            r["expectation_config"].pop("id")
        return out

    assert results(later) == results(fresh)


def test_a_result_carries_the_meta_of_a_validation_definition_run():
    """Batches run the validation definition's Validator directly (no freshness check, no results store);
    the result's meta holds what ``ValidationDefinition.run`` writes there, the dataframe left out."""
    res = validate(pairs_frame(20), "pairs")
    meta = res.result_json["meta"]
    assert meta["validation_id"] and meta["checkpoint_id"] is None
    assert meta["run_id"]["run_name"] == "batch" and meta["validation_time"]
    assert meta["batch_parameters"] == {"dataframe": "<DATAFRAME>"}
    assert meta["active_batch_definition"]["data_asset_name"] == "pairs"


def test_scipy_stats_is_loaded_only_when_something_uses_it():
    """GX imports scipy.stats for expectations no contract has (61 MiB per validating process): a validation
    leaves it unloaded, and code that uses it afterwards gets the real module."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        import pandas as pd
        from alignflow.data_contracts import validate
        frame = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["Why?", " "], "question_id": ["1", "2"],
                              "site": ["s", "s"], "source": ["stackexchange"] * 2, "split": ["train"] * 2})
        res = validate(frame, "prompts", with_json=False)
        print(res.rejected.index.tolist(), "great_expectations" in sys.modules)
        print(type(sys.modules["scipy.stats"]).__name__, sum(m.startswith("scipy.stats.") for m in sys.modules))
        print(type(sys.modules.get("altair")).__name__, sum(m.startswith("altair.") for m in sys.modules))
        from scipy import stats
        from scipy.stats import norm
        print(stats.norm.cdf(0.0), norm.ppf(0.5), type(sys.modules["scipy.stats"]).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "[1] True"  # the blank prompt is rejected: GX ran
    assert lines[1] == "_DeferredModule 0"  # nothing of scipy.stats was loaded
    assert lines[2] == "_DeferredModule 0"  # nor altair (a dependency of GX: always installed with it)
    assert lines[3] == "0.5 0.0 module"  # used: the real module, loaded on demand


def test_a_process_without_gx_integrations_validates_and_writes_docs_as_one_with_them(tmp_path):
    """The contract worker hides GX's SQL and Google Cloud integrations (hide_unused_integrations): the same
    verdicts, statistics and Data Docs as a process that has them, and none of their modules loaded."""
    import json
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        import pandas as pd
        from alignflow.data_contracts import contracts
        if sys.argv[2] == "hidden":
            contracts.hide_unused_integrations()
        frame = pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": ["Why?", " ", "How?"],
                              "question_id": ["1", "2", "3"], "site": ["s"] * 3, "source": ["stackexchange"] * 3,
                              "split": ["train", "train", "nonsense"]})
        res = contracts.validate(frame, "prompts", docs_dir=Path(sys.argv[1]), with_json=False)
        docs = list(Path(sys.argv[1]).rglob("*.html"))
        print(json.dumps({"rejected": res.rejected.index.tolist(), "statistics": res.statistics,
                          "docs": bool(res.docs_index) and len(docs) > 0,
                          "loaded": sorted({".".join(m.split(".")[:2 if m.startswith("google.") else 1])
                                            for m in sys.modules if sys.modules[m] is not None
                                            and m.startswith(("sqlalchemy", "google.auth", "google.cloud"))})}))
    """)
    seen = {}
    for mode in ("hidden", "installed"):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / mode), mode], capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        seen[mode] = json.loads(out.stdout.splitlines()[-1])
    hidden, installed = seen["hidden"], seen["installed"]
    assert hidden["loaded"] == []  # absent only where hidden
    assert {"google.auth", "sqlalchemy"} <= set(installed["loaded"])
    assert hidden["rejected"] == installed["rejected"] == [1, 2]  # the blank prompt, the unknown split
    counts = [{k: v for k, v in run["statistics"].items() if not k.startswith("seconds")}
              for run in (hidden, installed)]
    assert counts[0] == counts[1] and counts[0]["unsuccessful_expectations"] > 0  # timings aside, GX's own figures
    assert hidden["docs"] and installed["docs"]
