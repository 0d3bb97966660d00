"""The `alignflow` command line: one command per flow, same options everywhere.

    alignflow demo                                  # the embedded default, end to end
    alignflow ingest SOURCE... [--format F] [--config FILE] [--set k=v] [--workdir DIR]
    alignflow generate-dump --out DIR --questions N --seed S [--archive]
    alignflow <stage> [--config FILE] [--set k=v] [--resume] [--workdir DIR]   # every stage of alignflow.stages
    alignflow label-batch ... / alignflow label serve|invite|simulate|export|scores|pairs|train   # flows/label_cli.py
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Optional

JEMALLOC_CONF_VAR = "JE_ARROW_MALLOC_CONF"  # options of the jemalloc bundled with Arrow (its symbol prefix: je_arrow_)
JEMALLOC_CONF = "muzzy_decay_ms:0"

# Arrow on the C library's allocator rather than its bundled jemalloc, in the command and the processes it starts
# (set before pyarrow is first loaded): jemalloc keeps freed pages for reuse, and at 1 GiB of Pushshift input the
# process tree peaked at 990-1,018 MiB with it against 966-970 MiB without, at the same speed (bench/REPORT.md).
# A Stack Exchange build, where jemalloc saves 3-4 CPU-s at 1 GiB, switches to it (build.use_arrow_allocator).
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
# On that jemalloc, pages the build freed are given back to the OS once they decay (1 s, Arrow's setting), not
# marked free-when-needed for another second (MADV_FREE, "muzzy"): muzzy pages still count as the process's RSS
# until the kernel is short of memory. At 1 GiB with 2 workers the tree's peak fell by ~15-20 MiB at the same
# speed (bench/REPORT.md, "no muzzy pages"). Read by jemalloc when it first starts; a value the user set is kept.
os.environ.setdefault(JEMALLOC_CONF_VAR, JEMALLOC_CONF)

import typer  # noqa: E402

from alignflow import stages
from alignflow.startup import imports_without_gc

from .environment import (
    STOP_SIGNALS, WorkdirError, debug, flow_run_settings, is_environment_error, prepare, wait_for_prefect_server,
)

WorkdirOpt = Annotated[Path, typer.Option("--workdir", help="Folder for everything a run writes.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML config (see configs/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Dotted override, e.g. ingest.max_pairs_per_question=5.")]
DEFAULT_WORKDIR = Path("./alignflow-work")


def _fail(exc: BaseException) -> None:
    """A user error: one line on stderr and exit code 2 (with ``--debug``, the traceback first)."""
    if debug():
        traceback.print_exception(exc)
    typer.secho(f"error: {error_line(exc)}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def error_line(exc: BaseException) -> str:
    """The message of an error as one line."""
    if is_environment_error(exc) and not isinstance(exc, WorkdirError):
        what = getattr(exc, "filename", None)
        reason = getattr(exc, "strerror", None) or str(exc)
        return f"{reason}{f': {what}' if what else ''} (free space or permissions, then run again)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + "…"


def is_user_error(exc: BaseException) -> bool:
    """An error the user can fix (input, config, environment): reported as one line, not a traceback."""
    return isinstance(exc, (*_user_errors(), WorkdirError)) or is_environment_error(exc)


# The error classes a user can fix, by module. Only those of modules already imported are looked up: an error
# of a class can only have been raised once its module is loaded, and importing the others just to compare
# would cost a refusal seconds (alignflow.models.loading brings torch and transformers).
_USER_ERRORS = (
    ("alignflow.config", "ConfigError"),
    ("alignflow.tasks.ingest.errors", "IngestError"),
    ("alignflow.data_contracts.contracts", "ContractViolation"),
    ("alignflow.tasks.train.pairs", "PairSelectionError"),
    ("alignflow.models.loading", "ModelLoadError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules]
    return (*loaded, FileNotFoundError)


def _load(config: Path | None, overrides: list[str] | None):
    from alignflow.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        _fail(exc)


def ingest(
    sources: Annotated[list[Path], typer.Argument(help="Posts.xml, site folders, <site>.7z, RC_/RS_ files, pairs files.")],
    format: Annotated[str, typer.Option("--format", help="auto, or a reader: stackexchange, reddit, pairs, hf, ...")] = "auto",
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="Exit 0 even when no pairs come out.")] = False,
) -> None:
    """Turn upvote dumps into contracted preference datasets (one MLflow run)."""
    from alignflow.tasks.ingest.sources import format_names

    _limit_malloc_arenas()
    if format != "auto" and format not in format_names():
        _fail(ValueError(f"--format must be auto or one of {', '.join(format_names())}, not {format!r}"))
    with imports_without_gc():  # everything up to the flow: checks, servers and workers started, imports
        wd = prepare(workdir, server=True)
        cfg = _load(config, set_)
        from alignflow.tasks.ingest.ranges import default_workers

        _check_ingest_input(cfg, sources, cfg.ingest.format if format == "auto" else format)

        from alignflow.tasks.ingest.run import (
            READ_AHEAD_BYTES, READ_AHEAD_BYTES_BESIDE_CONTRACTS, prehash, read_ahead,
        )

        fmt = cfg.ingest.format if format == "auto" else format
        if (cfg.ingest.workers or default_workers()) > 1:
            from alignflow.tasks.ingest.contract_service import prestart, start_early

            early = start_early(sources)
            if early:
                prestart()  # the contract worker loads GX while we start up
            read_ahead(sources, wd, cfg.ingest, fmt, budget=READ_AHEAD_BYTES_BESIDE_CONTRACTS if early
                       else READ_AHEAD_BYTES)  # the first ranges are read meanwhile
        prehash(sources, fmt)  # the digests of the cache key
        from .ingest import ingest as ingest_flow

        wait_for_prefect_server()
    try:
        with flow_run_settings():
            out = ingest_flow([str(s) for s in sources], workdir=str(wd), config=cfg,
                              format=None if format == "auto" else format)
    except _user_errors() as exc:
        _fail(exc)
    _print_ingest(out)
    for warning in out["report"].get("warnings", []):
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    if not out["datasets"]["pairs"]["rows"] and not allow_empty:
        _fail(ValueError("the ingest produced no preference pairs (see the warnings above); "
                         "pass --allow-empty to accept an empty result"))


# Malloc arenas of the ingest's processes (this one and those it starts: readers, the contract process, Prefect's
# server), unless MALLOC_ARENA_MAX says otherwise. glibc makes up to 8 per core, one per thread as they come; each
# keeps the buffers its threads freed (the walk's reads ahead, the contract service's pipes, Prefect's threads).
# At 1 GiB with 2 workers, 2 arenas took the process tree's peak RSS from 970-985 MiB to 946-951 (12 MiB contract
# batches; 932 to 901 with 8) at the same speed: the room the larger batches of ``ingest.contract_mb`` take
# (bench/REPORT.md, "Text bounded in bytes; two malloc arenas").
INGEST_MALLOC_ARENAS = 2


def _limit_malloc_arenas() -> None:
    from alignflow.tasks.ingest.heap import limit_arenas

    value = os.environ.setdefault("MALLOC_ARENA_MAX", str(INGEST_MALLOC_ARENAS))
    try:
        limit_arenas(int(value))
    except ValueError:  # not a number: glibc ignores it in the processes started; so does this one
        pass


def _check_ingest_input(cfg, sources: list, fmt: str) -> None:
    """Refuse a config error or a missing or empty SOURCE before anything starts (Prefect's server, the flow)."""
    from alignflow.tasks.ingest.errors import IngestError
    from alignflow.tasks.ingest.run import check_ingest_config, check_sources

    try:
        check_ingest_config(cfg.ingest)
        check_sources(sources, fmt)
    except (IngestError, OSError) as exc:
        _fail(exc)


def _print_ingest(out: dict) -> None:
    typer.echo("")
    typer.echo(f"datasets   {out['out_dir']}{'  (cache hit)' if out['cache_hit'] else ''}")
    for kind, meta in out["datasets"].items():
        typer.echo(f"  {kind:<11}{meta['rows']:>9} rows  {Path(meta['path']).name}")
    typer.echo(f"report     {Path(out['out_dir']) / 'ingest_report.json'}")
    typer.echo(f"mlflow run {out['run_id']} (experiment {out['experiment_id']}) at {out['tracking_uri']}")
    uri = out["tracking_uri"]
    if uri.startswith("sqlite:"):
        typer.echo(f"open the UI: mlflow ui --backend-store-uri {uri} --port 5000  ->  http://127.0.0.1:5000")


def generate_dump(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the site folder (and archive) into.")],
    questions: Annotated[int, typer.Option("--questions", min=1, help="Number of questions.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same bytes.")] = 0,
    archive: Annotated[bool, typer.Option("--archive", help="Also pack the site as <site>.7z.")] = False,
    site: Annotated[str, typer.Option("--site", help="Site name.")] = "synthetic.stackexchange.com",
) -> None:
    """Write a synthetic Stack Exchange dump with a planted preference rule."""
    from alignflow.tasks.ingest.synthetic import PLANTED_RULE, generate_dump as generate

    try:
        path = generate(out, questions=questions, seed=seed, site=site, archive=archive)
    except (ValueError, OSError) as exc:  # a site name that is a path, an --out that is a file
        _fail(exc)
    typer.echo(f"wrote {path}")
    typer.echo(f"planted rule: {PLANTED_RULE}")


def demo(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    config: Annotated[Path, typer.Option("--config", help="YAML config.")] = Path(__file__).resolve().parents[1]
    / "configs" / "demo.yaml",
    set_: SetOpt = None,
) -> None:
    """The embedded default end to end: `pipeline` on configs/demo.yaml (generated dumps, small models, CPU)."""
    from alignflow.tasks.ingest.synthetic import PLANTED_RULE

    typer.echo(f"planted rule of the generated dumps: {PLANTED_RULE}")
    pipeline(workdir=workdir, config=config if config.is_file() else None, set_=set_, resume=False)


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the stage's latest checkpoint.")]


ProcessesOpt = Annotated[int, typer.Option("--processes", min=1, help="Train on N processes (one per GPU, or "
                                            "CPU processes): the stage runs under the launcher.")]
LaunchOpt = Annotated[Optional[str], typer.Option("--launch", help="torchrun|accelerate (default torchrun; "
                                                  "accelerate with --accelerate-config).")]
AccelerateConfigOpt = Annotated[Optional[Path], typer.Option("--accelerate-config", help="Accelerate config file "
                                                             "(configs/accelerate/); implies --launch accelerate.")]


def _run_stage(stage: str, workdir: Path, config: Path | None, set_: list[str] | None, resume: bool) -> dict:
    from alignflow.tasks import launch

    helper = launch.is_distributed() and launch.rank() != 0  # a helper process of a launched stage
    wd = prepare(workdir, server=not helper)
    cfg = _load(config, set_)
    entry = stages.get(stage)
    from alignflow.tasks.train.loop import NonFiniteLossError

    if helper:  # a helper process of a launched stage: train, leave
        import importlib

        plan = launch.receive_plan()
        if plan is not None:
            from alignflow.tasks import tracking

            tracking.configure(wd, cfg.experiment)  # the start model may be a registered one
            importlib.import_module(entry.module).train_shard(cfg, plan)
        launch.finish()
        raise typer.Exit(0)
    try:
        with imports_without_gc():
            flow = entry.load_flow()
            wait_for_prefect_server()
        with flow_run_settings():
            out = flow(workdir=str(wd), config=cfg, resume=resume)
    except BaseException as exc:
        # Stopped before training: the others get an empty plan and leave with us. Stopped in or after it:
        # no goodbye (a peer may be inside a collective); the launcher ends the others when this process exits.
        before_training = launch.is_distributed() and not launch.plan_shared()
        if before_training:
            launch.share_plan(None)
            launch.finish()
        if isinstance(exc, (*_user_errors(), NonFiniteLossError, LookupError)):
            if launch.report_user_error(2) and before_training:
                try:
                    _fail(exc)
                except typer.Exit:
                    raise typer.Exit(0) from None  # the launching command exits 2 (launch.launched_status)
            _fail(exc)
        raise
    launch.share_plan_once(None)
    launch.finish()
    return out


def _launch(stage: stages.Stage, argv: list[str], processes: int, launcher: str | None,
            accelerate_config: Path | None) -> None:
    """Run the stage's command under the launcher, on ``processes`` processes; exit with its status."""
    import subprocess

    from alignflow.tasks import launch

    try:
        cmd = launch.launch_command(stage.module, argv, processes=processes,
                                    launcher=launcher or ("accelerate" if accelerate_config else "torchrun"),
                                    accelerate_config=accelerate_config)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo("launching: " + " ".join(cmd), err=True)
    import os
    import tempfile

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets anyway, without its banner
    if not debug():  # the processes' consoles as quiet as this one's: warnings and the error line
        env.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        env.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory(prefix="alignflow-launch-") as tmp:
        status = Path(tmp) / "status"
        rc = subprocess.call(cmd, env={**env, launch.STATUS_ENV: str(status)})
        raise typer.Exit(launch.launched_status(status, rc))


def stage_command(stage: stages.Stage) -> Callable[..., None]:
    """``alignflow <stage>``: the same options for every stage of the registry (and the launch options for
    the stages that train on several processes)."""
    if stage.distributed:
        def command(workdir: WorkdirOpt = DEFAULT_WORKDIR, config: ConfigOpt = None, set_: SetOpt = None,
                    resume: ResumeOpt = False, processes: ProcessesOpt = 1, launch: LaunchOpt = None,
                    accelerate_config: AccelerateConfigOpt = None) -> None:
            from alignflow.tasks import launch as launching

            if (processes > 1 or launch or accelerate_config) and not launching.is_distributed():
                _load(config, set_)  # a config error is one line here, not one per process
                argv = ["--workdir", str(workdir), *(["--config", str(config)] if config else []),
                        *[a for s in set_ or [] for a in ("--set", s)], *(["--resume"] if resume else [])]
                _launch(stage, argv, processes, launch, accelerate_config)
            out = _run_stage(stage.name, workdir, config, set_, resume)
            _print_stage(out)
    else:
        def command(workdir: WorkdirOpt = DEFAULT_WORKDIR, config: ConfigOpt = None, set_: SetOpt = None,
                    resume: ResumeOpt = False) -> None:
            _print_stage(_run_stage(stage.name, workdir, config, set_, resume))

    command.__name__ = stage.name.replace("-", "_")
    command.__doc__ = stage.help
    return command


def _print_stage(out: dict) -> None:
    typer.echo("")
    for key, value in out.items():
        if isinstance(value, list):  # a table (pmp-transfer's results): one line per row
            typer.echo(f"{key}:")
            for row in value:
                typer.echo("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in row.items()))
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        typer.echo(f"{key:<28}{value}")


def promote(
    model: Annotated[str, typer.Argument(help="Registered model: " + ", ".join(stages.models()) + ".")],
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    override: Annotated[bool, typer.Option("--override", help="Move champion even if the gate fails (recorded).")] = False,
    rollback: Annotated[bool, typer.Option("--rollback", help="Restore the previous champion instead.")] = False,
) -> None:
    """Gate the challenger against the champion on held-out data; move `champion` only when it passes."""
    if override and rollback:
        _fail(ValueError("--override and --rollback do not go together"))
    wd = prepare(workdir)
    cfg = _load(config, set_)
    from .promote import promote as promote_flow

    try:
        with flow_run_settings():
            out = promote_flow(workdir=str(wd), config=cfg, model_name=model, override=override, rollback=rollback)
    except (*_user_errors(), LookupError, ValueError) as exc:
        _fail(exc)
    _print_stage({k: v for k, v in out.items() if not isinstance(v, dict)})
    for who in ("challenger", "champion"):
        figs = out.get(f"{who}_figures") or {}
        if figs:
            typer.echo(f"{who + ' figures':<22}" + ", ".join(f"{k}={v:.4g}" for k, v in figs.items()))


def pipeline(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Every stage in order as one parent MLflow run (cached stages skipped); a summary table at the end."""
    with imports_without_gc():  # up to the flow: checks, the server started, imports
        wd = prepare(workdir, server=True)
        cfg = _load(config, set_)
        if cfg.pipeline.sources:  # (none: the flow generates its dump)
            _check_ingest_input(cfg, cfg.pipeline.sources, cfg.ingest.format)
        from .pipeline import PipelineError, pipeline as pipeline_flow

        wait_for_prefect_server()
    try:
        with flow_run_settings():
            out = pipeline_flow(workdir=str(wd), config=cfg, resume=resume)
    except (PipelineError, *_user_errors(), LookupError) as exc:
        _fail(exc)
    typer.echo("\n" + out["table"] + "\n\n" + out["ui"])


def serve(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    ingest_cron: Annotated[str, typer.Option("--ingest-cron", help="Cron of the ingest deployment ('none': no schedule).")] = "0 * * * *",
    pipeline_cron: Annotated[str, typer.Option("--pipeline-cron", help="Cron of the pipeline deployment ('none': no schedule).")] = "0 3 * * *",
    ingest_every: Annotated[Optional[float], typer.Option("--ingest-every", help="Seconds between ingests (instead of the cron).")] = None,
    pipeline_every: Annotated[Optional[float], typer.Option("--pipeline-every", help="Seconds between pipelines (instead of the cron).")] = None,
    train_after_ingest: Annotated[Optional[str], typer.Option("--train-after-ingest", help="auto|trigger|run-deployment|off (default: $ALIGNFLOW_TRAIN_AFTER_INGEST or auto).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Most flow runs at once.")] = None,
) -> None:
    """Register and serve the deployments: ingest and pipeline on schedules, training after each ingest."""
    import os

    # A service's console is its log: what each served flow run reports (schedules, triggers, the training it
    # started) stays visible, unlike one-shot commands, which show warnings and the error line only.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO")
    wd = prepare(workdir)
    if not os.environ.get("PREFECT_API_URL"):
        _fail(RuntimeError("serve needs a Prefect server: start one (infra/local-up.sh or `prefect server start`) "
                           "and set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api"))
    from .serve import MODE_ENV, build_deployments, serve_all

    mode = train_after_ingest or os.environ.get(MODE_ENV, "auto")
    sets = set_ or []
    _load(config, sets)
    try:
        deployments = build_deployments(
            str(wd), str(config) if config else None, sets,
            ingest_cron=None if ingest_cron.lower() == "none" else ingest_cron,
            pipeline_cron=None if pipeline_cron.lower() == "none" else pipeline_cron,
            ingest_every=ingest_every, pipeline_every=pipeline_every, train_after_ingest=mode)
    except ValueError as exc:
        _fail(exc)
    for d in deployments:
        typer.echo(f"deployment {d.flow_name}/{d.name}: {d.description}")
    serve_all(deployments, limit=limit)


def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the validated config (defaults, file and overrides merged) as JSON."""
    cfg = _load(config, set_)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


class _Cli(typer.Typer):
    """The Typer app; a user error that escapes a command still ends as one line and exit code 2."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if not is_user_error(exc):
                raise
            try:
                _fail(exc)
            except typer.Exit as done:
                sys.exit(done.exit_code)


def _global_options(
    debug_: Annotated[bool, typer.Option("--debug", help="Show every log line, and tracebacks of errors.")] = False,
) -> None:
    """Community votes to aligned language models."""
    if debug_:
        import os

        from .environment import DEBUG_ENV

        os.environ[DEBUG_ENV] = "1"


def build_app() -> typer.Typer:
    """The command line: the fixed commands and one command per registered stage (``alignflow.stages``)."""
    cli = _Cli(add_completion=False, no_args_is_help=True, help="Community votes to aligned language models.",
               pretty_exceptions_enable=False)
    cli.callback()(_global_options)
    cli.command()(ingest)
    cli.command("generate-dump")(generate_dump)
    cli.command()(demo)
    for name in stages.order():
        stage = stages.get(name)
        if stage.command:
            cli.command(name)(stage_command(stage))
    cli.command()(promote)
    cli.command()(pipeline)
    cli.command()(serve)
    cli.command("show-config")(show_config)
    from .label_cli import label_app, label_batch  # human feedback (flows/label.py)

    cli.command("label-batch")(label_batch)
    cli.add_typer(label_app, name="label")
    return cli


app = build_app()


def run_module(stage: str) -> None:
    """``python -m alignflow.flows.<stage> [options]``: the stage's command (what a launcher starts)."""
    from alignflow.tasks import launch

    sys.argv = [f"alignflow {stage}", stage, *sys.argv[1:]]
    try:
        app(prog_name="alignflow")
    except SystemExit as exc:
        if launch.group_closed():  # a launched process done with its peers: see exit_without_finalization
            launch.exit_without_finalization(exc.code)
        raise


# typer's exit status for Ctrl-C (KeyboardInterrupt): 128 + SIGINT, as shells report it; and ours for SIGTERM
INTERRUPTED = 130
TERMINATED = 128 + 15


def _stop_as_interrupted(signum, frame) -> None:
    """Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` as Python's own handler does, and notes that it came
    (``STOP_SIGNALS``). SIGTERM (``kill``, ``timeout``, a service manager) stops the command the same way: its
    runs are marked failed, its helpers stopped, its temporary files removed (without a handler Python died at
    once and left that to the next command); a second SIGTERM during that cleanup ends the process at once."""
    import signal

    STOP_SIGNALS.append(signum)
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _INTERRUPTS["raised"] += 1
    raise KeyboardInterrupt


def _redeliver_swallowed_stop(unraisable) -> None:
    """``sys.unraisablehook`` of the command: a stop whose ``KeyboardInterrupt`` Python could not raise is
    delivered again.

    A signal's handler runs between two bytecodes of the main thread, wherever it is, and can be inside a callback
    that Python cannot raise from (a weakref's, as importlib's module locks have, or a ``__del__``). There Python
    prints "Exception ignored in: ..." and goes on: a Ctrl-C that came at that moment was lost, and the command ran
    to its end with exit 0. This hook delivers the stop again through the SIGINT handler, from a thread, once the
    callback has returned (a handler made to run at once would run inside this hook, where it is lost the same way),
    instead of printing it; any other unraisable error goes to the hook before."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and STOP_SIGNALS:
        import signal
        import threading

        _INTERRUPTS["lost"] += 1
        if debug():
            _UNRAISABLE_HOOK[0](unraisable)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not _stop_as_interrupted:  # a background job ignores SIGINT
            signal.signal(signal.SIGINT, _stop_as_interrupted)  # (handlers are set on the main thread only)
        timer = threading.Timer(_REDELIVER_AFTER_S, _redeliver)
        timer.daemon = True
        timer.start()
        return
    _UNRAISABLE_HOOK[0](unraisable)


def _redeliver() -> None:
    import _thread
    import signal

    if _INTERRUPTS["raised"] > _INTERRUPTS["lost"]:  # a later stop got through meanwhile: it is the one
        return
    _thread.interrupt_main(signal.SIGINT)


_UNRAISABLE_HOOK = [sys.unraisablehook]  # the hook before the command's
_INTERRUPTS = {"raised": 0, "lost": 0}  # KeyboardInterrupts the stop handler raised, and those Python ignored
_REDELIVER_AFTER_S = 0.01


def main() -> None:  # pragma: no cover
    """The ``alignflow`` command. A command that ends (sys.exit, as typer does) leaves without the
    interpreter's finalization (:func:`~alignflow.tasks.launch.exit_without_finalization`: 1.7-2 s)."""
    import signal

    from alignflow.tasks import launch

    signal.signal(signal.SIGTERM, _stop_as_interrupted)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (a background job)
        signal.signal(signal.SIGINT, _stop_as_interrupted)
    _UNRAISABLE_HOOK[0] = sys.unraisablehook
    sys.unraisablehook = _redeliver_swallowed_stop
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        # Stopped, the command may end with another error than the interrupt: a library that calls back into
        # Python can wrap the KeyboardInterrupt raised there in an error of its own (pydantic's serializer, as
        # Prefect's Dask runner serializes a task's context: PydanticSerializationError). Its runs, helpers and
        # temporary files were handled on the way out as for any error; what the user asked for is the stop.
        if not STOP_SIGNALS:
            raise
        if debug():
            import traceback

            traceback.print_exc()
        code = INTERRUPTED
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # one that comes while the command exits ends it at once
    if code == INTERRUPTED:
        terminated = signal.SIGTERM in STOP_SIGNALS
        typer.echo("terminated" if terminated else "interrupted", err=True)
        code = TERMINATED if terminated else INTERRUPTED
    launch.exit_without_finalization(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
