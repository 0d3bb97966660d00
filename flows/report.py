"""The pipeline's report, logged on its parent MLflow run (``report/report.html`` + PNGs) and as Prefect artifacts.

Called at the end of ``pipeline`` (inside its parent run). It reads the runs
the pipeline's rows name (a cache hit names the run that did the work), loads
the registered versions of the base LM, SFT and PPO policies and the reward
model, and measures them on the same held-out prompts (greedy answers, and sampled ones
for the planted rate): the planted-property rate, the reward model's score and
the KL to the SFT policy.
Those figures are also logged on the parent run as ``alignment/<policy>/<name>``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from alignflow import stages as stage_registry
from alignflow.config import AlignflowConfig
from alignflow.tasks import report as rep
from alignflow.tasks.promotion_eval import fit_length, load_version

HELD_OUT_PROMPTS = 64  # as the sft stage's planted rate: the same prompts, the same greedy answers
# Sampled answers per prompt (temperature 1): the planted rate of the policy's distribution, which greedy answers
# saturate (64 prompts x 4 = 256 answers per policy: a 95% interval of about +-0.06 around 0.7).
SAMPLES_PER_PROMPT = 4
SAMPLE_TEMPERATURE = 1.0


def _histories(client: MlflowClient, run_ids: dict[str, str]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    out = {}
    for stage, metric in rep.CURVES:
        if run_ids.get(stage):
            hist = client.get_metric_history(run_ids[stage], metric)
            if hist:
                out[(stage, metric)] = sorted((m.step, m.value) for m in hist)
    return out


def _calibration(client: MlflowClient, run_id: str | None, dst: Path) -> Path | None:
    if not run_id:
        return None
    try:
        return Path(client.download_artifacts(run_id, "eval/calibration.png", str(dst)))
    except Exception:  # no calibration figure in that run (no validation pairs)
        return None


def measure_alignment(cfg: AlignflowConfig, workdir: Path, versions: dict[str, str]
                      ) -> tuple[dict[str, dict[str, float]], list[dict], dict[str, list[str]]] | None:
    """(figures, questions, answers) of base / SFT / PPO on the held-out prompts (reward figures when ``pm`` ran);
    None without SFT or a synthetic dump."""
    from alignflow.models.reward import score_texts
    from alignflow.tasks import evaluation
    from alignflow.tasks.ingest.run import latest_datasets
    from alignflow.tasks.train.lm import read_demos

    if not versions.get("sft"):
        return None
    data = latest_datasets(workdir)
    rows = read_demos(data / "demos.parquet", "validation")[:HELD_OUT_PROMPTS]
    judge = evaluation.judge_for(data, rows)  # the evaluation hook: the planted rule on a generated dump
    if judge is None:
        return None
    questions = [{"prompt": rows[i]["prompt"], "row": i} for i in judge.judged]
    names = {"base": stage_registry.BASE_MODEL, "sft": stage_registry.SFT_MODEL, "ppo": stage_registry.POLICY_MODEL}
    policies = {p: load_version(names[p], versions[p]) for p in rep.POLICIES if versions.get(p)}
    score = None
    if versions.get("pm"):
        reward, rtok = load_version(stage_registry.REWARD_MODEL, versions["pm"])

        def score(prompts: list[str], answers: list[str]) -> list[float]:
            return score_texts(reward, rtok, prompts, answers, batch_size=32, max_length=fit_length(reward, 512))

    figures, answers = rep.alignment_figures(
        policies, policies["sft"], score, questions,
        lambda q, a: judge(q["row"], a),
        max_new_tokens=cfg.sft.max_new_tokens, max_length=cfg.sft.model.max_length,
        samples_per_prompt=SAMPLES_PER_PROMPT, temperature=SAMPLE_TEMPERATURE, seed=0)
    return figures, questions, answers


def alignment_text(figures: dict[str, dict[str, float]]) -> str:
    """The alignment lines under the summary table."""
    order = [p for p in rep.POLICIES if p in figures]
    n = int(figures[order[0]]["prompts"])

    def line(key: str, fmt: str) -> str:
        return " -> ".join(f"{rep.LABELS[p]} {format(figures[p][key], fmt)}" for p in order if key in figures[p])

    lines = [f"alignment (answers to the same {n} held-out prompts; greedy unless said):",
             f"  planted-property rate  {line('planted_rate', '.3f')}"]
    if all("sampled_planted_rate" in figures[p] for p in order):
        k = int(figures[order[0]]["samples"]) // max(n, 1)
        cells = " -> ".join(f"{rep.LABELS[p]} {figures[p]['sampled_planted_rate']:.3f} "
                            f"({figures[p]['sampled_ci_low']:.2f}-{figures[p]['sampled_ci_high']:.2f})" for p in order)
        lines.append(f"  same, sampled (T={SAMPLE_TEMPERATURE:g}, {k} per prompt, 95% CI)  {cells}")
    if any("reward_mean" in f for f in figures.values()):
        lines.append(f"  reward-model score     {line('reward_mean', '.3f')}")
    lines.append(f"  KL to the SFT policy   {line('kl_to_sft', '.2f')}")
    return "\n".join(lines)


def preference_text(figs: dict[str, dict[str, float]]) -> str:
    """Lines on the reward model (held-out accuracy with its interval) and PMP's head start (stage -> figures)."""
    lines = []
    pm = figs.get("pm", {})
    if "eval/pairwise_accuracy" in pm:
        ci = (f" (95% CI {pm['eval/accuracy_ci_low']:.3f}-{pm['eval/accuracy_ci_high']:.3f})"
              if "eval/accuracy_ci_low" in pm and "eval/accuracy_ci_high" in pm else "")
        n = f" on {int(pm['eval/pairs'])} held-out task pairs" if "eval/pairs" in pm else ""
        lines.append(f"  reward model           pairwise accuracy {pm['eval/pairwise_accuracy']:.3f}{ci}{n}")
    tr = figs.get("pmp-transfer", {})
    if {"n_pairs", "pmp_accuracy", "base_accuracy", "head_start"} <= set(tr):
        lines.append(f"  PMP head start         {int(tr['n_pairs'])} task pairs: from PMP {tr['pmp_accuracy']:.3f}, "
                     f"from the base LM {tr['base_accuracy']:.3f} ({tr['head_start']:+.3f})")
    return "\n".join(["preference models:", *lines]) if lines else ""


