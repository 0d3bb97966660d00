"""The one training loop every stage uses (base LM, SFT, reward model, PPO's pieces).

A stage supplies the model, a dataset (a sequence of examples), a ``collate``
that turns a list of examples into a batch of tensors, and a ``loss_fn(model,
batch) -> (loss, metrics)``. The loop owns everything else: seeding, AdamW and
the lr schedule, gradient accumulation, clipping, the non-finite guard,
periodic evaluation through a callback, atomic checkpoints and exact resume.
It imports neither mlflow nor prefect: metrics leave through
:class:`LoopCallbacks`.

Data order and resume
    Batches come from :class:`~.batching.LengthGroupedBatches` (seeded with
    ``cfg.seed + epoch``), never from a ``DataLoader`` sampler. The position is
    ``(epoch, batch_index)`` of the next global batch; it is saved with every
    checkpoint together with the optimizer, scheduler and every RNG state
    (python, numpy, torch CPU, CUDA). ``resume=True`` restores all of it, so a
    run killed at any step and resumed from its last checkpoint computes the
    same steps as an uninterrupted run (bit-identical on CPU).

Distributed
    Under ``accelerator.num_processes = n > 1`` a global batch has
    ``batch_size × n`` examples (one :class:`LengthGroupedBatches` over the
    whole dataset, ``drop_last=True`` so no process gets an empty share) and
    process ``i`` takes ``global_batch[i::n]`` — similar lengths on every
    process, since the global batch is length-grouped. Gradients are averaged
    by DDP at the last micro-batch of each step (``no_sync`` before it).
    Logged losses and token counts are reduced over processes. ``on_log``,
    ``on_step`` and ``on_checkpoint`` run on the main process only;
    ``on_eval`` runs on every process (the stage may evaluate a shard).
    Supported by this loop: one device or DDP (the checkpoint format assumes
    full, unsharded state on each process); FSDP/DeepSpeed configs for
    ``accelerate launch`` are described in docs/scaling.md.

Synchronisation
    The loss of each micro-batch stays a device tensor. On the CPU (no
    host-device boundary) the loss mean and grad norm are read once per step
    (``.tolist()``) for the non-finite check, which runs before the optimizer
    applies the step. On CUDA with the fused AdamW the hot loop has no host
    sync at all: the check is done on the device (a NaN/inf loss or grad norm
    sets the optimizer's ``found_inf``, so the fused kernel skips that update
    and every later one) and read at log, eval and checkpoint steps and at the
    end, which raise :class:`NonFiniteLossError` for the first bad step; the
    weights are then those of the step before it, as with the per-step check,
    and no checkpoint is written after it. The stage's own metrics (device
    tensors) are summed on the device and read at log steps only. Batches
    go to the GPU from pinned memory, without blocking.

Speed
    AdamW is fused (one kernel over all parameters) on CUDA and CPU for
    floating-point parameters; the loss runs under ``accelerator.autocast()``
    (bf16 when mixed precision is on), so a loss function may call parts of
    the model (e.g. the body, then the head on labelled positions) and keep
    the precision policy.

Accelerate
    ``accelerator.prepare(model, optimizer)``; the LambdaLR scheduler is not
    prepared (accelerate would step it once per process per optimizer step).
    Accumulation is explicit (``no_sync`` on all but the last micro-batch, one
    ``optimizer.step()`` per step) rather than ``accelerator.accumulate``, whose
    counter a reused accelerator may carry; the loss is averaged over
    ``cfg.grad_accum`` micro-batches whatever the accelerator's own setting.
    Seeds: ``set_seed(cfg.seed + process index)`` at the start (dropout etc.;
    the caller builds the model before). The model is handed back without
    accelerate's autocast wrapper. ``cfg.compile`` applies on CUDA only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignflow.config import TrainConfig

from .batching import LengthGroupedBatches
from .checkpoint import (
    capture_rng_state,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_isolated,
    save_checkpoint,
)
from .schedule import lambda_scheduler, lr_multiplier

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, Any]]]


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) of an optimizer step is NaN or infinite; nothing of that step was applied."""

    def __init__(self, message: str, *, step: int, micro_batch: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.micro_batch = micro_batch


@dataclass
class LoopCallbacks:
    """Hooks through which a stage sees the loop. Every one may be None.

    on_log(metrics, step)      training metrics every ``log_every`` steps, and the
                               metrics returned by ``on_eval`` (main process only)
    on_eval(step) -> metrics   compute evaluation metrics; called every ``eval_every``
                               steps and at the end, with the model in eval mode under
                               ``torch.no_grad()`` (train mode is restored afterwards).
                               It should return, not log, its metrics.
    on_checkpoint(path, step)  a checkpoint was written (main process only)
    on_step(step, max_steps)   an optimizer step finished (progress; main process only)

    The loop snapshots the RNG states around every callback, so callbacks
    (e.g. sampling generations in eval) never change the training run.
    """

    on_log: Callable[[dict[str, float], int], None] | None = None
    on_eval: Callable[[int], dict[str, float] | None] | None = None
    on_checkpoint: Callable[[Path, int], None] | None = None
    on_step: Callable[[int, int], None] | None = None


@dataclass
class LoopResult:
    final_step: int
    final_loss: float  # mean train loss of the last optimizer step (over its micro-batches and processes)
    last_eval: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None  # step of the checkpoint resumed from; None = fresh start
    checkpoint: Path | None = None  # last checkpoint written (or resumed from, if none was written)
    tokens_seen: int = 0  # non-pad tokens over all processes, including those before a resume
    seconds: float = 0.0  # wall time of this call


# --------------------------------------------------------------------------- building blocks


def resolve_mixed_precision(setting: str) -> str:
    """Accelerate's ``mixed_precision`` for a config value: bf16 on request, or `auto` on a bf16-capable GPU."""
    if setting == "bf16":
        return "bf16"
    if setting == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(cfg: TrainConfig) -> Any:
    """The Accelerator the loop makes when given none: ``grad_accum`` steps, bf16 per :func:`resolve_mixed_precision`.

    accelerate keeps one process-wide state and refuses a second mixed-precision
    setting in the same process; stages run one after another in one process
    (a flow, the tests) may differ, so a stale single-process state is reset
    first (never the distributed part of it).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    wanted = resolve_mixed_precision(cfg.mixed_precision)
    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and previous != wanted:
        log.info("accelerate state had mixed_precision=%s; resetting it for %s", previous, wanted)
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=wanted)


FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def fused_adamw_supported(params: Sequence[torch.nn.Parameter]) -> bool:
    """True when torch's fused AdamW can take these parameters: all floating point, all on one CUDA or CPU device."""
    params = list(params)
    if not params:
        return False
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in FUSED_ADAMW_DEVICES
            and all(p.is_floating_point() for p in params))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, *, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (no decay for biases, norm weights, any parameter with ndim < 2).

    ``fused`` defaults to True when :func:`fused_adamw_supported` (CUDA or CPU,
    floating-point parameters); otherwise torch picks its implementation.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():  # named_parameters yields a tied parameter once
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if fused is None:
        fused = fused_adamw_supported(decay + no_decay)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=fused or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose k-th value (after k scheduler steps) is ``lr × lr_multiplier(k + 1)``."""
    return lambda_scheduler(optimizer, lambda done_steps: lr_multiplier(done_steps + 1, cfg))


def count_tokens(batch: dict[str, Any]) -> int:
    """Non-pad tokens of a (CPU) batch: sum of every ``*attention_mask``; else the size of ``input_ids``."""
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and isinstance(v, Tensor)]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, Tensor) else 0


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":  # pinned host memory: the copy does not block the host
        return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, Tensor) else v
                for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


# None: decided by the device (deferred on CUDA with a fused optimizer); tests may force True/False.
DEFER_FINITE_CHECK: bool | None = None


class _DeviceFiniteGuard:
    """The non-finite check of every step, kept on the device (no host sync per step).

    ``observe`` records the first step whose loss or grad norm is not finite and
    sets ``found_inf`` on the (fused) optimizer from then on, so the kernel skips
    that update and all later ones; ``check`` reads the record (one host sync) and
    raises :class:`NonFiniteLossError` as the per-step check would have.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, start_step: int, grad_accum: int):
        self.optimizer = optimizer
        self.grad_accum = grad_accum
        self.halted = torch.zeros((), device=device, dtype=torch.float32)
        self.count = torch.full((), float(start_step), device=device, dtype=torch.float32)
        self.first = torch.zeros(4, device=device, dtype=torch.float32)  # step, micro-batch (1-based), loss, gnorm

    def observe(self, checked: Tensor, micro_losses: list[Tensor]) -> None:
        self.count += 1
        finite_micro = torch.isfinite(torch.stack(micro_losses))
        ok = torch.isfinite(checked).all()
        micro = torch.where(finite_micro.all(), 0, (~finite_micro).int().argmax() + 1).float()
        record = torch.stack([self.count, micro, checked[0].float(), checked[1].float()])
        self.first = torch.where(ok | (self.halted > 0), self.first, record)
        self.halted = torch.maximum(self.halted, (~ok).float())
        self.optimizer.found_inf = self.halted

    def check(self) -> None:
        if float(self.halted) == 0.0:  # the host sync
            return
        step_f, micro_f, loss, gnorm = self.first.tolist()
        step, micro = int(step_f), int(micro_f)
        what = "loss" if not math.isfinite(loss) else "grad norm"
        where = f" (micro-batch {micro} of {self.grad_accum})" if micro else ""
        raise NonFiniteLossError(
            f"non-finite {what} at step {step}{where}: loss={loss}, grad_norm={gnorm}; the step was not applied "
            f"and no checkpoint was written after step {step - 1}",
            step=step, micro_batch=micro or None,
        )

    def release(self) -> None:
        if getattr(self.optimizer, "found_inf", None) is not None:
            del self.optimizer.found_inf


