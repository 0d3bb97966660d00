"""Learning, not just running: SFT makes the policy write the generator's planted property.

On a generated dump, greedy answers of the SFT policy to held-out prompts carry
the planted property (the question's key term and a code block) far more
often than the base LM's. Settings measured on four seeds: base 0.03-0.11,
SFT 0.89-1.00 (see tasks/ingest/synthetic.py for the rule). About 1.5 minutes
of CPU on one thread.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from alignflow.config import load_config
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
from alignflow.tasks.ingest.synthetic import generate_dump, has_planted_property
from alignflow.tasks.train.lm import generate_greedy, read_demos, train_base, train_sft

pytestmark = pytest.mark.slow

SETTINGS = [
    "base.model.arch=tiny-llama", "base.train.max_steps=600", "base.train.batch_size=16", "base.train.lr=3e-3",
    "base.train.eval_every=1000", "base.train.log_every=100",
    "sft.train.max_steps=600", "sft.train.batch_size=8", "sft.train.lr=2e-3", "sft.train.eval_every=1000",
    "sft.train.log_every=100", "sft.max_new_tokens=64",
]


def test_sft_raises_the_planted_property_rate_over_the_base_lm(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster and steadier than 2 threads on a shared 2-core machine
    try:
        cfg = load_config(None, SETTINGS)
        dump = generate_dump(tmp_path / "dump", questions=1000, seed=0)
        data = execute_ingest(plan_ingest([dump], tmp_path / "work", cfg.ingest), cfg.ingest).out_dir
        posts = pd.read_parquet(f"{data}/posts.parquet")
        questions = posts[posts.kind == "question"].set_index(["site", "post_id"])
        held_out = (read_demos(f"{data}/demos.parquet", "validation") + read_demos(f"{data}/demos.parquet", "test"))[:64]
        cases = [(d["prompt"], *questions.loc[(d["site"], d["question_id"])][["title", "body"]]) for d in held_out]
        assert len(cases) >= 40

        def planted_rate(model, tok) -> float:
            answers = generate_greedy(model, tok, [c[0] for c in cases], max_new_tokens=cfg.sft.max_new_tokens,
                                      max_prompt_tokens=cfg.sft.model.max_length)
            return sum(has_planted_property(t, b, a) for (_, t, b), a in zip(cases, answers)) / len(cases)

        base = train_base(cfg.base, f"{data}/posts.parquet", checkpoint_dir=None, resume=False)
        base_rate = planted_rate(base.model, base.tokenizer)
        sft = train_sft(cfg.sft, base.model, base.tokenizer, f"{data}/demos.parquet", checkpoint_dir=None,
                        resume=False)
        sft_rate = planted_rate(sft.model, sft.tokenizer)
    finally:
        torch.set_num_threads(threads)
    print(f"planted-property rate on {len(cases)} held-out prompts: base {base_rate:.2f} -> SFT {sft_rate:.2f}")
    assert sft_rate - base_rate >= 0.4, (base_rate, sft_rate)
