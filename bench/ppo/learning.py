"""PPO against a learned reward model on a generated dump: held-out reward and planted-property rate vs the SFT policy.

The whole recipe in one process, without tracking: a synthetic dump (planted rule:
an answer is preferred when it names the question's key term and has a code
block) -> ingest -> base LM pretrained on the dump's text -> SFT on the demos ->
reward model (from the base LM) trained on the pairs, centred on the validation
demos -> PPO on the train prompts. Evaluation on held-out (validation) prompts:
``evaluate_against_reference`` samples the PPO policy and the SFT policy with
the same seed and reports the reward model's mean score, the KL of the policy
to the SFT reference, the win rate and the planted-property rate of both.

    .venv/bin/python bench/ppo/learning.py                 # ~15 min of CPU on one thread
    .venv/bin/python bench/ppo/learning.py --ppo-steps 20  # shorter

Writes ``bench/ppo/results/learning.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lm-steps", type=int, default=600, help="base and SFT steps each")
    p.add_argument("--rm-steps", type=int, default=300)
    p.add_argument("--ppo-steps", type=int, default=40)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scratch", type=Path, default=HERE / "results" / "learning")
    p.add_argument("--out", type=Path, default=HERE / "results" / "learning.json")
    args = p.parse_args()

    import copy

    import pyarrow.parquet as pq
    import torch

    from alignflow.config import load_config
    from alignflow.models import reward_model_from_causal_lm
    from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
    from alignflow.tasks.ingest.synthetic import generate_dump, has_planted_property
    from alignflow.tasks.train import ppo
    from alignflow.tasks.train.lm import read_demos, train_base, train_sft
    from alignflow.tasks.train.reward import evaluate_pairs, normalize_bias, train_reward

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = load_config(None, [
        "base.model.arch=tiny-llama", f"base.train.max_steps={args.lm_steps}", "base.train.batch_size=16",
        "base.train.lr=3e-3", "base.train.eval_every=100000", "base.train.log_every=100",
        f"sft.train.max_steps={args.lm_steps}", "sft.train.batch_size=8", "sft.train.lr=2e-3",
        "sft.train.eval_every=100000", "sft.train.log_every=100",
        f"pm.train.max_steps={args.rm_steps}", "pm.train.batch_size=16", "pm.train.lr=1e-3",
        "pm.train.eval_every=100000", "pm.train.log_every=100", "pm.train.warmup_steps=10",
        f"ppo.total_steps={args.ppo_steps}", "ppo.batch_size=32", "ppo.minibatch_size=16", "ppo.micro_batch_size=16",
        "ppo.forward_batch_size=32", "ppo.max_new_tokens=128", "ppo.max_prompt_tokens=128", "ppo.lr=2e-4",
        "ppo.kl_coef=0.05", f"ppo.seed={args.seed}",
    ])
    dump = generate_dump(args.scratch / "dump", questions=args.questions, seed=args.seed)
    data = Path(execute_ingest(plan_ingest([dump], args.scratch / "work", cfg.ingest), cfg.ingest).out_dir)
    base = train_base(cfg.base, data / "posts.parquet", checkpoint_dir=None, resume=False)
    tok = base.tokenizer
    reward = reward_model_from_causal_lm(base.model, tokenizer=tok, seed=args.seed)
    sft = train_sft(cfg.sft, copy.deepcopy(base.model), tok, data / "demos.parquet", checkpoint_dir=None,
                    resume=False)
    pairs = pq.read_table(data / "pairs.parquet").to_pylist()
    train_pairs = [r for r in pairs if r["split"] == "train"]
    valid_pairs = [r for r in pairs if r["split"] != "train"]
    train_reward(cfg.pm.train, reward, tok, train_pairs, valid_pairs, max_length=cfg.pm.model.max_length)
    rm_eval = evaluate_pairs(reward, tok, valid_pairs, batch_size=16, max_length=cfg.pm.model.max_length, n_worst=0)
    demos = read_demos(data / "demos.parquet", "validation")
    normalize_bias(reward, tok, [d["prompt"] for d in demos], [d["response"] for d in demos],
                   max_length=cfg.pm.model.max_length)
    t_recipe = time.perf_counter() - t0

    prompts = pq.read_table(data / "prompts.parquet", columns=["prompt", "question_id", "site", "split"]).to_pylist()
    train_prompts = [r["prompt"] for r in prompts if r["split"] == "train"]
    held_out = [r for r in prompts if r["split"] == "validation"][: args.eval_prompts]
    posts = pq.read_table(data / "posts.parquet", columns=["site", "post_id", "kind", "title", "body"]).to_pylist()
    questions = {(r["site"], r["post_id"]): (r["title"], r["body"]) for r in posts if r["kind"] == "question"}
    keyed = [questions.get((r["site"], r["question_id"])) for r in held_out]

    def judge(i: int, response: str) -> bool:
        return keyed[i] is not None and has_planted_property(keyed[i][0], keyed[i][1], response)

    reward_fn = ppo.text_reward_fn(reward, tok, batch_size=32, max_length=cfg.pm.model.max_length)
    policy = copy.deepcopy(sft.model)
    reference = ppo.frozen_copy(sft.model)
    curve = []
    t1 = time.perf_counter()
    result = ppo.train_ppo(cfg.ppo, policy=policy, tokenizer=tok, critic=ppo.make_critic(reward),
                           reward_fn=reward_fn, prompts=train_prompts, reference=reference,
                           callbacks=ppo.PpoCallbacks(on_log=lambda m, s: curve.append({"step": s, **m})))
    t_ppo = time.perf_counter() - t1
    metrics, _ = ppo.evaluate_against_reference(result.policy, reference, tok, reward_fn, [r["prompt"] for r in held_out],
                                                cfg.ppo, judge=judge)
    out = {"eval": metrics, "reward_model": {k: v for k, v in rm_eval.items() if k.startswith("eval/")},
           "ppo_curve": [{k: c[k] for k in ("step", "ppo/reward_mean", "ppo/kl", "ppo/no_eos_rate",
                                            "ppo/response_length")} for c in curve],
           "seconds": {"recipe": t_recipe, "ppo": t_ppo}, "args": {k: str(v) for k, v in vars(args).items()},
           "ppo_config": cfg.ppo.model_dump(mode="json")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({"eval": metrics, "reward_model_accuracy": rm_eval.get("eval/pairwise_accuracy"),
                      "seconds": out["seconds"]}, indent=2))


if __name__ == "__main__":
    main()
