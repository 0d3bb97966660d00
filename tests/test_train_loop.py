"""The shared training loop: learning, accumulation, schedules, batching, checkpoints, exact resume, NaN guard."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_worker import PAD, collate, lm_loss, make_dataset, make_model
from alignflow.config import TrainConfig
from alignflow.tasks.train import checkpoint as ckpt_mod
from alignflow.tasks.train.batching import LengthGroupedBatches, pad_collate
from alignflow.tasks.train.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from alignflow.tasks.train.loop import (
    LoopCallbacks,
    NonFiniteLossError,
    build_optimizer,
    build_scheduler,
    lr_multiplier,
    train_loop,
)

WORKER = Path(__file__).with_name("_train_worker.py")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**overrides) -> TrainConfig:
    base = dict(
        max_steps=10, batch_size=8, grad_accum=1, lr=1e-2, warmup_steps=2, log_every=1, eval_every=1000,
        checkpoint_every=1000, mixed_precision="no", seed=0,
    )
    base.update(overrides)
    return TrainConfig(**base)


def _logger(into: dict[int, dict[str, float]]):
    def on_log(metrics, step):
        into.setdefault(step, {}).update(metrics)

    return on_log


# --------------------------------------------------------------------------- (a) learning, callbacks


def test_loss_goes_down_on_a_learnable_pattern():
    logs: dict[int, dict[str, float]] = {}
    cfg = _cfg(max_steps=60, warmup_steps=5, min_lr_ratio=0.1)
    result = train_loop(make_model(0), make_dataset(64), collate, lm_loss, cfg,
                        callbacks=LoopCallbacks(on_log=_logger(logs)))
    first = logs[1]["train/loss"]
    assert first > 5.0  # ~ln(300) at random init
    assert result.final_step == 60
    assert result.final_loss == logs[60]["train/loss"]
    assert result.final_loss < 0.5 * first, (first, result.final_loss)
    assert result.resumed_from is None and result.checkpoint is None
    for key in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s", "train/epoch"):
        assert math.isfinite(logs[60][key]), key


def test_callbacks_eval_mode_metrics_and_token_count():
    dataset = make_dataset(32)
    model = make_model(0)
    calls = []
    logs: dict[int, dict[str, float]] = {}

    def on_eval(step):
        calls.append((step, model.training, torch.is_grad_enabled()))
        return {"eval/loss": 1.0 + step}

    def loss_fn(m, batch):
        assert m.training and torch.is_grad_enabled()
        loss, _ = lm_loss(m, batch)
        return loss, {"ppl": torch.exp(loss.detach()), "const": 2.0}

    steps = []
    cfg = _cfg(max_steps=9, batch_size=4, eval_every=4, log_every=3)
    result = train_loop(model, dataset, collate, loss_fn, cfg, callbacks=LoopCallbacks(
        on_log=_logger(logs), on_eval=on_eval, on_step=lambda s, n: steps.append((s, n))))
    assert calls == [(4, False, False), (8, False, False), (9, False, False)]  # every 4 steps and at the end
    assert model.training
    assert result.last_eval == {"eval/loss": 10.0}
    assert logs[8]["eval/loss"] == 9.0 and logs[9]["eval/loss"] == 10.0
    assert sorted(k for k in logs if "train/loss" in logs[k]) == [3, 6, 9]
    assert logs[3]["train/const"] == pytest.approx(2.0)
    assert logs[3]["train/ppl"] > 1.0
    assert steps == [(s, 9) for s in range(1, 10)]
    # 9 steps x 4 examples = 36 batches' worth: one full epoch of 32 (8 batches) + the first batch of epoch 1.
    batcher = LengthGroupedBatches([len(ex["input_ids"]) for ex in dataset], 4, 0)
    expected = sum(len(ex["input_ids"]) for ex in dataset) + sum(
        len(dataset[i]["input_ids"]) for i in batcher.batches_for_epoch(1)[0]
    )
    assert result.tokens_seen == expected


def test_bf16_autocast_on_cpu_and_the_model_comes_back_unwrapped():
    model = make_model(0)
    cfg = _cfg(max_steps=2, batch_size=4, mixed_precision="bf16")
    result = train_loop(model, make_dataset(16), collate, lm_loss, cfg)
    assert math.isfinite(result.final_loss)
    assert "_original_forward" not in model.__dict__ and not hasattr(model.forward, "__wrapped__")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast of the weights
    # accelerate holds one precision per process; the loop switches back for the next stage.
    again = train_loop(make_model(0), make_dataset(16), collate, lm_loss, _cfg(max_steps=2, batch_size=4))
    assert math.isfinite(again.final_loss) and again.final_loss != result.final_loss


# --------------------------------------------------------------------------- (b) gradient accumulation


def test_grad_accum_matches_one_big_batch():
    # Equal lengths: the mean over two half-batches is then exactly the mean over the whole batch.
    rng = random.Random(1)
    dataset = [{"input_ids": [rng.randrange(2, 300) for _ in range(16)]} for _ in range(8)]
    common = dict(max_steps=1, lr=0.1, warmup_steps=0, schedule="constant", max_grad_norm=0.0, weight_decay=0.0,
                  adam_eps=1.0)  # eps=1: the first Adam update is ~lr*g, linear in the gradient
    before = {k: v.clone() for k, v in make_model(0).state_dict().items()}
    deltas, losses = [], []
    for batch_size, grad_accum in ((8, 1), (4, 2)):
        model = make_model(0)
        logs: dict[int, dict[str, float]] = {}
        train_loop(model, dataset, collate, lm_loss, _cfg(batch_size=batch_size, grad_accum=grad_accum, **common),
                   callbacks=LoopCallbacks(on_log=_logger(logs)))
        deltas.append({k: v - before[k] for k, v in model.state_dict().items()})
        losses.append(logs[1]["train/loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    biggest = max(d.abs().max().item() for d in deltas[0].values())
    assert biggest > 1e-3  # the step did move the weights
    for key in deltas[0]:
        torch.testing.assert_close(deltas[1][key], deltas[0][key], atol=1e-5, rtol=0, msg=key)


# --------------------------------------------------------------------------- (c) schedules


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_values(schedule):
    cfg = _cfg(max_steps=110, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1, lr=2e-3)
    assert lr_multiplier(1, cfg) == pytest.approx(0.1)  # warm-up: the first step already moves
    assert lr_multiplier(5, cfg) == pytest.approx(0.5)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)  # peak at the end of warm-up
    end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[schedule]
    assert lr_multiplier(110, cfg) == pytest.approx(end)
    middle = {"cosine": 0.55, "linear": 0.55, "constant": 1.0}[schedule]
    assert lr_multiplier(60, cfg) == pytest.approx(middle)
    if schedule == "cosine":
        assert lr_multiplier(35, cfg) > 0.55 + 0.45 * 0.5  # cosine stays high longer than linear
        assert lr_multiplier(35, cfg) > lr_multiplier(35, cfg.model_copy(update={"schedule": "linear"}))
    # The LambdaLR gives lr x multiplier(k) to the k-th optimizer step.
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(110):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(2e-4) and seen[9] == pytest.approx(2e-3) and seen[-1] == pytest.approx(2e-3 * end)


def test_loop_logs_the_scheduled_lr():
    logs: dict[int, dict[str, float]] = {}
    cfg = _cfg(max_steps=6, warmup_steps=3, schedule="linear", min_lr_ratio=0.0, batch_size=4)
    train_loop(make_model(0), make_dataset(16), collate, lm_loss, cfg, callbacks=LoopCallbacks(on_log=_logger(logs)))
    expected = [cfg.lr * lr_multiplier(s, cfg) for s in range(1, 7)]
    assert [logs[s]["train/lr"] for s in range(1, 7)] == pytest.approx(expected)
    assert logs[6]["train/lr"] == 0.0


def test_weight_decay_only_on_matrices():
    model = make_model(0)
    opt = build_optimizer(model, _cfg(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- (d) batching and padding


def test_batches_are_deterministic_complete_and_length_grouped():
    rng = random.Random(0)
    lengths = [rng.randint(8, 400) for _ in range(1000)]
    torch_state = torch.get_rng_state()
    grouped = LengthGroupedBatches(lengths, 8, seed=3)
    assert torch.equal(torch.get_rng_state(), torch_state)  # no global RNG touched
    e0 = grouped.batches_for_epoch(0)
    assert e0 == LengthGroupedBatches(lengths, 8, seed=3).batches_for_epoch(0)
    assert e0 != grouped.batches_for_epoch(1)
    assert e0 != LengthGroupedBatches(lengths, 8, seed=4).batches_for_epoch(0)
    assert sorted(i for b in e0 for i in b) == list(range(1000))
    assert len(e0) == len(grouped) == 125 and all(len(b) == 8 for b in e0)

    plain = LengthGroupedBatches(lengths, 8, seed=3, group_by_length=False).batches_for_epoch(0)
    assert sorted(i for b in plain for i in b) == list(range(1000))

    def spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert spread(e0) < 0.25 * spread(plain)
    # ... but the batch order is random, not longest-first.
    longest = [max(lengths[i] for i in b) for b in e0]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)

    odd = LengthGroupedBatches(lengths[:21], 8, seed=0)
    assert sorted(len(b) for b in odd.batches_for_epoch(0)) == [5, 8, 8] and len(odd) == 3
    dropped = LengthGroupedBatches(lengths[:21], 8, seed=0, drop_last=True)
    assert [len(b) for b in dropped.batches_for_epoch(0)] == [8, 8] and len(dropped) == 2


def test_pad_collate_shapes_masks_labels():
    batch = pad_collate([{"input_ids": [5, 6, 7]}, {"input_ids": [PAD, 9]}], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [PAD, 9, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # Labels come from the mask, not the token value: a real token equal to the pad id still counts.
    assert batch["labels"].tolist() == [[5, 6, 7], [PAD, 9, -100]]
    assert all(t.dtype == torch.long for t in batch.values())

    given = pad_collate(
        [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "score": 1.5},
         {"input_ids": [3], "labels": [3], "score": -2.0}],
        pad_token_id=1, pad_to_multiple_of=8,
    )
    assert given["input_ids"].shape == (2, 8)
    assert given["input_ids"][1].tolist() == [3] + [1] * 7
    assert given["attention_mask"].sum(dim=1).tolist() == [4, 1]
    assert given["labels"].tolist() == [[-100, -100, 7, 8] + [-100] * 4, [3] + [-100] * 7]
    assert given["score"].tolist() == [1.5, -2.0]
    with pytest.raises(ValueError):
        pad_collate([{"input_ids": [1, 2], "labels": [1]}], 0)


# --------------------------------------------------------------------------- (e) checkpoint files


def test_checkpoint_roundtrip_with_tied_weights(tmp_path):
    cfg = _cfg()
    model = make_model(0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    batch = collate(make_dataset(4))
    for _ in range(2):
        lm_loss(model, batch)[0].backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    path = save_checkpoint(tmp_path, step=2, model=model, optimizer=opt, scheduler=sched,
                           data_state={"epoch": 0, "batch_index": 2}, extra={"tokenizer": "x"})
    assert path == tmp_path / "step-000002" and (tmp_path / "latest").read_text().strip() == "step-000002"
    expected_draw = torch.rand(4)
    state = capture_rng_state()

    other = make_model(1)
    opt2 = build_optimizer(other, cfg)
    sched2 = build_scheduler(opt2, cfg)
    torch.manual_seed(123)
    loaded = load_checkpoint(path, model=other, optimizer=opt2, scheduler=sched2)
    assert torch.equal(torch.rand(4), expected_draw)  # the RNG continues where it was saved
    restore_rng_state(state)
    assert loaded["step"] == 2 and loaded["data_state"] == {"epoch": 0, "batch_index": 2}
    assert loaded["extra"] == {"tokenizer": "x"}
    for (k, v), (_, w) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(v, w), k
    assert other.lm_head.weight.data_ptr() == other.transformer.wte.weight.data_ptr()  # still tied
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    exp_avg = [s["exp_avg"] for s in opt.state.values()]
    assert all(torch.equal(a, b["exp_avg"]) for a, b in zip(exp_avg, opt2.state.values()))


def test_latest_ignores_partial_folders_and_a_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = make_model(0)
    good = save_checkpoint(tmp_path, step=3, model=model, optimizer=None, scheduler=None, data_state={})
    # A writer killed mid-way (its pid is still alive here: it must not be swept), and a folder without state.json.
    partial = tmp_path / f".step-000009.tmp-{os.getpid()}"
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({"format": ckpt_mod.FORMAT, "step": 9, "files": []}))
    (tmp_path / "step-000007").mkdir()
    (tmp_path / "step-000008").mkdir()
    (tmp_path / "step-000008" / "state.json").write_text("{\"format\": \"alignflow-train")  # torn write
    assert latest_checkpoint(tmp_path) == good
    assert latest_checkpoint(tmp_path / "missing") is None

    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        if str(f).endswith("rng.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, step=5, model=model, optimizer=None, scheduler=None, data_state={})
    monkeypatch.undo()
    assert not (tmp_path / "step-000005").exists()
    assert not list(tmp_path.glob(".step-000005.tmp-*"))
    assert latest_checkpoint(tmp_path) == good and (tmp_path / "latest").read_text().strip() == good.name

    # A temporary folder whose writer is gone is removed by the next save.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".step-000004.tmp-{int(dead.stdout)}"
    stale.mkdir()
    save_checkpoint(tmp_path, step=6, model=model, optimizer=None, scheduler=None, data_state={})
    assert not stale.exists() and partial.exists()


def test_keep_checkpoints_prunes_and_fresh_run_refuses_a_used_folder(tmp_path):
    seen = []
    cfg = _cfg(max_steps=8, batch_size=4, checkpoint_every=2, keep_checkpoints=2)
    result = train_loop(make_model(0), make_dataset(16), collate, lm_loss, cfg, checkpoint_dir=tmp_path,
                        callbacks=LoopCallbacks(on_checkpoint=lambda p, s: seen.append((p.name, s))))
    assert seen == [("step-000002", 2), ("step-000004", 4), ("step-000006", 6), ("step-000008", 8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000006", "step-000008"]
    assert result.checkpoint == tmp_path / "step-000008"
    assert (tmp_path / "latest").read_text().strip() == "step-000008"
    with pytest.raises(FileExistsError, match="resume=True"):
        train_loop(make_model(0), make_dataset(16), collate, lm_loss, cfg, checkpoint_dir=tmp_path)


# --------------------------------------------------------------------------- resume (in process)


class _Crash(Exception):
    pass


def test_resume_in_process_matches_uninterrupted(tmp_path):
    dataset = make_dataset(30)
    cfg = _cfg(max_steps=12, batch_size=4, grad_accum=2, checkpoint_every=4, eval_every=3, lr=3e-3)

    def run(ckpt, *, resume=False, crash_at=None):
        logs: dict[int, dict[str, float]] = {}

        def on_step(step, _):
            if step == crash_at:
                raise _Crash

        def on_eval(step):  # consumes randomness: must not change training
            torch.rand(5)
            return {"eval/x": 0.0}

        model = make_model(0, dropout=0.1)
        cb = LoopCallbacks(on_log=_logger(logs), on_step=on_step, on_eval=on_eval)
        result = train_loop(model, dataset, collate, lm_loss, cfg, checkpoint_dir=ckpt, resume=resume, callbacks=cb)
        return result, logs, model

    full, full_logs, full_model = run(tmp_path / "a")
    with pytest.raises(_Crash):
        run(tmp_path / "b", crash_at=10)
    assert latest_checkpoint(tmp_path / "b").name == "step-000008"
    resumed, logs, model = run(tmp_path / "b", resume=True)
    assert resumed.resumed_from == 8 and resumed.final_step == 12
    assert sorted(logs) == [9, 10, 11, 12]
    assert [logs[s]["train/loss"] for s in range(9, 13)] == [full_logs[s]["train/loss"] for s in range(9, 13)]
    assert resumed.final_loss == full.final_loss
    assert resumed.tokens_seen == full.tokens_seen
    for (k, v), w in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, w), k

    # Resuming a finished run trains nothing and reports the saved state.
    again, logs, _ = run(tmp_path / "b", resume=True)
    assert again.resumed_from == 12 and again.final_step == 12 and again.final_loss == full.final_loss
    assert "train/loss" not in logs.get(12, {})


# --------------------------------------------------------------------------- (f) kill -9 and resume


def _worker(ckpt: Path, tag: str, tmp: Path, *extra: str) -> tuple[list[str], Path, Path]:
    losses, result = tmp / f"{tag}-losses.txt", tmp / f"{tag}-result.json"
    cmd = [sys.executable, str(WORKER), "--ckpt", str(ckpt), "--losses", str(losses), "--result", str(result), *extra]
    return cmd, losses, result


def _read_losses(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        step, loss = line.split()
        out[int(step)] = float(loss)
    return out


def test_sigkill_between_checkpoints_then_resume_is_exact(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    base_cmd, base_losses, base_result = _worker(tmp_path / "base", "base", tmp_path)
    kill_cmd, kill_losses, _ = _worker(tmp_path / "run", "killed", tmp_path, "--slow-after", "20")
    with open(tmp_path / "base.err", "w") as base_err, open(tmp_path / "killed.err", "w") as kill_err:
        baseline = subprocess.Popen(base_cmd, stdout=subprocess.DEVNULL, stderr=base_err, env=env)
        victim = subprocess.Popen(kill_cmd, stdout=subprocess.PIPE, stderr=kill_err, text=True, env=env)
        last = 0
        try:
            for line in victim.stdout:
                if line.startswith("step "):
                    last = int(line.split()[1])
                    if last >= 23:
                        victim.send_signal(signal.SIGKILL)
                        break
        finally:
            victim.stdout.close()
            victim.wait(timeout=60)
        assert last >= 23, (tmp_path / "killed.err").read_text()[-2000:]
        assert victim.returncode == -signal.SIGKILL
        assert baseline.wait(timeout=120) == 0, (tmp_path / "base.err").read_text()[-2000:]

    # It died after step 23 and before the step-30 checkpoint.
    assert latest_checkpoint(tmp_path / "run").name == "step-000020"
    assert max(_read_losses(kill_losses)) < 30

    resume_cmd, resume_losses, resume_result = _worker(tmp_path / "run", "resumed", tmp_path, "--resume")
    done = subprocess.run(resume_cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == "step 21 loss " + repr(_read_losses(resume_losses)[21])

    base = json.loads(base_result.read_text())
    resumed = json.loads(resume_result.read_text())
    assert base["resumed_from"] is None and resumed["resumed_from"] == 20
    assert resumed["final_step"] == base["final_step"] == 40
    assert abs(resumed["final_loss"] - base["final_loss"]) < 1e-4
    assert resumed["final_loss"] == base["final_loss"]  # bit-identical on CPU
    assert resumed["tokens_seen"] == base["tokens_seen"]

    base_steps, killed_steps, resumed_steps = map(_read_losses, (base_losses, kill_losses, resume_losses))
    assert sorted(resumed_steps) == list(range(21, 41))
    assert resumed_steps == {s: base_steps[s] for s in range(21, 41)}
    assert killed_steps == {s: base_steps[s] for s in killed_steps}

    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "base" / "step-000040" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "step-000040" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- (g) non-finite guard


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def nan_at_7(model, batch):
        calls["n"] += 1
        loss, metrics = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 7 else loss), metrics

    model = make_model(0)
    cfg = _cfg(max_steps=20, batch_size=4, checkpoint_every=5, keep_checkpoints=3)
    written = []
    with pytest.raises(NonFiniteLossError, match=r"step 7\b") as info:
        train_loop(model, make_dataset(16), collate, nan_at_7, cfg, checkpoint_dir=tmp_path,
                   callbacks=LoopCallbacks(on_checkpoint=lambda p, s: written.append(s)))
    assert info.value.step == 7 and info.value.micro_batch == 1
    assert written == [5]
    assert latest_checkpoint(tmp_path).name == "step-000005"
    assert (tmp_path / "latest").read_text().strip() == "step-000005"
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was never applied

    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "step-000005" / "model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_nan_in_a_later_micro_batch_is_named():
    calls = {"n": 0}

    def inf_at_6(model, batch):
        calls["n"] += 1
        loss, metrics = lm_loss(model, batch)
        return (loss + float("inf") if calls["n"] == 6 else loss), metrics

    cfg = _cfg(max_steps=5, batch_size=4, grad_accum=2)
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(micro-batch 2 of 2\)") as info:
        train_loop(make_model(0), make_dataset(16), collate, inf_at_6, cfg)
    assert info.value.step == 3 and info.value.micro_batch == 2


# --------------------------------------------------------------------------- (h) resume without a checkpoint


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    cfg = _cfg(max_steps=3, batch_size=4, checkpoint_every=2)
    result = train_loop(make_model(0), make_dataset(16), collate, lm_loss, cfg, checkpoint_dir=tmp_path / "new",
                        resume=True)
    assert result.resumed_from is None and result.final_step == 3
    assert result.checkpoint == tmp_path / "new" / "step-000003"
    assert latest_checkpoint(tmp_path / "new") == result.checkpoint
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train_loop(make_model(0), make_dataset(16), collate, lm_loss, cfg, resume=True)


# --------------------------------------------------------------------------- distributed (2 CPU processes, gloo)


def test_two_processes_shard_every_global_batch_and_resume_exactly(tmp_path):
    """Under torchrun, process i trains on global_batch[i::2]; a crash and resume still gives the same run."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    common = ["--distributed", "--steps", "8", "--checkpoint-every", "4"]
    base_cmd, base_losses, base_result = _worker(tmp_path / "base", "base", tmp_path, *common,
                                                 "--record", str(tmp_path / "seen.json"))
    crash_cmd, _, _ = _worker(tmp_path / "run", "crashed", tmp_path, *common, "--crash-at", "6")
    with open(tmp_path / "base.log", "w") as base_log, open(tmp_path / "crash.log", "w") as crash_log:
        base = subprocess.Popen(launch + base_cmd[1:], stdout=base_log, stderr=subprocess.STDOUT, env=env)
        crashed = subprocess.Popen(launch + crash_cmd[1:], stdout=crash_log, stderr=subprocess.STDOUT, env=env)
        assert base.wait(timeout=180) == 0, (tmp_path / "base.log").read_text()[-3000:]
        assert crashed.wait(timeout=180) != 0
    assert latest_checkpoint(tmp_path / "run").name == "step-000004"
    assert (tmp_path / "run" / "step-000004" / "rng-process1.pt").is_file()

    resume_cmd, resume_losses, resume_result = _worker(tmp_path / "run", "resumed", tmp_path, *common, "--resume")
    done = subprocess.run(launch + resume_cmd[1:], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    results = [json.loads(Path(str(base_result) + s).read_text()) for s in ("", ".rank1")]
    resumed = [json.loads(Path(str(resume_result) + s).read_text()) for s in ("", ".rank1")]
    assert results[0] == {**results[1], "last_eval": results[0]["last_eval"]}  # both processes agree
    assert [r["resumed_from"] for r in resumed] == [4, 4]
    assert resumed[0]["final_loss"] == results[0]["final_loss"]
    assert resumed[0]["tokens_seen"] == results[0]["tokens_seen"]
    base_steps, resumed_steps = _read_losses(base_losses), _read_losses(resume_losses)
    assert resumed_steps == {s: base_steps[s] for s in range(5, 9)}

    # The shards: global batches of 4 x 2 examples, length-grouped, short last batch dropped.
    lengths = [len(ex["input_ids"]) for ex in make_dataset(62)]
    batcher = LengthGroupedBatches(lengths, 8, seed=0, drop_last=True)
    global_batches = [b for epoch in range(3) for b in batcher.batches_for_epoch(epoch)][: 8 * 2]
    seen = [json.loads(Path(str(tmp_path / "seen.json") + s).read_text()) for s in ("", ".rank1")]
    for rank in (0, 1):
        assert seen[rank] == [b[rank::2] for b in global_batches]
    assert results[0]["tokens_seen"] == sum(lengths[i] for b in global_batches for i in b)


def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    """Two CPU processes (torchrun, gloo) with batch 4 each follow the loss curve of one process with
    batch 8: the same global batches, gradients averaged over equal-size shards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    common = ["--steps", "6", "--checkpoint-every", "100", "--dropout", "0", "--equal-length"]
    single_cmd, single_losses, _ = _worker(tmp_path / "one", "one", tmp_path, *common, "--batch-size", "8")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp_cmd, ddp_losses, _ = _worker(tmp_path / "two", "two", tmp_path, *common, "--batch-size", "4",
                                     "--distributed")
    one = subprocess.run(single_cmd, capture_output=True, text=True, env=env, timeout=180)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    two = subprocess.run(launch + ddp_cmd[1:], capture_output=True, text=True, env=env, timeout=240)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    a, b = _read_losses(single_losses), _read_losses(ddp_losses)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