def _example_length(example: Any) -> int:
    if isinstance(example, dict):
        for key in ("input_ids", "chosen_input_ids", "prompt_input_ids"):
            if key in example:
                return len(example[key])
    return 1


class _DataCursor:
    """Position in the infinite sequence of global batches: (epoch, index of the next batch in that epoch)."""

    def __init__(self, batcher: LengthGroupedBatches, epoch: int = 0, index: int = 0) -> None:
        if len(batcher) == 0:
            raise ValueError(
                f"the dataset ({batcher.num_examples} examples) gives no batch of {batcher.batch_size}"
                + (" (drop_last under distributed training)" if batcher.drop_last else "")
            )
        self.batcher = batcher
        self.epoch = epoch
        self.index = index
        self._cache: tuple[int, list[list[int]]] | None = None

    def _batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.batcher.batches_for_epoch(self.epoch))
        return self._cache[1]

    def next(self) -> list[int]:
        batches = self._batches()
        if self.index >= len(batches):
            self.epoch, self.index = self.epoch + 1, 0
            batches = self._batches()
        batch = batches[self.index]
        self.index += 1
        return batch

    @property
    def fractional_epoch(self) -> float:
        return self.epoch + self.index / len(self.batcher)


# --------------------------------------------------------------------------- the loop


