"""Training-core speed paths: the labelled-positions LM loss, fused AdamW, the device-side non-finite guard, and
the core importing without the tracking/orchestration stack."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _train_worker import collate, lm_loss, make_dataset, make_model
from alignflow.config import TrainConfig
from alignflow.tasks.train import loop as loop_mod
from alignflow.tasks.train.batching import pad_collate
from alignflow.tasks.train.lm import IGNORE, causal_lm_loss
from alignflow.tasks.train.loop import LoopCallbacks, NonFiniteLossError, build_optimizer, train_loop

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**overrides) -> TrainConfig:
    base = dict(max_steps=10, batch_size=8, grad_accum=1, lr=1e-2, warmup_steps=2, log_every=1, eval_every=1000,
                checkpoint_every=1000, mixed_precision="no", seed=0)
    base.update(overrides)
    return TrainConfig(**base)


def _llama(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=64, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def _sft_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    examples = []
    for n, prompt in ((20, 8), (14, 5), (9, 9 - 3)):
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return pad_collate(examples, 0)


@pytest.mark.parametrize("build", [lambda: make_model(0), _llama], ids=["gpt2", "llama"])
def test_labelled_positions_loss_equals_the_models_own_loss(build):
    batch = _sft_batch()
    a, b = build(), build()
    b.load_state_dict(a.state_dict())
    ours, _ = causal_lm_loss(a, batch)
    ref = b(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
    ours.backward()
    ref.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name


def test_wrapped_model_takes_the_labels_path():
    model = make_model(0)
    batch = _sft_batch()
    batch["input_ids"] = batch["input_ids"] % 32  # make_model's vocabulary

    class Wrapper(torch.nn.Module):  # like DDP: not a PreTrainedModel, forwards to its module
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, **kw):
            return self.module(**kw)

    direct, _ = causal_lm_loss(model, batch)
    wrapped, _ = causal_lm_loss(Wrapper(model), batch)
    assert wrapped.item() == pytest.approx(direct.item(), rel=1e-6)


def test_adamw_is_fused_on_cpu_for_float_parameters():
    opt = build_optimizer(make_model(0), _cfg())
    assert opt.defaults["fused"] is True
    assert loop_mod.fused_adamw_supported([torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))])
    assert not loop_mod.fused_adamw_supported([])


def _nan_at(n_call: int):
    calls = {"n": 0}

    def fn(model, batch):
        calls["n"] += 1
        loss, metrics = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == n_call else loss), metrics

    return fn


@pytest.mark.parametrize("defer", [False, True], ids=["per-step", "on-device"])
def test_non_finite_guard_stops_at_the_bad_step_either_way(defer, tmp_path, monkeypatch):
    monkeypatch.setattr(loop_mod, "DEFER_FINITE_CHECK", defer)
    model = make_model(0)
    written = []
    cfg = _cfg(max_steps=20, batch_size=4, checkpoint_every=5, log_every=10, keep_checkpoints=3)
    with pytest.raises(NonFiniteLossError, match=r"step 7\b") as info:
        train_loop(model, make_dataset(16), collate, _nan_at(7), cfg, checkpoint_dir=tmp_path,
                   callbacks=LoopCallbacks(on_checkpoint=lambda p, s: written.append(s)))
    assert info.value.step == 7 and info.value.micro_batch == 1
    assert written == [5]
    # the weights are those after step 6, exactly as the other guard leaves them
    monkeypatch.setattr(loop_mod, "DEFER_FINITE_CHECK", not defer)
    other = make_model(0)
    with pytest.raises(NonFiniteLossError):
        train_loop(other, make_dataset(16), collate, _nan_at(7), cfg)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_on_device_guard_gives_the_same_run_and_logs(monkeypatch):
    runs = {}
    for defer in (False, True):
        monkeypatch.setattr(loop_mod, "DEFER_FINITE_CHECK", defer)
        logs: dict[int, dict] = {}
        model = make_model(0)
        res = train_loop(model, make_dataset(32), collate, lm_loss, _cfg(max_steps=6, log_every=3),
                         callbacks=LoopCallbacks(on_log=lambda m, s: logs.setdefault(s, {}).update(m)))
        runs[defer] = (res, logs, [p.detach().clone() for p in model.parameters()])
    (r0, l0, p0), (r1, l1, p1) = runs[False], runs[True]
    assert r0.final_loss == pytest.approx(r1.final_loss, rel=1e-6)
    assert sorted(l0) == sorted(l1) == [3, 6]
    for s in l0:
        for key in ("train/loss", "train/grad_norm"):
            assert l0[s][key] == pytest.approx(l1[s][key], rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))


# "Not installed", as both `import x` (ImportError) and importlib.util.find_spec (None, which accelerate and
# transformers use to probe optional packages) see it.
def _blocker(names) -> str:
    return "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in names)


TRACKING = ("mlflow", "prefect", "great_expectations")


def _run(script: str) -> str:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_training_module_imports_without_the_tracking_stack():
    """Nothing in tasks/train/* or models/* imports mlflow, prefect or great_expectations."""
    out = _run(_blocker(TRACKING) + textwrap.dedent("""
        import importlib, pkgutil
        import alignflow.models, alignflow.tasks.train as train_pkg
        names = sorted(m.name for m in pkgutil.iter_modules(train_pkg.__path__))
        for name in names:
            importlib.import_module("alignflow.tasks.train." + name)
        print("OK", names)
    """))
    assert out.startswith("OK") and "loop" in out


def test_the_loop_trains_with_only_torch_transformers_accelerate():
    """The core (loop, LM and reward objectives, models) runs without the tracking stack and without pyarrow."""
    out = _run(_blocker((*TRACKING, "pyarrow")) + textwrap.dedent("""
        import torch
        from alignflow.config import TrainConfig
        from alignflow.models import build_causal_lm, build_config
        from alignflow.tasks.train import reward  # noqa: F401  (the reward objective imports too)
        from alignflow.tasks.train.batching import pad_collate
        from alignflow.tasks.train.lm import causal_lm_loss
        from alignflow.tasks.train.loop import train_loop
        torch.set_num_threads(1)
        model = build_causal_lm(build_config("tiny-gpt2", vocab_size=50, pad_token_id=0, eos_token_id=1,
                                             bos_token_id=2, max_position=32), seed=0)
        data = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 9, 12, 7)]
        res = train_loop(model, data, lambda ex: pad_collate(ex, 0), causal_lm_loss,
                         TrainConfig(max_steps=2, batch_size=2, mixed_precision="no"))
        print("OK", res.final_step)
    """))
    assert out.strip() == "OK 2"


def test_models_built_and_loaded_use_sdpa_attention(tmp_path):
    from alignflow.models import (build_causal_lm, build_config, load_causal_lm, load_sequence_classifier,
                                  reward_model_from_causal_lm, train_bpe_tokenizer)

    tok = train_bpe_tokenizer([f"text number {i} with some words" for i in range(50)], vocab_size=300,
                              model_max_length=32)
    lm = build_causal_lm(build_config("tiny-gpt2", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                      max_position=32), seed=0)
    lm.save_pretrained(str(tmp_path / "lm"))
    rm = reward_model_from_causal_lm(lm, tokenizer=tok, seed=0)
    rm.save_pretrained(str(tmp_path / "rm"))
    for model in (lm, rm, load_causal_lm(tmp_path / "lm", tokenizer=tok),
                  load_sequence_classifier(tmp_path / "rm", tokenizer=tok)):
        assert model.config._attn_implementation == "sdpa", type(model).__name__


def test_reward_scores_in_length_chunks_equal_one_batch():
    from alignflow.models.reward import (reward_model_from_causal_lm, score_sequences,
                                         score_sequences_in_length_chunks)
    from alignflow.tasks.train.reward import pair_collate, reward_loss_fn

    class Tok:  # what reward_model_from_causal_lm reads
        pad_token_id, eos_token_id = 0, 1

        def __len__(self):
            return 32

    rm = reward_model_from_causal_lm(make_model(0), tokenizer=Tok(), seed=0)
    g = torch.Generator().manual_seed(0)
    lens = [(30, 6), (28, 5), (7, 29), (5, 8)]  # chosen, rejected lengths: much padding in one [2B, T] batch
    examples = [{"chosen_input_ids": torch.randint(2, 32, (a - 1,), generator=g).tolist() + [1],
                 "rejected_input_ids": torch.randint(2, 32, (b - 1,), generator=g).tolist() + [1]} for a, b in lens]
    batch = pair_collate(examples, 0)
    whole = score_sequences(rm, batch["input_ids"], batch["attention_mask"])
    chunked = score_sequences_in_length_chunks(rm, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(whole, chunked, atol=1e-5)
    loss, _ = reward_loss_fn(rm, batch)
    loss.backward()
    grads = [p.grad.clone() for p in rm.parameters()]
    rm.zero_grad()
    r = score_sequences(rm, batch["input_ids"], batch["attention_mask"])
    (-torch.nn.functional.logsigmoid(r[:4] - r[4:]).mean()).backward()
    for a, p in zip(grads, rm.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4)
