"""Break one line at a time and show that a test fails: the one-line mutations of PPO and reward training.

    .venv/bin/python tests/mutation_check.py [NAME ...]      # all mutations, or the named ones

Each mutation replaces one exact line of the source (it must occur exactly
once, so a drifted source is reported, not silently skipped), runs the tests
that guard it, and restores the file whatever happens. The script exits 0
when every mutation makes at least one of its tests fail ("caught"), 1 when a
mutation survives, 2 when a line to mutate is not found. It edits files in
place: run it on a clean checkout, never beside another run. pytest does not
collect it (not a ``test_*.py`` file).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    line: str  # the exact original text (one line, stripped of its indentation)
    replacement: str  # the broken line, same indentation
    tests: tuple[str, ...]  # pytest node ids (file::test)


PPO = "tasks/train/ppo.py"
T_PPO = "tests/test_ppo.py::"
T_REWARD = "tests/test_reward.py::"

MUTATIONS = (
    Mutation("kl-sign", PPO,
             "rewards = shaped_rewards(ro.scores, kl_in_reward, ro.response_mask, beta)",
             "rewards = shaped_rewards(ro.scores, -kl_in_reward, ro.response_mask, beta)",
             (T_PPO + "test_kl_penalty_pulls_a_drifted_policy_back_to_the_reference",)),
    Mutation("missing-eos-penalty", PPO,
             "scores = apply_missing_eos_penalty(raw, has_eos, cfg.missing_eos, cfg.missing_eos_penalty)",
             "scores = raw",
             (T_PPO + "test_responses_without_eos_are_penalised_in_the_training_step",)),
    Mutation("advantage-whitening", PPO,
             "advantages = masked_whiten(advantages, ro.response_mask)",
             "advantages = advantages",
             (T_PPO + "test_advantages_are_whitened_in_the_training_step",)),
    Mutation("micro-batch-scaling", PPO,
             "loss = (pg_loss + cfg.vf_coef * vf_loss) * weight  # accumulated micro-batches sum to the minibatch mean",
             "loss = pg_loss + cfg.vf_coef * vf_loss",
             (T_PPO + "test_micro_batches_accumulate_to_the_minibatch_gradient_in_the_training_step",)),
    Mutation("policy-dropout", PPO,
             "disable_dropout(policy)",
             "pass",
             (T_PPO + "test_dropout_is_off_in_the_update_of_a_policy_built_with_dropout",)),
    Mutation("fp32-master-weights", PPO,
             "policy.float()",
             "pass",
             (T_PPO + "test_bf16_policy_trains_fp32_master_weights",)),
    Mutation("critic-tokenizer", PPO,
             "if reward_tokenizer is not None and policy_tokenizer is not None and not same_tokenization(",
             "if False and (",
             (T_PPO + "test_critic_is_built_on_the_policy_tokenizer_when_the_reward_model_tokenizes_differently",)),
    Mutation("reward-training-dropout", "tasks/train/reward.py",
             "disable_dropout(model)  # a reward model's score must not be noise (a loaded model may have dropout on)",
             "pass",
             (T_REWARD + "test_training_step_of_a_reward_model_with_dropout_runs_without_it",)),
)


def apply(m: Mutation, source: str) -> str:
    lines = source.split("\n")
    hits = [i for i, text in enumerate(lines) if text.strip() == m.line]
    if len(hits) != 1:
        raise LookupError(f"{m.path}: the line to mutate occurs {len(hits)} times (expected once): {m.line!r}")
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = indent + m.replacement
    return "\n".join(lines)


def run(m: Mutation) -> bool:
    """True when the mutation is caught (a test fails)."""
    path = ROOT / m.path
    original = path.read_text()
    mutated = apply(m, original)
    try:
        path.write_text(mutated)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                              cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(original)
    return proc.returncode != 0


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or m.name in argv]
    unknown = set(argv) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"error: unknown mutation(s) {', '.join(sorted(unknown))}; known: {', '.join(m.name for m in MUTATIONS)}")
        return 2
    survived = []
    for m in chosen:
        started = time.perf_counter()
        try:
            caught = run(m)
        except LookupError as err:
            print(f"error: {err}")
            return 2
        print(f"{m.name:24s} {'caught' if caught else 'SURVIVED'}  ({time.perf_counter() - started:.0f} s)", flush=True)
        if not caught:
            survived.append(m.name)
    print(f"{len(chosen) - len(survived)}/{len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
