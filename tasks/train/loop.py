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
from collections.abc import Callable, Iterator, Sequence
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
    restore_rng_state,
    save_checkpoint,
)

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


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Fraction of ``cfg.lr`` used by optimizer step ``step`` (1-based).

    Warm-up: ``step / warmup_steps`` for ``step <= warmup_steps`` (the first
    step already moves; step ``warmup_steps`` is at the peak). Then, over
    the remaining steps up to ``max_steps``: cosine or linear decay from 1 to
    ``min_lr_ratio`` (reached exactly at ``max_steps``), or constant 1.
    """
    warmup = cfg.warmup_steps
    if warmup > 0 and step <= warmup:
        return step / warmup
    if cfg.schedule == "constant":
        return 1.0
    span = cfg.max_steps - warmup
    progress = 1.0 if span <= 0 else min(max((step - warmup) / span, 0.0), 1.0)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    """LambdaLR whose k-th value (after k scheduler steps) is ``lr × lr_multiplier(k + 1)``.

    The lambda is a plain closure, so the state_dict carries only the step
    count: the schedule of the config in use applies after a resume.
    """

    def multiplier(done_steps: int) -> float:
        return lr_multiplier(done_steps + 1, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


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


@contextlib.contextmanager
def _rng_isolated() -> Iterator[None]:
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


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
    callbacks = callbacks or LoopCallbacks()
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        if not resume and list_checkpoints(checkpoint_dir):
            raise FileExistsError(
                f"{checkpoint_dir} already holds checkpoints (newest {latest_checkpoint(checkpoint_dir).name}); "
                "pass resume=True to continue from it, or use an empty folder"
            )
    if accelerator is None:
        accelerator = make_accelerator(cfg)
    from accelerate.utils import set_seed

    n_proc, rank = accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    device = accelerator.device

    # Seeds dropout & co. (the caller has already built the model; data order has its own generator).
    set_seed(cfg.seed, device_specific=True)  # + process index: each process its own dropout masks

    if lengths is None:
        lengths = [_example_length(ex) for ex in dataset]
    if len(lengths) != len(dataset):
        raise ValueError(f"{len(lengths)} lengths for {len(dataset)} examples")
    global_batch = cfg.batch_size * n_proc
    batcher = LengthGroupedBatches(lengths, global_batch, cfg.seed, cfg.group_by_length, drop_last=n_proc > 1)
    cursor = _DataCursor(batcher)

    model.to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    # The scheduler is deliberately not prepared: accelerate would step it once per process
    # (its schedules count per-process dataloader batches); ours counts optimizer steps.
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    # Our own accumulation (no_sync + one optimizer.step per step); make sure a reused accelerator agrees.
    if not accelerator.gradient_state.sync_gradients:
        accelerator.gradient_state._set_sync_gradients(True)
    # accelerator.backward divides by its gradient_accumulation_steps; we want the mean over cfg.grad_accum.
    backward_scale = accelerator.gradient_accumulation_steps / cfg.grad_accum

    try:
        start_step, tokens_base, resumed_from, last_checkpoint = 0, 0, None, None
        last_loss = float("nan")
        data_layout = {
            "num_examples": len(dataset),
            "global_batch_size": global_batch,
            "grad_accum": cfg.grad_accum,
            "seed": cfg.seed,
            "group_by_length": cfg.group_by_length,
            "num_processes": n_proc,
        }
        if resume:
            found = latest_checkpoint(checkpoint_dir)
            if found is None:
                log.info("no checkpoint in %s: starting fresh", checkpoint_dir)
            else:
                state = load_checkpoint(
                    found, model=raw_model, optimizer=optimizer, scheduler=scheduler, process_index=rank
                )
                data = state["data_state"]
                changed = {k: (data.get(k), v) for k, v in data_layout.items() if data.get(k) != v}
                if changed:
                    log.warning("resuming %s with another data layout %s: the data order will differ", found, changed)
                start_step = resumed_from = int(state["step"])
                cursor.epoch, cursor.index = int(data["epoch"]), int(data["batch_index"])
                tokens_base = int(data.get("tokens_seen", 0))
                last_loss = float(data.get("loss", float("nan")))
                last_checkpoint = found
                log.info("resumed from %s (step %d, epoch %d, batch %d)",
                         found, start_step, cursor.epoch, cursor.index)

        inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
        defer = DEFER_FINITE_CHECK
        if defer is None:
            defer = device.type == "cuda"
        defer = bool(defer) and bool(inner_optimizer.defaults.get("fused"))
        guard = _DeviceFiniteGuard(inner_optimizer, device, start_step, cfg.grad_accum) if defer else None
        # device-side window sums under the guard: [loss, grad norm]; the last step's [loss, grad norm]
        win_sums = torch.zeros(2, device=device) if defer else None
        last_checked: Tensor | None = None

        def sync_loss() -> None:
            nonlocal last_loss
            if guard is not None:
                guard.check()
                if last_checked is not None:
                    last_loss = float(last_checked[0])

        train_model = model
        if cfg.compile:
            if device.type == "cuda":
                train_model = torch.compile(model, dynamic=True)
            else:
                log.info("compile=true ignored on %s (GPU only)", device.type)

        tokens_local = 0  # this process, since this call started

        def tokens_total() -> int:
            local = torch.tensor(tokens_local, device=device, dtype=torch.long)
            return tokens_base + int(accelerator.reduce(local, "sum").item() if n_proc > 1 else local.item())

        def run_eval(step: int) -> dict[str, float]:
            sync_loss()
            if callbacks.on_eval is None:
                return {}
            model.eval()
            try:
                with torch.no_grad(), _rng_isolated():
                    metrics = callbacks.on_eval(step) or {}
            finally:
                model.train()
            metrics = {k: float(v) for k, v in metrics.items()}
            if metrics and callbacks.on_log is not None and is_main:
                with _rng_isolated():
                    callbacks.on_log(dict(metrics), step)
            return metrics

        def write_checkpoint(step: int) -> Path:
            rng_states = None
            if n_proc > 1:
                from accelerate.utils import gather_object

                rng_states = gather_object([capture_rng_state()])
            sync_loss()
            data_state = {"epoch": cursor.epoch, "batch_index": cursor.index, "tokens_seen": tokens_total(),
                          "loss": last_loss, **data_layout}
            path = checkpoint_dir / checkpoint_name(step)
            if is_main:
                path = save_checkpoint(
                    checkpoint_dir, step=step, model=raw_model, optimizer=optimizer, scheduler=scheduler,
                    data_state=data_state, extra=checkpoint_extra, keep=cfg.keep_checkpoints, rng_states=rng_states,
                )
            accelerator.wait_for_everyone()
            if is_main and callbacks.on_checkpoint is not None:
                with _rng_isolated():
                    callbacks.on_checkpoint(path, step)
            return path

        model.train()
        optimizer.zero_grad(set_to_none=True)
        last_eval: dict[str, float] = {}
        step = start_step
        # Log window accumulators (host floats for loss/grad norm: read anyway by the per-step finite check).
        win_loss = win_gnorm = 0.0
        win_steps = win_tokens = 0
        win_metrics: dict[str, Any] = {}
        win_micro = 0
        win_start = time.perf_counter()

        while step < cfg.max_steps:
            step += 1
            micro_losses: list[Tensor] = []
            for micro in range(cfg.grad_accum):
                indices = cursor.next()
                shard = indices[rank::n_proc] if n_proc > 1 else indices
                batch = collate([dataset[i] for i in shard])
                n_tokens = count_tokens(batch)
                tokens_local += n_tokens
                win_tokens += n_tokens
                batch = _to_device(batch, device)
                last_micro = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss, metrics = loss_fn(train_model, batch)
                    accelerator.backward(loss * backward_scale if backward_scale != 1.0 else loss)
                micro_losses.append(loss.detach().float())
                for key, value in (metrics or {}).items():
                    value = value.detach().float() if isinstance(value, Tensor) else float(value)
                    win_metrics[key] = win_metrics.get(key, 0.0) + value
                win_micro += 1

            loss_mean = torch.stack(micro_losses).mean()
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")  # inf: measure, don't clip
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            grad_norm = torch.as_tensor(grad_norm if grad_norm is not None else 0.0, device=loss_mean.device).float()
            checked = torch.stack([loss_mean, grad_norm])
            if n_proc > 1:
                checked = accelerator.reduce(checked, "mean")  # NaN on any process -> NaN everywhere
            lr = optimizer.param_groups[0]["lr"]
            if guard is not None:  # no host sync: checked on the device, read at log/eval/checkpoint steps
                guard.observe(checked, micro_losses)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                win_sums += checked.float()
                last_checked = checked
                win_steps += 1
            else:
                step_loss, step_gnorm = checked.tolist()  # the one host sync of the step
            if guard is None and not (math.isfinite(step_loss) and math.isfinite(step_gnorm)):
                optimizer.zero_grad(set_to_none=True)
                what = "loss" if not math.isfinite(step_loss) else "grad norm"
                bad = [i for i, t in enumerate(micro_losses) if not bool(torch.isfinite(t))]
                where = f" (micro-batch {bad[0] + 1} of {cfg.grad_accum})" if bad else ""
                raise NonFiniteLossError(
                    f"non-finite {what} at step {step}{where}: loss={step_loss}, grad_norm={step_gnorm}; "
                    f"the step was not applied and no checkpoint was written after step {step - 1}",
                    step=step,
                    micro_batch=bad[0] + 1 if bad else None,
                )
            if guard is None:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                last_loss = step_loss
                win_loss += step_loss
                win_gnorm += step_gnorm
                win_steps += 1

            if is_main and callbacks.on_step is not None:
                with _rng_isolated():
                    callbacks.on_step(step, cfg.max_steps)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                if guard is not None:
                    sync_loss()
                    win_loss, win_gnorm = win_sums.tolist()
                    win_sums.zero_()
                elapsed = max(time.perf_counter() - win_start, 1e-9)
                extra_keys = sorted(win_metrics)
                values = [win_metrics[k] for k in extra_keys]
                window = torch.tensor([float(win_tokens)], device=device)
                if values:
                    stacked = torch.stack([torch.as_tensor(v, device=device).float() for v in values])
                    window = torch.cat([window, stacked])
                if n_proc > 1:
                    window = accelerator.reduce(window, "sum")
                window = window.tolist()
                metrics_out = {
                    "train/loss": win_loss / win_steps,
                    "train/lr": lr,
                    "train/grad_norm": win_gnorm / win_steps,
                    "train/epoch": cursor.fractional_epoch,
                    "perf/tokens_per_s": window[0] / elapsed,
                    "perf/step_time_s": elapsed / win_steps,
                }
                for key, total in zip(extra_keys, window[1:]):
                    metrics_out[key if "/" in key else f"train/{key}"] = total / (win_micro * n_proc)
                if is_main and callbacks.on_log is not None:
                    with _rng_isolated():
                        callbacks.on_log(metrics_out, step)
                win_loss = win_gnorm = 0.0
                win_steps = win_tokens = win_micro = 0
                win_metrics = {}
                win_start = time.perf_counter()

            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                last_eval = run_eval(step)

            if checkpoint_dir is not None and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
                last_checkpoint = write_checkpoint(step)

        if step == start_step:  # resumed at or past max_steps: nothing to train, evaluate what we have
            last_eval = run_eval(step)
        sync_loss()

        return LoopResult(
            final_step=step,
            final_loss=last_loss,
            last_eval=last_eval,
            resumed_from=resumed_from,
            checkpoint=last_checkpoint,
            tokens_seen=tokens_total(),
            seconds=time.perf_counter() - started,
        )
    finally:
        if "guard" in locals() and guard is not None:
            guard.release()
        # Hand the model back as it came: without accelerate's autocast wrapper on forward.
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
