"""The pipeline's report: one self-contained HTML page (PNG figures inlined) to look at instead of metric tables.

Pure work, no MLflow or Prefect: histories, figures and answers in, files out.
``flows/report.py`` gathers them from the pipeline's runs and logs the page.

What the page shows
    * the alignment table: for base LM, SFT and PPO policies, on the same
      held-out prompts, the planted-property rate of greedy answers and of
      sampled ones (temperature 1, with a 95% interval), the reward model's
      mean score and the KL to the SFT policy (PPO's reference), with
      :func:`alignment_figures`. Greedy answers show the policy's most likely
      answer, which saturates: once SFT puts the property on top for every
      prompt, greedy cannot tell a policy that writes it 70% of the time from
      one that writes it 90%. Sampled answers measure the whole distribution,
      which is what PPO moves;
    * the learning curves of every stage (``train/loss``, held-out figures,
      PPO's reward and KL per step);
    * PPO's reward against its KL to the reference, step by step;
    * the reward model's calibration (the reliability diagram of the ``pm`` run);
    * the planted-property rate per stage as bars;
    * greedy answers of base, SFT and PPO to the same three prompts, side by side.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

History = Sequence[tuple[int, float]]

# (stage, metric) pairs drawn as learning curves, in page order; absent ones are left out
CURVES: tuple[tuple[str, str], ...] = (
    ("base", "train/loss"), ("base", "eval/loss"),
    ("pmp", "train/loss"), ("pmp", "eval/pairwise_accuracy"),
    ("pm", "train/loss"), ("pm", "eval/pairwise_accuracy"),
    ("sft", "train/loss"), ("sft", "eval/loss"),
    ("ppo", "ppo/reward_mean"), ("ppo", "ppo/kl"),
)
POLICIES = ("base", "sft", "ppo")
LABELS = {"base": "base LM", "sft": "SFT", "ppo": "PPO"}


def alignment_figures(
    policies: Mapping[str, tuple[Any, Any]],
    reference: tuple[Any, Any],
    score: Callable[[Sequence[str], Sequence[str]], Sequence[float]] | None,
    questions: Sequence[Mapping[str, str]],
    judge: Callable[[Mapping[str, str], str], bool],
    *,
    max_new_tokens: int,
    max_length: int,
    batch_size: int = 16,
    samples_per_prompt: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """Greedy (and sampled) answers of each policy to the same held-out prompts, and what they show.

    ``policies``: label -> (model, tokenizer); ``reference``: (model, tokenizer) of the SFT policy;
    ``score(prompts, answers)``: the reward model (None: no reward figure); ``judge(question, answer)``: has the
    planted property.
    Returns ``({label: {planted_rate, reward_mean, kl_to_sft, ...}}, {label: greedy answers})``. The KL is
    summed over the answer tokens (full next-token distributions), as the policy gate measures it; it needs
    the policy to share the reference's tokenizer (else it is left out).
    ``samples_per_prompt`` > 0 also samples that many answers per prompt (``temperature``, no top-k; the
    generators are seeded with ``seed`` for each policy and restored afterwards) and adds
    ``sampled_planted_rate`` with its 95% Wilson interval (``sampled_ci_low`` / ``sampled_ci_high``) over
    ``samples`` answers.
    """
    from alignflow.tasks.promotion_eval import fit_length, kl_per_answer, policy_answers
    from alignflow.tasks.train.checkpoint import rng_isolated
    from alignflow.tasks.train.reward import wilson_interval

    prompts = [q["prompt"] for q in questions]
    figures: dict[str, dict[str, float]] = {}
    answers: dict[str, list[str]] = {}
    ref_model, ref_tok = reference
    for label, (model, tok) in policies.items():
        out = policy_answers(model, tok, prompts, max_new_tokens=max_new_tokens,
                             max_length=fit_length(model, max_length), batch_size=batch_size)
        answers[label] = out
        row = {"planted_rate": sum(judge(q, a) for q, a in zip(questions, out)) / max(len(out), 1),
               "prompts": float(len(out))}
        if score is not None:
            rewards = list(score(prompts, out))
            row["reward_mean"] = sum(rewards) / max(len(rewards), 1)
        if tok.get_vocab() == ref_tok.get_vocab():
            kl = kl_per_answer(model, ref_model, tok, prompts, out,
                               max_length=min(fit_length(model, max_length), fit_length(ref_model, max_length)))
            row["kl_to_sft"] = sum(kl) / max(len(kl), 1)
        if samples_per_prompt > 0 and questions:
            with rng_isolated():
                torch.manual_seed(seed)
                sampled = [policy_answers(model, tok, prompts, max_new_tokens=max_new_tokens,
                                          max_length=fit_length(model, max_length), batch_size=batch_size,
                                          sampling={"do_sample": True, "temperature": temperature, "top_k": 0})
                           for _ in range(samples_per_prompt)]
            hits = sum(judge(q, a) for draw in sampled for q, a in zip(questions, draw))
            n = len(questions) * samples_per_prompt
            low, high = wilson_interval(hits, n)
            row.update({"sampled_planted_rate": hits / n, "sampled_ci_low": low, "sampled_ci_high": high,
                        "samples": float(n)})
        figures[label] = row
    return figures, answers


# ------------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(histories: Mapping[tuple[str, str], History], path: Path) -> Path | None:
    """One panel per stage, its curves on it (a second metric on a twin axis)."""
    stages = [s for s in dict.fromkeys(stage for stage, _ in CURVES) if any(
        histories.get((s, m)) for st, m in CURVES if st == s)]
    if not stages:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        metrics = [m for st, m in CURVES if st == stage and histories.get((st, m))]
        for i, metric in enumerate(metrics[:2]):
            target = ax if i == 0 else ax.twinx()
            steps, values = zip(*histories[(stage, metric)])
            target.plot(steps, values, marker="." if len(steps) < 30 else None, color=f"C{i}", label=metric)
            target.set_ylabel(metric, color=f"C{i}")
        ax.set_title(stage)
        ax.set_xlabel("step")
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_reward_vs_kl(reward: History, kl: History, path: Path) -> Path | None:
    """PPO: mean reward of the batch against its KL to the reference, one point per step (colour = step)."""
    kl_at = dict(kl)
    points = [(step, kl_at[step], r) for step, r in reward if step in kl_at]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    steps, xs, ys = zip(*points)
    ax.plot(xs, ys, color="lightgrey", zorder=1)
    sc = ax.scatter(xs, ys, c=steps, cmap="viridis", zorder=2)
    fig.colorbar(sc, ax=ax, label="PPO step")
    ax.set_xlabel("KL to the reference (nats per response)")
    ax.set_ylabel("reward (batch mean)")
    ax.set_title("PPO: reward vs KL")
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_planted_rates(figures: Mapping[str, Mapping[str, float]], path: Path) -> Path | None:
    """Bars per policy: the planted rate of greedy answers and, when measured, of sampled ones (with its interval)."""
    labels = [p for p in POLICIES if p in figures]
    if not labels:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    sampled = all("sampled_planted_rate" in figures[p] for p in labels)
    width = 0.38 if sampled else 0.7
    xs = range(len(labels))
    # the sampling temperature is the caller's (flows/report.py names it in the summary and the table)
    series = [("greedy", "planted_rate", "C0")] + ([("sampled", "sampled_planted_rate", "C2")] if sampled else [])
    for i, (name, key, colour) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        rates = [figures[p][key] for p in labels]
        err = None
        if key == "sampled_planted_rate":
            err = [[r - figures[p]["sampled_ci_low"] for p, r in zip(labels, rates)],
                   [figures[p]["sampled_ci_high"] - r for p, r in zip(labels, rates)]]
        bars = ax.bar([x + offset for x in xs], rates, width, color=colour, label=name, yerr=err, capsize=3)
        for bar, rate in zip(bars, rates):
            ax.text(bar.get_x() + bar.get_width() / 2, rate + 0.03, f"{rate:.2f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), [LABELS[p] for p in labels])
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("share of answers with the property")
    ax.set_title(f"Planted property on {int(figures[labels[0]]['prompts'])} held-out prompts")
    if sampled:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- the page


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).exists():
        return f"<p><em>{html.escape(alt)}: not available in this run.</em></p>"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>' \
           f"{html.escape(alt)}</figcaption></figure>"


def alignment_rows(figures: Mapping[str, Mapping[str, float]]) -> list[dict[str, str]]:
    """The alignment table as text cells (also the Prefect table artifact)."""
    rows = []
    for p in POLICIES:
        if p in figures:
            f = figures[p]
            rows.append({"policy": LABELS[p], "planted_rate": f"{f['planted_rate']:.3f}",
                         "sampled_planted_rate": (f"{f['sampled_planted_rate']:.3f} ({f['sampled_ci_low']:.3f}-"
                                                  f"{f['sampled_ci_high']:.3f})" if "sampled_planted_rate" in f
                                                  else "-"),
                         "reward_mean": f"{f['reward_mean']:.3f}" if "reward_mean" in f else "-",
                         "kl_to_sft": f"{f['kl_to_sft']:.2f}" if "kl_to_sft" in f else "-"})
    return rows


def _table(rows: Sequence[Mapping[str, str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def samples_table(questions: Sequence[Mapping[str, str]], answers: Mapping[str, Sequence[str]], n: int = 3
                  ) -> list[dict[str, str]]:
    """The first ``n`` held-out prompts with every policy's greedy answer (base, SFT, PPO side by side)."""
    rows = []
    for i, q in enumerate(questions[:n]):
        row = {"prompt": q["prompt"][-300:]}
        for p in POLICIES:
            if p in answers:
                row[LABELS[p]] = answers[p][i]
        rows.append(row)
    return rows


def render_html(*, title: str, summary_rows: Sequence[Mapping[str, str]], figures: Mapping[str, Mapping[str, float]],
                images: Mapping[str, Path | None], samples: Sequence[Mapping[str, str]], notes: Sequence[str] = ()
                ) -> str:
    """The report page: summary, alignment table, figures, sample answers (images inlined)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:1400px;margin:auto}}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;"
        "text-align:left}td{white-space:pre-wrap;font-size:90%}figure{display:inline-block;margin:0.5em}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        "<h2>Stages</h2>", _table(summary_rows),
        "<h2>Alignment: greedy and sampled answers to the same held-out prompts</h2>", _table(alignment_rows(figures)),
        *[f"<p>{html.escape(n)}</p>" for n in notes],
        _img(images.get("planted"), "Planted-property rate per stage"),
        "<h2>Learning curves</h2>", _img(images.get("curves"), "Learning curves of each stage"),
        "<h2>PPO and the reward model</h2>",
        _img(images.get("reward_kl"), "PPO: reward vs KL to the reference"),
        _img(images.get("calibration"), "Reward model calibration on held-out pairs"),
        "<h2>Sample answers (greedy, same prompts)</h2>", _table(samples),
        "</body></html>",
    ]
    return "\n".join(parts)