def train_loop(
    model: torch.nn.Module,
    dataset: Sequence[dict],
    collate: Callable[[list[dict]], dict[str, Tensor]],
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    lengths: Sequence[int] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    callbacks: LoopCallbacks | None = None,
    accelerator: Any | None = None,
    checkpoint_extra: dict | None = None,
) -> LoopResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps; see the module docstring.

    ``lengths``: length of each example for length grouping (default: length
    of its ``input_ids``). ``loss_fn(model, batch)`` gets the prepared model and
    a batch on the device and returns the mean loss of the micro-batch and a
    dict of extra metrics (floats or 0-d tensors; logged as ``train/<name>``,
    averaged over the log window). ``checkpoint_dir``: write checkpoints there
    every ``checkpoint_every`` steps and at the end; a fresh run (``resume``
    False) refuses a folder that already holds checkpoints. ``resume``: continue
    from the newest checkpoint in ``checkpoint_dir`` (none: fresh start,
    ``resumed_from=None``). ``accelerator``: an ``accelerate.Accelerator`` to
    use (default: one made from ``cfg``). ``checkpoint_extra``: JSON data stored
    in every checkpoint's state.json.
    """
    started = time.perf_counter()
    _check_checkpoint_dir(checkpoint_dir, resume)
    run = _LoopRun(model, dataset, collate, loss_fn, cfg, lengths=lengths, checkpoint_dir=checkpoint_dir,
                   callbacks=callbacks or LoopCallbacks(), accelerator=accelerator or make_accelerator(cfg),
                   checkpoint_extra=checkpoint_extra)
    try:
        if resume:
            run.resume()
        run.start_guard_and_window()
        step = run.start_step
        while step < cfg.max_steps:
            step += 1
            run.train_step(step)
            run.periodic(step)
        if step == run.start_step:  # resumed at or past max_steps: nothing to train, evaluate what we have
            run.last_eval = run.evaluate(step)
        run.sync_loss()
        return LoopResult(final_step=step, final_loss=run.last_loss, last_eval=run.last_eval,
                          resumed_from=run.resumed_from, checkpoint=run.last_checkpoint,
                          tokens_seen=run.tokens_total(), seconds=time.perf_counter() - started)
    finally:
        run.close()


def _check_checkpoint_dir(checkpoint_dir: Path | None, resume: bool) -> None:
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    if checkpoint_dir is not None and not resume and list_checkpoints(Path(checkpoint_dir)):
        raise FileExistsError(
            f"{checkpoint_dir} already holds checkpoints (newest {latest_checkpoint(Path(checkpoint_dir)).name}); "
            "pass resume=True to continue from it, or use an empty folder"
        )


class _LogWindow:
    """Sums of the steps since the last log line (host floats, or device sums under the deferred check)."""

    def __init__(self, device: torch.device, deferred: bool) -> None:
        self.device_sums = torch.zeros(2, device=device) if deferred else None  # [loss, grad norm]
        self.reset()

    def reset(self) -> None:
        self.loss = self.gnorm = 0.0
        self.steps = self.tokens = self.micro = 0
        self.metrics: dict[str, Any] = {}
        self.start = time.perf_counter()

    def add_metrics(self, metrics: dict[str, Any] | None) -> None:
        for key, value in (metrics or {}).items():
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            self.metrics[key] = self.metrics.get(key, 0.0) + value
        self.micro += 1


class _LoopRun:
    """One call of :func:`train_loop`: setup in ``__init__``, then ``train_step`` and ``periodic`` per step.

    ``resume`` (optional) and ``start_guard_and_window`` finish the setup.
    ``train_step`` is the maths of one optimizer step (micro-batches, clipping,
    the non-finite check, the update); ``periodic`` runs the hooks due at that
    step (progress, log window, evaluation, checkpoint).
    """

    # -- setup -----------------------------------------------------------------------------------------------------

    def __init__(self, model: torch.nn.Module, dataset: Sequence[dict], collate: Callable, loss_fn: LossFn,
                 cfg: TrainConfig, *, lengths: Sequence[int] | None, checkpoint_dir: Path | None,
                 callbacks: LoopCallbacks, accelerator: Any, checkpoint_extra: dict | None) -> None:
        from accelerate.utils import set_seed

        self.dataset, self.collate, self.loss_fn, self.cfg = dataset, collate, loss_fn, cfg
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.callbacks, self.accelerator, self.checkpoint_extra = callbacks, accelerator, checkpoint_extra
        self.n_proc, self.rank = accelerator.num_processes, accelerator.process_index
        self.is_main = accelerator.is_main_process
        self.device = device = accelerator.device

        # Seeds dropout & co. (the caller has already built the model; data order has its own generator).
        set_seed(cfg.seed, device_specific=True)  # + process index: each process its own dropout masks

        if lengths is None:
            lengths = [_example_length(ex) for ex in dataset]
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} examples")
        self.global_batch = cfg.batch_size * self.n_proc
        batcher = LengthGroupedBatches(lengths, self.global_batch, cfg.seed, cfg.group_by_length,
                                       drop_last=self.n_proc > 1)
        self.cursor = _DataCursor(batcher)

        model.to(device)
        optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(optimizer, cfg)
        # The scheduler is deliberately not prepared: accelerate would step it once per process
        # (its schedules count per-process dataloader batches); ours counts optimizer steps.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.raw_model = accelerator.unwrap_model(self.model)
        # Our own accumulation (no_sync + one optimizer.step per step); make sure a reused accelerator agrees.
        if not accelerator.gradient_state.sync_gradients:
            accelerator.gradient_state._set_sync_gradients(True)
        # accelerator.backward divides by its gradient_accumulation_steps; we want the mean over cfg.grad_accum.
        self.backward_scale = accelerator.gradient_accumulation_steps / cfg.grad_accum

        self.start_step, self.tokens_base, self.resumed_from = 0, 0, None
        self.last_checkpoint: Path | None = None
        self.last_loss = float("nan")
        self.last_eval: dict[str, float] = {}
        self.tokens_local = 0  # this process, since this call started
        self.data_layout = {"num_examples": len(dataset), "global_batch_size": self.global_batch,
                            "grad_accum": cfg.grad_accum, "seed": cfg.seed, "group_by_length": cfg.group_by_length,
                            "num_processes": self.n_proc}
        self.guard: _DeviceFiniteGuard | None = None
        self.last_checked: Tensor | None = None
        self.train_model = self._compiled(self.model)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)

    def _compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.cfg.compile:
            return model
        if self.device.type == "cuda":
            return torch.compile(model, dynamic=True)
        log.info("compile=true ignored on %s (GPU only)", self.device.type)
        return model

    def resume(self) -> None:
        """Restore weights, optimizer, scheduler, RNG states and data position from the newest checkpoint."""
        found = latest_checkpoint(self.checkpoint_dir)
        if found is None:
            log.info("no checkpoint in %s: starting fresh", self.checkpoint_dir)
            return
        state = load_checkpoint(found, model=self.raw_model, optimizer=self.optimizer, scheduler=self.scheduler,
                                process_index=self.rank)
        data = state["data_state"]
        changed = {k: (data.get(k), v) for k, v in self.data_layout.items() if data.get(k) != v}
        if changed:
            log.warning("resuming %s with another data layout %s: the data order will differ", found, changed)
        self.start_step = self.resumed_from = int(state["step"])
        self.cursor.epoch, self.cursor.index = int(data["epoch"]), int(data["batch_index"])
        self.tokens_base = int(data.get("tokens_seen", 0))
        self.last_loss = float(data.get("loss", float("nan")))
        self.last_checkpoint = found
        log.info("resumed from %s (step %d, epoch %d, batch %d)", found, self.start_step, self.cursor.epoch,
                 self.cursor.index)

    def start_guard_and_window(self) -> None:
        """The non-finite guard (deferred on CUDA with a fused optimizer) and the first log window."""
        inner_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # under AcceleratedOptimizer
        defer = DEFER_FINITE_CHECK if DEFER_FINITE_CHECK is not None else self.device.type == "cuda"
        defer = bool(defer) and bool(inner_optimizer.defaults.get("fused"))
        if defer:
            self.guard = _DeviceFiniteGuard(inner_optimizer, self.device, self.start_step, self.cfg.grad_accum)
        self.window = _LogWindow(self.device, defer)

    # -- one optimizer step ---------------------------------------------------------------------------------------

    def train_step(self, step: int) -> None:
        """Micro-batches (accumulated), clipping, the non-finite check, one optimizer and scheduler step."""
        micro_losses = [self._micro_step(micro) for micro in range(self.cfg.grad_accum)]
        loss_mean = torch.stack(micro_losses).mean()
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")  # inf: measure only
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = torch.as_tensor(grad_norm if grad_norm is not None else 0.0, device=loss_mean.device).float()
        checked = torch.stack([loss_mean, grad_norm])
        if self.n_proc > 1:
            checked = self.accelerator.reduce(checked, "mean")  # NaN on any process -> NaN everywhere
        self.lr = self.optimizer.param_groups[0]["lr"]
        if self.guard is not None:  # no host sync: checked on the device, read at log/eval/checkpoint steps
            self.guard.observe(checked, micro_losses)
            self._apply_update()
            self.window.device_sums += checked.float()
            self.last_checked = checked
        else:
            step_loss, step_gnorm = checked.tolist()  # the one host sync of the step
            if not (math.isfinite(step_loss) and math.isfinite(step_gnorm)):
                self.optimizer.zero_grad(set_to_none=True)
                self._raise_non_finite(step, step_loss, step_gnorm, micro_losses)
            self._apply_update()
            self.last_loss = step_loss
            self.window.loss += step_loss
            self.window.gnorm += step_gnorm
        self.window.steps += 1

    def _micro_step(self, micro: int) -> Tensor:
        """Forward and backward of one micro-batch (gradients synchronised at the last one only)."""
        indices = self.cursor.next()
        shard = indices[self.rank :: self.n_proc] if self.n_proc > 1 else indices
        batch = self.collate([self.dataset[i] for i in shard])
        n_tokens = count_tokens(batch)
        self.tokens_local += n_tokens
        self.window.tokens += n_tokens
        batch = _to_device(batch, self.device)
        last_micro = micro == self.cfg.grad_accum - 1
        with contextlib.nullcontext() if last_micro else self.accelerator.no_sync(self.model):
            with self.accelerator.autocast():
                loss, metrics = self.loss_fn(self.train_model, batch)
            scale = self.backward_scale
            self.accelerator.backward(loss * scale if scale != 1.0 else loss)
        self.window.add_metrics(metrics)
        return loss.detach().float()

    def _apply_update(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _raise_non_finite(self, step: int, loss: float, gnorm: float, micro_losses: list[Tensor]) -> None:
        what = "loss" if not math.isfinite(loss) else "grad norm"
        bad = [i for i, t in enumerate(micro_losses) if not bool(torch.isfinite(t))]
        where = f" (micro-batch {bad[0] + 1} of {self.cfg.grad_accum})" if bad else ""
        raise NonFiniteLossError(
            f"non-finite {what} at step {step}{where}: loss={loss}, grad_norm={gnorm}; "
            f"the step was not applied and no checkpoint was written after step {step - 1}",
            step=step, micro_batch=bad[0] + 1 if bad else None,
        )

    # -- periodic hooks ---------------------------------------------------------------------------------------------

    def periodic(self, step: int) -> None:
        """Progress, then (when due) the log window, an evaluation and a checkpoint."""
        cfg = self.cfg
        if self.is_main and self.callbacks.on_step is not None:
            with rng_isolated():
                self.callbacks.on_step(step, cfg.max_steps)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            self.log_window(step)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            self.last_eval = self.evaluate(step)
        if self.checkpoint_dir is not None and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            self.last_checkpoint = self.write_checkpoint(step)

    def log_window(self, step: int) -> None:
        """``train/*`` and ``perf/*`` averaged over the steps since the last log line (reduced over processes)."""
        w = self.window
        if self.guard is not None:
            self.sync_loss()
            w.loss, w.gnorm = w.device_sums.tolist()
            w.device_sums.zero_()
        elapsed = max(time.perf_counter() - w.start, 1e-9)
        extra_keys = sorted(w.metrics)
        window = torch.tensor([float(w.tokens)], device=self.device)
        if extra_keys:
            stacked = torch.stack([torch.as_tensor(w.metrics[k], device=self.device).float() for k in extra_keys])
            window = torch.cat([window, stacked])
        if self.n_proc > 1:
            window = self.accelerator.reduce(window, "sum")
        window = window.tolist()
        metrics = {
            "train/loss": w.loss / w.steps,
            "train/lr": self.lr,
            "train/grad_norm": w.gnorm / w.steps,
            "train/epoch": self.cursor.fractional_epoch,
            "perf/tokens_per_s": window[0] / elapsed,
            "perf/step_time_s": elapsed / w.steps,
        }
        for key, total in zip(extra_keys, window[1:]):
            metrics[key if "/" in key else f"train/{key}"] = total / (w.micro * self.n_proc)
        if self.is_main and self.callbacks.on_log is not None:
            with rng_isolated():
                self.callbacks.on_log(metrics, step)
        w.reset()

    def evaluate(self, step: int) -> dict[str, float]:
        self.sync_loss()
        if self.callbacks.on_eval is None:
            return {}
        self.model.eval()
        try:
            with torch.no_grad(), rng_isolated():
                metrics = self.callbacks.on_eval(step) or {}
        finally:
            self.model.train()
        metrics = {k: float(v) for k, v in metrics.items()}
        if metrics and self.callbacks.on_log is not None and self.is_main:
            with rng_isolated():
                self.callbacks.on_log(dict(metrics), step)
        return metrics

    def write_checkpoint(self, step: int) -> Path:
        rng_states = None
        if self.n_proc > 1:
            from accelerate.utils import gather_object

            rng_states = gather_object([capture_rng_state()])
        self.sync_loss()
        data_state = {"epoch": self.cursor.epoch, "batch_index": self.cursor.index,
                      "tokens_seen": self.tokens_total(), "loss": self.last_loss, **self.data_layout}
        path = self.checkpoint_dir / checkpoint_name(step)
        if self.is_main:
            path = save_checkpoint(self.checkpoint_dir, step=step, model=self.raw_model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, data_state=data_state, extra=self.checkpoint_extra,
                                   keep=self.cfg.keep_checkpoints, rng_states=rng_states)
        self.accelerator.wait_for_everyone()
        if self.is_main and self.callbacks.on_checkpoint is not None:
            with rng_isolated():
                self.callbacks.on_checkpoint(path, step)
        return path

    # -- bookkeeping --------------------------------------------------------------------------------------------------

    def sync_loss(self) -> None:
        """Under the deferred check: raise for a non-finite step now, and read the last step's loss."""
        if self.guard is not None:
            self.guard.check()
            if self.last_checked is not None:
                self.last_loss = float(self.last_checked[0])

    def tokens_total(self) -> int:
        local = torch.tensor(self.tokens_local, device=self.device, dtype=torch.long)
        reduced = self.accelerator.reduce(local, "sum").item() if self.n_proc > 1 else local.item()
        return self.tokens_base + int(reduced)

    def close(self) -> None:
        if self.guard is not None:
            self.guard.release()
        # Hand the model back as it came: without accelerate's autocast wrapper on forward.
        self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
