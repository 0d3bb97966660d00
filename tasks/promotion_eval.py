"""The held-out evaluations behind the promotion gates: challenger and champion measured the same way.

An evaluator is ``fn(model_name, challenger_version, champion_version) ->
GateFigures``; :func:`default_evaluator` builds the one the flow ``promote``
uses, from a work directory's latest datasets and the ``promote`` config:

* preference models (pmp, reward): :func:`alignflow.tasks.train.reward.evaluate_pairs`
  on held-out pairs (figure ``pairwise_accuracy``, ``margin_mean``).
* policies: greedy answers to held-out prompts, scored by the reward model
  (``alignflow-reward@champion``, else ``@challenger``) -> ``reward_mean``;
  ``kl_to_reference``: KL(policy || reference) summed over the answer tokens
  (full next-token distributions on the policy's own answer), mean over
  prompts; ``win_rate``: share of prompts where the challenger out-scores the
  champion (ties 1/2). The reference is the policy version's ``reference_model``
  or ``start_model`` tag when it names a registered version, else
  ``alignflow-policy-sft@champion`` (or ``@challenger``).
* language models (base, policy-sft): token-weighted held-out loss on post
  texts (base) or demo responses (policy-sft).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignflow.stages import REWARD_MODEL, SFT_MODEL, stage_of_model
from alignflow.tasks.promotion import gate_kind


@dataclass
class GateFigures:
    challenger: dict[str, float]
    champion: dict[str, float] | None
    info: dict[str, str] = field(default_factory=dict)  # what was evaluated against what (recorded as params)
    examples: list[dict[str, Any]] = field(default_factory=list)  # rows for a table artifact


Evaluator = Callable[[str, str, "str | None"], GateFigures]


def win_rate(challenger: Sequence[float], champion: Sequence[float]) -> float:
    """Share of items where the challenger's reward is higher (ties count 1/2)."""
    if len(challenger) != len(champion) or not challenger:
        raise ValueError(f"win rate needs two equal, non-empty lists ({len(challenger)} vs {len(champion)})")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(challenger, champion))
    return wins / len(challenger)


def fit_length(model: Any, max_length: int) -> int:
    """``max_length`` cut to the model's position table."""
    cfg = getattr(model, "config", None)
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(max_length, positions) if positions else max_length


def load_version(name: str, version: str) -> tuple[Any, Any]:
    from alignflow.tasks.registry import load_version_components

    return load_version_components(name, version)


def _alias_version(name: str, *aliases: str) -> str | None:
    from alignflow.tasks import registry

    for alias in aliases:
        version = registry.resolve_version(name, alias)
        if version is not None:
            return version
    return None


# -- held-out data ---------------------------------------------------------------------------------
def heldout_rows(path: Path, split: str, limit: int, columns: list[str] | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=columns)
    rows = [r for r in table.to_pylist() if r.get("split") == split]
    if not rows:
        raise LookupError(f"no {split!r} rows in {path}; set promote.eval_split to a split that has rows")
    return rows[:limit]


# -- figures -----------------------------------------------------------------------------------------
def preference_figures(model: Any, tokenizer: Any, rows: Sequence[dict], *, batch_size: int,
                       max_length: int) -> dict[str, float]:
    from alignflow.tasks.train.reward import evaluate_pairs

    out = evaluate_pairs(model, tokenizer, rows, batch_size=batch_size, max_length=max_length, n_worst=0)
    return {k.removeprefix("eval/"): float(v) for k, v in out.items()
            if k in ("eval/pairwise_accuracy", "eval/margin_mean", "eval/pairs", "eval/ece")}


