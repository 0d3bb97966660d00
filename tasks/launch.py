"""A stage on several processes: the launcher command, and what the processes say to each other.

``alignflow sft --processes 2`` re-runs itself as ``python -m torch.distributed.run
--standalone --nproc_per_node 2 -m alignflow.flows.sft <same options>`` (or
``accelerate launch --config_file FILE -m alignflow.flows.sft ...`` with
``--launch accelerate``). Under the launcher:

* process 0 runs the stage's flow as on one process: the one MLflow run, the
  Prefect flow run, evaluation, registration. When it reaches training it
  hands the other processes a *plan* (:func:`share_plan`: start model, rows,
  checkpoint folder, resume) and trains with them;
* every other process waits for that plan (:func:`receive_plan`), trains its
  shard through the same training function with no tracking hooks, and leaves.

Checkpoints are written by process 0 only (the training loop saves from the
main process); every process restores from them on ``--resume``. If process 0
stops before training (a user error, a missing model), it sends an empty plan
and the others exit without training; if it stops later, it exits and the
launcher ends the others.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

LAUNCHERS = ("torchrun", "accelerate")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


#: Environment variable naming the file where process 0 leaves a user error's exit code for the launching command.
STATUS_ENV = "ALIGNFLOW_LAUNCH_STATUS"


def report_user_error(code: int = 2) -> bool:
    """Process 0 of a launched stage: record a user error's exit code for the command that launched it.

    Returns whether it was recorded. When the error came before training (no peer inside a collective, the
    plan told them to leave), the process may then exit 0: the launcher has no failure to summarise, and the
    launching command turns the recorded code into its own exit code: one error line, exit 2, as without a
    launcher.
    """
    path = os.environ.get(STATUS_ENV)
    if not path or not is_distributed() or rank() != 0:
        return False
    Path(path).write_text(str(code))
    return True


def launched_status(path: Path, returncode: int) -> int:
    """The launching command's exit code: the recorded user error's, else the launcher's own."""
    try:
        recorded = Path(path).read_text().strip()
    except OSError:
        return returncode
    return int(recorded) if recorded.isdigit() else returncode


def launch_command(module: str, argv: list[str], *, processes: int, launcher: str = "torchrun",
                   accelerate_config: Path | None = None) -> list[str]:
    """The command that runs ``python -m module argv`` on ``processes`` processes."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launch must be one of {', '.join(LAUNCHERS)}, not {launcher!r}")
    if processes < 1:
        raise ValueError(f"--processes must be at least 1, not {processes}")
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if accelerate_config is not None:
            if not Path(accelerate_config).is_file():
                raise FileNotFoundError(f"accelerate config not found: {accelerate_config}")
            cmd += ["--config_file", str(accelerate_config)]
        if processes > 1 or accelerate_config is None:
            cmd += ["--num_processes", str(processes)]
        return [*cmd, "-m", module, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", module, *argv]


def _group() -> Any:
    """The process group (made from the launcher's environment on first use)."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    # gloo on CPU processes, nccl on GPUs; without cpu=True accelerate sees CPU processes as one
    PartialState(cpu=not torch.cuda.is_available())

    return dist


_shared = False


def share_plan(plan: dict[str, Any] | None) -> None:
    """Process 0: send the training plan (None: nothing to train) to the other processes."""
    global _shared
    if not is_distributed():
        return
    _group().broadcast_object_list([plan], src=0)
    _shared = True


def plan_shared() -> bool:
    return _shared


def share_plan_once(plan: dict[str, Any] | None) -> None:
    """Process 0: send ``plan`` unless a plan was sent already."""
    if not _shared:
        share_plan(plan)


def receive_plan() -> dict[str, Any] | None:
    """Any other process: the plan process 0 sends (None: process 0 stopped before training)."""
    box: list[Any] = [None]
    _group().broadcast_object_list(box, src=0)
    return box[0]


def finish() -> None:
    """Every process: leave together and close the process group (a peer exiting mid-teardown can abort)."""
    if not is_distributed():
        return
    global _closed
    dist = _group()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _closed = True


_closed = False


def group_closed() -> bool:
    """Whether this process closed its process group with :func:`finish`."""
    return _closed


def exit_without_finalization(code: Any) -> NoReturn:
    """Leave the process as the interpreter would, but without its finalization.

    First what the interpreter runs on exit, in its order: it waits for the threads that are not daemons and
    runs the hooks Python's thread machinery registered (Prefect's log and event workers drain to the API
    there, while its temporary server is still up), then the exit handlers (``atexit``, LIFO: the temporary
    server stops, the contract worker ends), logging, and the standard streams are flushed. Then the process
    ends with ``os._exit``. What that skips is the teardown of every module and object the command loaded:

    * after an ``alignflow`` command (:func:`alignflow.flows.cli.main`) that took 1.7-2.0 s of wall time
      (the ingest of a small site: 12.3 -> 10.5 s, 2026-12-03), after the work was done and saved;
    * in a launched process that has closed its process group, gloo's threads and tensors they still hold
      can be destroyed there and abort the process ("terminate called without an active exception",
      SIGABRT), rarely, after its work is done and saved; the launcher would then report the stage as failed.

    ``code`` is a ``SystemExit`` code: None is 0; a message is printed and exits 1, as Python does.
    """
    import atexit
    import logging
    import threading

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    shutdown = getattr(threading, "_shutdown", None)  # CPython's first step on exit (no public name)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()  # what the interpreter runs next on exit (atexit handlers, LIFO)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