def pipeline_report(rows: list[dict], cfg: AlignflowConfig, workdir: Path,
                    stage_figures: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Build and log the report on the active (parent) run: ``{figures, uri, text}`` (text: lines for the summary)."""
    client = MlflowClient()
    run_ids = {r["stage"]: r.get("run_id") for r in rows if r.get("run_id")}
    versions = {r["stage"]: str(r["version"]) for r in rows if r.get("version") not in (None, "", "-")}
    parent = mlflow.active_run()
    measured = measure_alignment(cfg, workdir, versions)
    figures, questions, answers = measured if measured is not None else ({}, [], {})
    with tempfile.TemporaryDirectory(prefix="alignflow-report-") as tmp:
        out = Path(tmp)
        histories = _histories(client, run_ids)
        images = {
            "curves": rep.plot_learning_curves(histories, out / "learning_curves.png"),
            "reward_kl": rep.plot_reward_vs_kl(histories.get(("ppo", "ppo/reward_mean"), []),
                                               histories.get(("ppo", "ppo/kl"), []), out / "ppo_reward_vs_kl.png"),
            "planted": rep.plot_planted_rates(figures, out / "planted_rate.png") if figures else None,
            "calibration": _calibration(client, run_ids.get("pm"), out / "pm"),
        }
        samples = rep.samples_table(questions, answers)
        summary_rows = [{"stage": r["stage"], "status": r["status"], "mlflow run": r.get("run_id") or "-",
                         "key metrics": r.get("metrics", "")} for r in rows]
        page = rep.render_html(title=f"alignflow pipeline {parent.info.run_id}", summary_rows=summary_rows,
                               figures=figures, images=images, samples=samples)
        (out / "report.html").write_text(page, encoding="utf-8")
        for path in [out / "report.html", *[p for p in images.values() if p is not None]]:
            mlflow.log_artifact(str(path), artifact_path="report")
    if figures:
        mlflow.log_metrics({f"alignment/{p}/{k}": v for p, f in figures.items() for k, v in f.items()})
        create_table_artifact(key="pipeline-alignment", table=rep.alignment_rows(figures),
                              description="Greedy and sampled answers of base, SFT and PPO to the same held-out prompts")
    uri = f"{parent.info.artifact_uri.rstrip('/')}/report/report.html"
    preference = preference_text(stage_figures or {})
    text = ((preference + "\n" if preference else "") + (alignment_text(figures) + "\n" if figures else "")
            + f"report: {uri}")
    markdown = ["# alignflow pipeline report", "", f"Full page (figures): `{uri}`", ""]
    if figures:
        markdown += ["| policy | planted rate (greedy) | planted rate (sampled, 95% CI) | reward-model score "
                     "| KL to SFT |", "|---|---|---|---|---|"]
        markdown += [f"| {r['policy']} | {r['planted_rate']} | {r['sampled_planted_rate']} | {r['reward_mean']} "
                     f"| {r['kl_to_sft']} |" for r in rep.alignment_rows(figures)]
    if samples:
        cols = [k for k in samples[0] if k != "prompt"]
        markdown += ["", "## Same prompts, greedy answers", "", "| prompt (end) | " + " | ".join(cols) + " |",
                     "|---|" + "---|" * len(cols)]
        cell = lambda s: s.replace("|", "\\|").replace("\n", "<br>")[:400]  # noqa: E731
        markdown += ["| " + " | ".join(cell(r[k]) for k in ["prompt", *cols]) + " |" for r in samples]
    create_markdown_artifact(key="pipeline-report", markdown="\n".join(markdown),
                             description="Alignment figures and sample answers of this pipeline run")
    return {"figures": figures, "uri": uri, "text": text}