def lm_figures(model: Any, tokenizer: Any, examples: Sequence[dict], *, batch_size: int) -> dict[str, float]:
    from alignflow.tasks.train.lm import evaluate_lm

    out = evaluate_lm(model, examples, tokenizer.pad_token_id, batch_size=batch_size,
                      max_batches=len(examples) // batch_size + 1)
    return {"loss": out["eval/loss"], "perplexity": out["eval/perplexity"], "tokens": out["eval/tokens"]}


@torch.no_grad()
def kl_per_answer(policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *,
                  max_length: int) -> list[float]:
    """Σ over answer tokens of KL(policy(·|context) || reference(·|context)), one figure per answer."""
    if policy.get_output_embeddings().weight.shape[0] != reference.get_output_embeddings().weight.shape[0]:
        raise ValueError("policy and reference have different vocabularies; KL needs a shared tokenizer")
    device = next(policy.parameters()).device
    out = []
    for prompt, answer in zip(prompts, answers):
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        a = a[: max_length - 1]
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"][-(max_length - len(a)):]
        ids = torch.tensor([p + a], device=device)
        lp = torch.log_softmax(policy(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)
        lr = torch.log_softmax(reference(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)
        out.append(float((lp.exp() * (lp - lr)).sum()))
    return out


def policy_answers(policy: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                   max_length: int, batch_size: int, sampling: dict[str, Any] | None = None) -> list[str]:
    """Answers in batches: greedy, or sampled with ``sampling`` (``generate`` arguments, e.g. ``do_sample``)."""
    from alignflow.tasks.train.lm import generate_greedy

    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        answers += generate_greedy(policy, tokenizer, list(prompts[start : start + batch_size]),
                                   max_new_tokens=max_new_tokens, max_prompt_tokens=max_length, sampling=sampling)
    return answers


def _reference_of(name: str, version: str) -> tuple[str, str]:
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version(name, version).tags
    for key in ("reference_model", "start_model"):
        uri = tags.get(key, "")
        if uri.startswith("models:/"):
            ref_name, _, ref_version = uri.removeprefix("models:/").partition("/")
            if ref_name and ref_version.isdigit():
                return ref_name, ref_version
    ref_version = _alias_version(SFT_MODEL, "champion", "challenger")
    if ref_version is None:
        raise LookupError(f"no reference policy: {SFT_MODEL} has neither champion nor challenger")
    return SFT_MODEL, ref_version


# -- the default evaluator ------------------------------------------------------------------------------
def default_evaluator(workdir: Path, cfg: Any) -> Evaluator:
    """The evaluator the ``promote`` flow uses: ``cfg`` is the ``promote`` config section."""

    def data_dir() -> Path:
        from alignflow.tasks.ingest.run import latest_datasets

        return latest_datasets(Path(workdir))

    def evaluate(name: str, challenger: str, champion: str | None) -> GateFigures:
        kind = gate_kind(name)
        versions = [challenger] + ([champion] if champion is not None else [])
        figures: list[dict[str, float]] = []
        info: dict[str, str] = {"eval_split": cfg.eval_split}
        examples: list[dict[str, Any]] = []
        if kind == "preference":
            rows = heldout_rows(data_dir() / "pairs.parquet", cfg.eval_split, cfg.eval_pairs)
            info["eval_pairs"] = str(len(rows))
            for v in versions:
                model, tok = load_version(name, v)
                figures.append(preference_figures(model, tok, rows, batch_size=cfg.batch_size,
                                                  max_length=fit_length(model, cfg.max_length)))
        elif kind == "lm":
            from alignflow.tasks.train.lm import document_examples, iter_post_texts, sft_example

            data = data_dir()
            for v in versions:
                model, tok = load_version(name, v)
                length = fit_length(model, cfg.max_length)
                if "demos" in getattr(stage_of_model(name), "reads", ()):  # a policy: its demos, else posts
                    demos = heldout_rows(data / "demos.parquet", cfg.eval_split, cfg.eval_texts,
                                         ["prompt", "response", "split"])
                    exs = [e for d in demos if (e := sft_example(tok, d["prompt"], d["response"], length))]
                    info["eval_texts"] = f"{len(demos)} demos"
                else:
                    texts = list(iter_post_texts(data / "posts.parquet", kinds=["questions", "answers"],
                                                 split=cfg.eval_split, limit=cfg.eval_texts))
                    if not texts:
                        raise LookupError(f"no {cfg.eval_split!r} posts to evaluate {name} on")
                    exs = document_examples(tok, texts, length)
                    info["eval_texts"] = f"{len(texts)} posts"
                figures.append(lm_figures(model, tok, exs, batch_size=cfg.batch_size))
        else:  # policy
            import pyarrow.parquet as pq

            from alignflow.tasks import evaluation

            data = data_dir()
            present = set(pq.read_schema(data / "prompts.parquet").names)
            rows = heldout_rows(data / "prompts.parquet", cfg.eval_split, cfg.eval_prompts,
                                [c for c in ("prompt", "split", "site", "question_id") if c in present])
            prompts = [r["prompt"] for r in rows]
            # an external judge where the data has one (the planted rule of a generated dump): a policy that pleases
            # the reward model while losing what the judge checks is over-optimised, whatever its KL
            judge = evaluation.judge_for(data, rows)
            reward_version = _alias_version(REWARD_MODEL, "champion", "challenger")
            if reward_version is None:
                raise LookupError(f"the policy gate needs a reward model: register {REWARD_MODEL} first")
            reward_model, reward_tok = load_version(REWARD_MODEL, reward_version)
            ref_name, ref_version = _reference_of(name, challenger)
            reference, ref_tok = load_version(ref_name, ref_version)
            info.update({"reward_model": f"models:/{REWARD_MODEL}/{reward_version}",
                         "reference_model": f"models:/{ref_name}/{ref_version}", "eval_prompts": str(len(prompts))})
            from alignflow.models.reward import score_texts

            rewards: list[list[float]] = []
            all_answers: list[list[str]] = []
            for v in versions:
                policy, tok = load_version(name, v)
                length = min(fit_length(policy, cfg.max_length), fit_length(reference, cfg.max_length))
                answers = policy_answers(policy, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                                         max_length=length, batch_size=cfg.batch_size)
                r = score_texts(reward_model, reward_tok, prompts, answers, batch_size=cfg.batch_size,
                                max_length=fit_length(reward_model, cfg.max_length))
                kl = kl_per_answer(policy, reference, tok, prompts, answers, max_length=length)
                rewards.append(r)
                all_answers.append(answers)
                figures.append({"reward_mean": sum(r) / len(r), "kl_to_reference": sum(kl) / len(kl),
                                "prompts": float(len(prompts))})
                if judge is not None:
                    figures[-1]["judged_rate"] = evaluation.rate(judge, [answers[i] for i in judge.judged],
                                                                 judge.judged)
            if judge is not None:
                ref_answers = policy_answers(reference, ref_tok, [prompts[i] for i in judge.judged],
                                             max_new_tokens=cfg.max_new_tokens,
                                             max_length=fit_length(reference, cfg.max_length),
                                             batch_size=cfg.batch_size)
                figures[0]["judged_rate_reference"] = evaluation.rate(judge, ref_answers, judge.judged)
                info.update({"judge": judge.name, "judged_prompts": str(len(judge.judged))})
            if champion is not None:
                figures[0]["win_rate"] = win_rate(rewards[0], rewards[1])
            for i, p in enumerate(prompts[:8]):
                row = {"prompt": p[-300:], "challenger": all_answers[0][i], "challenger_reward": rewards[0][i]}
                if champion is not None:
                    row.update({"champion": all_answers[1][i], "champion_reward": rewards[1][i]})
                examples.append(row)
        return GateFigures(figures[0], figures[1] if champion is not None else None, info, examples)

    return evaluate
