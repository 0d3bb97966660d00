"""Simulated labelers through the real HTTP server: the scores recover the planted truth."""

from __future__ import annotations

import random

import pytest

from alignflow.tasks.label.report import batch_report, human_pairs
from alignflow.tasks.label.scores import ELO_SCALE
from alignflow.tasks.label.server import background_server
from alignflow.tasks.label.simulate import LabelerModel, planted_strength, run_labelers, simulated_answer
from alignflow.tasks.label.store import LabelStore

TRUTH = {"strong": 1.0, "middle": 0.0, "weak": -1.0}  # natural units: P(strong beats middle) = 0.73


def _strength(_prompt: str, text: str) -> float:
    return TRUTH[text.split("]", 1)[0].lstrip("[")]


def _batch(n: int) -> list[dict]:
    return [{"item_id": f"i{i}", "prompt_id": f"p{i}", "prompt": f"Question {i}",
             "responses": [{"id": f"r{j}", "text": f"[{pol}] answer {i}", "policy": pol}
                           for j, pol in enumerate(TRUTH)]} for i in range(n)]


def test_planted_strength_follows_the_generated_dump_rule():
    from alignflow.tasks.ingest.synthetic import TITLE_WORDS

    word = sorted(TITLE_WORDS)[0]
    prompt = f"Question: {word} vralquinor {word}\n\nHow does vralquinor work?\n\nAnswer: "
    assert planted_strength(prompt, "Use vralquinor like this:\n```\nx = 1\n```") == 1.0
    assert planted_strength(prompt, "Use vralquinor like this.") == 0.0
    assert planted_strength(prompt, "```\nx = 1\n```") == 0.0


def test_simulated_answers_ties_and_ab_scale():
    rng = random.Random(0)
    exact = LabelerModel(strength=_strength, noise=0.0)
    resp = [{"id": "a", "text": "[weak] x"}, {"id": "b", "text": "[strong] y"}, {"id": "c", "text": "[weak] z"}]
    assert simulated_answer(exact, "p", resp, rng) == {"ranking": [["b"], ["a", "c"]]}
    assert simulated_answer(exact, "p", resp[:2], rng) == {"ab": 3}  # B (strong) much better
    assert simulated_answer(exact, "p", [resp[0], resp[2]], rng) == {"ab": 0}
    first = LabelerModel(strength=_strength, noise=0.0, position_bias=5.0)
    assert simulated_answer(first, "p", resp, rng)["ranking"][0] == ["a"]


@pytest.mark.slow
def test_simulated_labelers_through_http_recover_the_policy_order(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path / 'label.db'}")
    store.create_batch("b1", "sim", _batch(180), overlap=2)
    tokens = [store.invite(f"sim{i}") for i in range(4)]
    with background_server(store) as url:
        stats = run_labelers(url, tokens, "b1", model=LabelerModel(strength=_strength, noise=1.0), seed=3)
    assert not stats.refused and stats.errors == 0
    rows = store.export("b1")
    assert sorted(stats.accepted) == sorted(r["submission_id"] for r in rows) and len(rows) == 360
    report = batch_report(rows, rounds=200)
    board = report["leaderboard"]["rows"]
    assert [r["item"] for r in board] == ["strong", "middle", "weak"]
    scores = {r["item"]: r["score"] for r in board}
    # Plackett-Luce with Gumbel(1) noise has pairwise marginals σ(Δ): the truth is Δ·400/ln 10 = 174 Elo. The
    # labelers run on threads, so which labeler draws which item, and the estimate, vary from run to run: over 8
    # seeds the gap's error had a standard deviation of 18.5 Elo with 360 rankings (40 with 120, where a bound of
    # 150 failed once in CI). 120 is 6.5 of them, and a scale off by 2x (an error of 174) still fails.
    for a, b in (("strong", "middle"), ("middle", "weak")):
        assert abs(scores[a] - scores[b] - (TRUTH[a] - TRUTH[b]) * ELO_SCALE) < 120
    assert all(r["distinguishable_from_next"] for r in board[:-1])
    assert 0.4 < report["agreement"]["pairwise"] < 0.95
    pairs = human_pairs(rows, site="human/b1")
    assert len(pairs) > 0 and all(0 < p["weight"] <= 1 for p in pairs)
    store.close()
