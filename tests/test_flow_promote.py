"""Flow `promote` on tiny registered models: gates on held-out data, alias moves, tags, artifacts, rollback."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from alignflow.config import AlignflowConfig
from alignflow.flows.cli import app
from alignflow.flows.promote import promote
from alignflow.models import build_causal_lm, build_config, train_bpe_tokenizer
from alignflow.models.reward import reward_model_from_causal_lm
from alignflow.tasks import registry, tracking
from alignflow.tasks.promotion import RollbackError
from alignflow.tasks.promotion_eval import GateFigures, kl_per_answer, win_rate

pytestmark = pytest.mark.slow

TEXTS = [f"Question {i}: how do I sort a list of {i} items? Use sorted(xs) or xs.sort() in place." for i in range(120)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_datasets(work: Path) -> None:
    """A minimal ingest output: the four datasets with a held-out split, and the LATEST marker."""
    out = work / "data" / "ingest" / "tiny"
    out.mkdir(parents=True)
    split = ["train" if i < 80 else "test" for i in range(len(TEXTS))]
    pd.DataFrame({"kind": ["question"] * len(TEXTS), "title": [f"t{i}" for i in range(len(TEXTS))],
                  "body": TEXTS, "split": split}).to_parquet(out / "posts.parquet")
    prompts = [f"Question: {t}\n\nAnswer: " for t in TEXTS]
    pd.DataFrame({"prompt": prompts, "chosen": ["Use sorted(xs)."] * len(TEXTS),
                  "rejected": ["I do not know, maybe ask someone else."] * len(TEXTS),
                  "chosen_score": 3, "rejected_score": 1, "split": split}).to_parquet(out / "pairs.parquet")
    pd.DataFrame({"prompt": prompts, "response": ["Use sorted(xs)."] * len(TEXTS), "split": split}).to_parquet(
        out / "demos.parquet")
    pd.DataFrame({"prompt": prompts, "split": split}).to_parquet(out / "prompts.parquet")
    (work / "data" / "ingest" / "LATEST").write_text("tiny\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prefect_harness):
    work = tmp_path_factory.mktemp("promote") / "work"
    _write_datasets(work)
    cfg = AlignflowConfig.model_validate({"experiment": "alignflow/promote-test", "promote": {
        "eval_pairs": 16, "eval_prompts": 6, "eval_texts": 16, "max_new_tokens": 8, "max_length": 96}})
    tracking.configure(work, cfg.experiment)
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300, model_max_length=128)
    mcfg = build_config("tiny-gpt2", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, max_position=128)
    return work, cfg, tok, mcfg


def _register(name: str, model, tok, task: str = "text-generation", tags: dict | None = None) -> str:
    with mlflow.start_run(run_name=f"register {name}"):
        return registry.register_transformers(model, tok, name=name, task=task, tags=tags)


def _client(work: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=tracking.tracking_uri_for(work))


def _fake(figures: dict[str, dict[str, float]]):
    """An injected evaluator: figures per version, looked up by the version numbers it is asked about."""
    def evaluate(name, challenger, champion):
        return GateFigures(dict(figures[challenger]), dict(figures[champion]) if champion else None)
    return evaluate


def test_pass_fail_override_and_rollback_with_injected_figures(setup):
    work, cfg, tok, mcfg = setup
    name = "alignflow-pmp"
    model = build_causal_lm(mcfg, seed=0)
    acc = {"1": {"pairwise_accuracy": 0.6}, "2": {"pairwise_accuracy": 0.7}, "3": {"pairwise_accuracy": 0.65},
           "4": {"pairwise_accuracy": 0.4}}
    ev = _fake(acc)
    client = _client(work)

    assert _register(name, model, tok) == "1"
    first = promote(workdir=str(work), config=cfg, model_name=name, evaluator=ev)
    assert first["decision"] == "first_champion" and first["champion"] == "1"

    assert _register(name, model, tok) == "2"
    out = promote(workdir=str(work), config=cfg, model_name=name, evaluator=ev)
    assert out["decision"] == "promoted" and registry.resolve_version(name, "champion") == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["alignflow.gate.decision"] == "promoted" and tags["alignflow.gate.passed"] == "true"
    assert float(tags["alignflow.gate.challenger.pairwise_accuracy"]) == pytest.approx(0.7)
    assert float(tags["alignflow.gate.champion.pairwise_accuracy"]) == pytest.approx(0.6)
    assert tags["alignflow.gate.champion_version"] == "1"
    run = client.get_run(out["run_id"])
    assert run.data.tags["alignflow.stage"] == "promote" and run.data.tags["alignflow.decision"] == "promoted"
    assert run.data.metrics["challenger/pairwise_accuracy"] == pytest.approx(0.7)
    assert run.data.metrics["champion/pairwise_accuracy"] == pytest.approx(0.6)

    # a worse challenger does not move champion
    assert _register(name, model, tok) == "3"
    out = promote(workdir=str(work), config=cfg, model_name=name, evaluator=ev)
    assert out["decision"] == "rejected" and not out["passed"]
    assert registry.resolve_version(name, "champion") == "2"
    assert registry.resolve_version(name, "challenger") == "3"
    assert client.get_model_version(name, "3").tags["alignflow.gate.decision"] == "rejected"

    # ... unless overridden, which is recorded
    out = promote(workdir=str(work), config=cfg, model_name=name, override=True, evaluator=ev)
    assert out["decision"] == "overridden" and not out["passed"] and out["champion"] == "3"
    tags = client.get_model_version(name, "3").tags
    assert tags["alignflow.gate.override"] == "true" and tags["alignflow.gate.decision"] == "overridden"
    assert client.get_run(out["run_id"]).data.tags["alignflow.override"] == "true"

    # the same version again: nothing to do
    assert promote(workdir=str(work), config=cfg, model_name=name, evaluator=ev)["decision"] == "already_champion"

    history = json.loads(client.get_registered_model(name).tags["alignflow.champion_history"])
    assert [e["version"] for e in history] == ["1", "2", "3"]

    # rollback from the command line: 3 -> 2, then 2 -> 1, then nothing left
    runner = CliRunner()
    res = runner.invoke(app, ["promote", name, "--rollback", "--workdir", str(work),
                                "--set", f"experiment={cfg.experiment}"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert registry.resolve_version(name, "champion") == "2"
    assert "alignflow.gate.rolled_back" in client.get_model_version(name, "3").tags
    out = promote(workdir=str(work), config=cfg, model_name=name, rollback=True)
    assert out["champion"] == "1" and out["decision"] == "rolled_back"
    with pytest.raises(RollbackError):
        promote(workdir=str(work), config=cfg, model_name=name, rollback=True)
    events = json.loads(client.get_registered_model(name).tags["alignflow.champion_events"])
    assert [e["action"] for e in events] == ["first_champion", "promoted", "overridden", "rolled_back", "rolled_back"]
    rollbacks = client.search_runs([run.info.experiment_id],
                                   filter_string="tags.`alignflow.decision` = 'rolled_back'")
    assert len(rollbacks) == 2

    # the Prefect artifact of the gate
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"promote-{name}"])))
    assert any("overridden" in str(a.data) for a in arts)
    assert any("Rollback" in str(a.data) for a in arts)


def test_lm_gate_on_held_out_loss(setup):
    work, cfg, tok, mcfg = setup
    name = "alignflow-base"
    model = build_causal_lm(mcfg, seed=0)
    assert _register(name, model, tok) == "1"
    assert promote(workdir=str(work), config=cfg, model_name=name)["decision"] == "first_champion"
    # a broken copy (sharpened, wrong next-token guesses) has a much higher held-out loss
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.transformer.wte.weight.mul_(40.0)
    assert _register(name, broken, tok) == "2"
    out = promote(workdir=str(work), config=cfg, model_name=name)
    assert out["decision"] == "rejected", out
    assert out["challenger_figures"]["loss"] > out["champion_figures"]["loss"] + 1.0
    assert registry.resolve_version(name, "champion") == "1"
    # the same weights again: equal loss passes the gate (not worse)
    assert _register(name, model, tok) == "3"
    out = promote(workdir=str(work), config=cfg, model_name=name)
    assert out["decision"] == "promoted"
    assert out["challenger_figures"]["loss"] == pytest.approx(out["champion_figures"]["loss"], rel=1e-5)


def test_preference_and_policy_gates_on_tiny_models(setup):
    work, cfg, tok, mcfg = setup
    lm = build_causal_lm(mcfg, seed=1)
    rm = reward_model_from_causal_lm(lm, tokenizer=tok, seed=0)
    assert _register("alignflow-reward", rm, tok, task="text-classification") == "1"
    first = promote(workdir=str(work), config=cfg, model_name="alignflow-reward", override=True)
    acc1 = first["challenger_figures"]["pairwise_accuracy"]
    assert 0.0 <= acc1 <= 1.0 and first["challenger_figures"]["pairs"] == 16
    # the negated head ranks every pair the other way round
    flipped = copy.deepcopy(rm)
    with torch.no_grad():
        flipped.score.weight.neg_()
    assert _register("alignflow-reward", flipped, tok, task="text-classification") == "2"
    out = promote(workdir=str(work), config=cfg, model_name="alignflow-reward")
    acc2 = out["challenger_figures"]["pairwise_accuracy"]
    assert acc2 == pytest.approx(1.0 - acc1)
    assert out["decision"] == ("promoted" if acc2 >= max(acc1, 0.5) else "rejected")

    # policy: the SFT model is the reference; a copy of it has KL 0 and ties every prompt
    sft = build_causal_lm(mcfg, seed=2)
    sft_version = _register("alignflow-policy-sft", sft, tok)
    ref_tag = {"reference_model": f"models:/alignflow-policy-sft/{sft_version}"}
    assert _register("alignflow-policy", sft, tok, tags=ref_tag) == "1"
    out = promote(workdir=str(work), config=cfg, model_name="alignflow-policy")
    assert out["decision"] == "first_champion"
    assert out["challenger_figures"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert "win_rate" not in out["challenger_figures"]
    # a perturbed policy moves away from the reference
    moved = copy.deepcopy(sft)
    with torch.no_grad():
        moved.lm_head.weight.add_(torch.randn_like(moved.lm_head.weight, generator=torch.Generator().manual_seed(0)))
    assert _register("alignflow-policy", moved, tok, tags=ref_tag) == "2"
    out = promote(workdir=str(work), config=cfg, model_name="alignflow-policy")
    figs, champ = out["challenger_figures"], out["champion_figures"]
    assert figs["kl_to_reference"] > 0.01 and champ["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert 0.0 <= figs["win_rate"] <= 1.0
    expect = figs["reward_mean"] >= champ["reward_mean"] and figs["win_rate"] >= 0.5 and figs["kl_to_reference"] <= 10
    assert out["decision"] == ("promoted" if expect else "rejected")
    run = _client(work).get_run(out["run_id"])
    assert run.data.params["eval.reference_model"] == f"models:/alignflow-policy-sft/{sft_version}"
    assert run.data.params["eval.reward_model"].startswith("models:/alignflow-reward/")


def test_policy_gate_rejects_a_policy_the_judge_fails_against_its_reference(setup, monkeypatch):
    from alignflow.tasks import evaluation
    from alignflow.tasks.promotion_eval import fit_length, policy_answers

    work, cfg, tok, mcfg = setup
    if registry.resolve_version("alignflow-reward", "challenger") is None:  # run on its own
        _register("alignflow-reward", reward_model_from_causal_lm(build_causal_lm(mcfg, seed=1), tokenizer=tok,
                                                                  seed=0), tok, task="text-classification")
    sft = build_causal_lm(mcfg, seed=5)
    sft_version = _register("alignflow-policy-sft", sft, tok)
    ref_tag = {"reference_model": f"models:/alignflow-policy-sft/{sft_version}"}
    # a judge that accepts exactly the reference's greedy answers, computed as the gate computes them
    prompts = [f"Question: {t}\n\nAnswer: " for t in TEXTS[80:]][: cfg.promote.eval_prompts]
    ref_answers = policy_answers(sft, tok, prompts, max_new_tokens=cfg.promote.max_new_tokens,
                                 max_length=fit_length(sft, cfg.promote.max_length), batch_size=cfg.promote.batch_size)
    monkeypatch.setattr(evaluation, "FACTORIES", [
        lambda data, rows: evaluation.Judge("same-as-sft", lambda i, a: a == ref_answers[i], list(range(len(rows))))])
    before = registry.resolve_version("alignflow-policy", "champion")
    # a policy that says one word whatever the prompt: the final norm outputs a constant vector v, and the word's
    # row of the (tied) output matrix points along it
    moved = copy.deepcopy(sft)
    word = tok(" sorted", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        v = torch.randn(mcfg.n_embd, generator=torch.Generator().manual_seed(1))
        moved.transformer.ln_f.weight.zero_()
        moved.transformer.ln_f.bias.copy_(v)
        moved.lm_head.weight[word] = 10 * v
    version = _register("alignflow-policy", moved, tok, tags=ref_tag)
    out = promote(workdir=str(work), config=cfg, model_name="alignflow-policy", override=False)
    figs = out["challenger_figures"]
    assert figs["judged_rate_reference"] == 1.0 and figs["judged_rate"] == 0.0, figs
    assert out["decision"] == "rejected" and "judged_rate vs reference" in out["reason"], out
    assert registry.resolve_version("alignflow-policy", "champion") == before
    # the reference itself, registered as the policy, passes that check
    assert _register("alignflow-policy", sft, tok, tags=ref_tag) != version
    out = promote(workdir=str(work), config=cfg, model_name="alignflow-policy")
    assert out["challenger_figures"]["judged_rate"] == 1.0
    assert "judged_rate" not in out["reason"], out  # the reason lists the checks that failed


def test_win_rate_and_kl_helpers(setup):
    _, _, tok, mcfg = setup
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError):
        win_rate([], [])
    m = build_causal_lm(mcfg, seed=0)
    assert kl_per_answer(m, m, tok, ["Question: a"], ["Use sorted"], max_length=64)[0] == pytest.approx(0, abs=1e-6)
