"""`alignflow label-batch` and `alignflow label ...`: the human-feedback commands.

    alignflow label-batch [--policy NAME@ALIAS]... [--prompts N] [--k K] [--name B]   # a comparison batch
    alignflow label serve [--port 8765]                    # the labeling app (prints the admin link once)
    alignflow label invite NAME [--admin]                  # a personal link
    alignflow label simulate --batch B [--labelers 3]      # simulated labelers through the HTTP API
    alignflow label export --batch B [--out FILE]          # every submission as JSON
    alignflow label scores --batch B                       # leaderboard + labeler quality (MLflow run)
    alignflow label pairs --batch B                        # rankings -> pairs dataset (+ demos)
    alignflow label train --batch B                        # pairs -> pm, reward model vs labelers

The database is ``sqlite:///<workdir>/label.db`` unless ``--db`` or
``$ALIGNFLOW_LABEL_DB`` names another (``postgresql+psycopg2://...`` for server
mode). A user error prints one line and exits 2; ``alignflow --debug label ...`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli import DEFAULT_WORKDIR, ConfigOpt, SetOpt, WorkdirOpt, _fail, _load, _user_errors
from .environment import flow_run_settings, prepare

label_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Human feedback: the labeling app, simulated labelers, scores, pairs for `pm`.")

DbOpt = Annotated[Optional[str], typer.Option("--db", help="Database URL (default: sqlite:///<workdir>/label.db "
                                                            "or $ALIGNFLOW_LABEL_DB).")]
BatchOpt = Annotated[str, typer.Option("--batch", help="Batch id (see `alignflow label-batch`).")]
DEFAULT_PORT = 8765
ADMIN_NAME = "admin"


@contextlib.contextmanager
def _user_errors_as_one_line() -> Iterator[None]:
    """Expected errors: one line and exit 2 (``alignflow --debug ...``: the traceback first)."""
    from pydantic import ValidationError

    from alignflow.tasks.label.batch import BatchInputError
    from alignflow.tasks.label.rankings import RankingError
    from alignflow.tasks.label.store import StoreError

    try:
        yield
    except (*_user_errors(), StoreError, BatchInputError, RankingError, LookupError, ValueError,
            FileExistsError, ValidationError) as exc:
        if isinstance(exc, ValidationError):
            exc = ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
        _fail(exc)


def _store(workdir: Path, db: str | None):
    from alignflow.tasks.label.store import LabelStore, database_url

    return LabelStore(database_url(workdir, db))


def label_batch(
    policy: Annotated[Optional[list[str]], typer.Option("--policy", help="Registered policy, name@alias or "
                                                        "name/version (repeat; default: alignflow-policy@champion "
                                                        "and alignflow-policy-sft@champion).")] = None,
    prompts: Annotated[int, typer.Option("--prompts", help="Number of prompts.")] = 20,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts-file", help="JSONL of {\"prompt\": ...} "
                                                                                 "instead of the ingested prompts.")] = None,
    k: Annotated[int, typer.Option("--k", help="Responses per prompt (2-9).")] = 4,
    name: Annotated[Optional[str], typer.Option("--name", help="Batch id.")] = None,
    overlap: Annotated[int, typer.Option("--overlap", help="Labelers per item.")] = 3,
    gold: Annotated[int, typer.Option("--gold", help="Held-out pairs mixed in as gold items.")] = 0,
    instructions: Annotated[Optional[str], typer.Option("--instructions", help="Text for the labelers, or "
                                                        "@FILE to read it from a file.")] = None,
    demonstrations: Annotated[bool, typer.Option("--demonstrations", help="Ask for the response the labeler "
                                                 "would want (SFT data).")] = False,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 0.7,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest response in tokens.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the prompt draw and the sampling.")] = 0,
    split: Annotated[str, typer.Option("--split", help="Split of the prompts dataset.")] = "test",
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    db: DbOpt = None,
) -> None:
    """Sample a comparison batch from registered policies and load it into the labeling app (one MLflow run)."""
    wd = prepare(workdir)
    cfg = _load(config, set_)
    with _user_errors_as_one_line():
        from alignflow.tasks.label.batch import LabelBatchConfig

        text = instructions
        if text and text.startswith("@"):
            text = Path(text[1:]).read_text(encoding="utf-8")
        fields = dict(name=name, prompts=prompts, prompts_file=str(prompts_file) if prompts_file else None, k=k,
                      overlap=overlap, gold=gold, demonstrations=demonstrations, temperature=temperature,
                      max_new_tokens=max_new_tokens, seed=seed, split=split)
        if policy:
            fields["policies"] = policy
        if text:
            fields["instructions"] = text
        bc = LabelBatchConfig(**fields)
        _check_batch_inputs(wd, cfg, bc, db)
        from .label import label_batch as flow

        with flow_run_settings():
            out = flow(workdir=str(wd), config=cfg, batch=bc, db_url=db)
    typer.echo("")
    for key in ("batch", "items", "gold_items", "responses", "quarantined", "dropped_items", "dataset", "run_id"):
        typer.echo(f"{key:<16}{out[key]}")
    typer.echo(f"\nnext: alignflow label serve --workdir {workdir}   (then send labelers their "
               f"`alignflow label invite NAME` links)")


def _check_batch_inputs(workdir: Path, cfg, bc, db: str | None) -> None:  # noqa: ANN001
    """What would fail inside the flow, checked first so the user sees one line (policies, prompts, name)."""
    from alignflow.tasks import registry, tracking
    from alignflow.tasks.label.batch import parse_policy, read_prompt_file
    from alignflow.tasks.label.store import Conflict, NotFound

    if bc.prompts_file:
        read_prompt_file(Path(bc.prompts_file))
    tracking.configure(workdir, cfg.experiment)
    for spec in map(parse_policy, bc.policies):
        if spec.version is None and registry.resolve_version(spec.name, spec.alias) is None:
            raise LookupError(f"no registered model {spec.label}: train and register it first "
                              "(aliases: challenger after training, champion after `alignflow promote`)")
    if bc.name:
        store = _store(workdir, db)
        try:
            store.batch(bc.name)
        except NotFound:
            return
        finally:
            store.close()
        raise Conflict(f"batch {bc.name!r} exists already in {_safe_url(store.url)}: choose another --name")


def _check_batch(workdir: Path, db: str | None, batch: str) -> None:
    """The batch exists and has submissions (one line otherwise, before any flow starts)."""
    store = _store(workdir, db)
    try:
        if not store.counts(batch)["submissions"]:
            raise ValueError(f"batch {batch!r} has no submissions yet: label some items first")
    finally:
        store.close()


@label_app.command()
def serve(
    port: Annotated[int, typer.Option("--port", help="Port.")] = DEFAULT_PORT,
    host: Annotated[str, typer.Option("--host", help="Interface; keep 127.0.0.1 unless behind a TLS proxy.")]
    = "127.0.0.1",
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    db: DbOpt = None,
) -> None:
    """Serve the labeling app (SQLite in the work directory by default; PostgreSQL with --db)."""
    from alignflow.tasks.label.server import serve_forever

    wd = prepare(workdir)
    with _user_errors_as_one_line():
        store = _store(wd, db)
        base = f"http://{host}:{port}"
        if ADMIN_NAME not in store.labeler_names().values():
            token = store.invite(ADMIN_NAME, admin=True)
            typer.echo(f"admin link (shown once; keep it private): {base}/#token={token}")
        typer.echo(f"labeling app on {base}  (database {_safe_url(store.url)}); Ctrl-C stops it")
    serve_forever(store, host=host, port=port)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@label_app.command()
def invite(
    name: Annotated[str, typer.Argument(help="Labeler name (unique).")],
    admin: Annotated[bool, typer.Option("--admin", help="An admin token (manages batches, sees reports).")] = False,
    base_url: Annotated[str, typer.Option("--base-url", help="Where labelers reach the app.")]
    = f"http://127.0.0.1:{DEFAULT_PORT}",
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    db: DbOpt = None,
) -> None:
    """Create a labeler and print their personal link (only a hash of the token is stored)."""
    wd = prepare(workdir)
    with _user_errors_as_one_line():
        token = _store(wd, db).invite(name, admin=admin)
    typer.echo(f"{base_url.rstrip('/')}/#token={token}")


@label_app.command()
def simulate(
    batch: BatchOpt,
    labelers: Annotated[int, typer.Option("--labelers", help="Simulated labelers (threads).")] = 3,
    noise: Annotated[float, typer.Option("--noise", help="Gumbel noise scale on each response's utility.")] = 0.3,
    position_bias: Annotated[float, typer.Option("--position-bias", help="Extra utility per place nearer the "
                                                 "top as shown.")] = 0.0,
    length_bias: Annotated[float, typer.Option("--length-bias", help="Extra utility per 1000 characters.")] = 0.0,
    max_items: Annotated[Optional[int], typer.Option("--max-items", help="Items per labeler at most.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the simulated judgements.")] = 0,
    url: Annotated[Optional[str], typer.Option("--url", help="A running app (default: start one here on the "
                                               "work directory's database).")] = None,
    admin_token: Annotated[Optional[str], typer.Option("--admin-token", help="Admin token for --url "
                                                       "(or $ALIGNFLOW_LABEL_ADMIN_TOKEN).")] = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    db: DbOpt = None,
) -> None:
    """Labelers that rank by the generated dumps' planted rule (with noise and bias), through the HTTP API."""
    import secrets

    from alignflow.tasks.label.simulate import LabelerModel, run_labelers

    wd = prepare(workdir)
    model = LabelerModel(noise=noise, position_bias=position_bias, length_bias=length_bias)
    names = [f"sim-{i + 1}-{secrets.token_hex(3)}" for i in range(labelers)]
    with _user_errors_as_one_line():
        if url:
            token = admin_token or os.environ.get("ALIGNFLOW_LABEL_ADMIN_TOKEN")
            if not token:
                raise ValueError("--url needs --admin-token (or $ALIGNFLOW_LABEL_ADMIN_TOKEN) to invite labelers")
            tokens = _invite_over_http(url, token, names)
            stats = run_labelers(url, tokens, batch, model=model, max_items=max_items, seed=seed)
        else:
            from alignflow.tasks.label.server import background_server

            store = _store(wd, db)
            store.batch(batch)
            tokens = [store.invite(n) for n in names]
            with background_server(store) as base:
                stats = run_labelers(base, tokens, batch, model=model, max_items=max_items, seed=seed)
            store.close()
    s = stats.summary()
    typer.echo(f"{s['submissions']} submissions from {labelers} simulated labelers in {s['seconds']:.1f} s "
               f"(p95 {s['p95_latency_ms']:.0f} ms); refused {s['refused']}, transport errors {s['transport_errors']}")
    for line in stats.refused[:5]:
        typer.echo(f"  refused: {line}")


def _invite_over_http(url: str, admin_token: str, names: list[str]) -> list[str]:
    import httpx

    tokens = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30) as client:
        for name in names:
            r = client.post("/api/admin/labelers", json={"name": name})
            if r.status_code != 201:
                raise ValueError(f"{url}: inviting {name} failed with {r.status_code}: {r.text[:200]}")
            tokens.append(r.json()["token"])
    return tokens


@label_app.command()
def export(
    batch: BatchOpt,
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON file (default: stdout).")] = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    db: DbOpt = None,
) -> None:
    """Every submission of a batch (ranking, labeler, shown order, item, provenance) as JSON."""
    from alignflow.tasks.label.report import json_safe
    from alignflow.tasks.label.steps import dump_json

    wd = prepare(workdir)
    with _user_errors_as_one_line():
        rows = _store(wd, db).export(batch)
    if out:
        dump_json(rows, out)
        typer.echo(f"{len(rows)} submissions -> {out}")
    else:
        typer.echo(json.dumps(json_safe(rows), indent=1))


@label_app.command()
def scores(
    batch: BatchOpt,
    rounds: Annotated[int, typer.Option("--rounds", help="Bootstrap rounds.")] = 1000,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    db: DbOpt = None,
) -> None:
    """Policy leaderboard (Bradley-Terry, bootstrap 95% intervals) and labeler quality; one MLflow run."""
    wd = prepare(workdir)
    cfg = _load(config, set_)
    with _user_errors_as_one_line():
        _check_batch(wd, db, batch)
        from .label import label_scores

        with flow_run_settings():
            out = label_scores(workdir=str(wd), batch_id=batch, config=cfg, db_url=db, rounds=rounds)
    typer.echo(f"mlflow run {out['run_id']}")


@label_app.command()
def pairs(
    batch: BatchOpt,
    validation_fraction: Annotated[float, typer.Option("--validation-fraction", help="Prompts held out.")] = 0.2,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    db: DbOpt = None,
) -> None:
    """Rankings -> a contracted pairs dataset (weights 1/C(K,2), ties dropped) and demonstrations -> demos."""
    wd = prepare(workdir)
    cfg = _load(config, set_)
    with _user_errors_as_one_line():
        _check_batch(wd, db, batch)
        from .label import label_pairs

        with flow_run_settings():
            out = label_pairs(workdir=str(wd), batch_id=batch, config=cfg, db_url=db,
                              validation_fraction=validation_fraction)
    typer.echo(f"pairs  {out['rows']} rows  {out['pairs']}")
    if out["demos"]:
        typer.echo(f"demos  {out['demos']}")
    typer.echo(f"train the reward model on them: alignflow pm --set pm.pairs_file={out['pairs']} "
               f"--set pm.site={out['site']}   (or: alignflow label train --batch {batch})")


@label_app.command()
def train(
    batch: BatchOpt,
    validation_fraction: Annotated[float, typer.Option("--validation-fraction", help="Prompts held out.")] = 0.2,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    db: DbOpt = None,
) -> None:
    """Human pairs -> `pm`; the new reward model's agreement with the labelers is logged to its run."""
    wd = prepare(workdir)
    cfg = _load(config, set_)
    with _user_errors_as_one_line():
        from alignflow.tasks.train.loop import NonFiniteLossError

        _check_batch(wd, db, batch)
        from .label import label_train

        try:
            with flow_run_settings():
                out = label_train(workdir=str(wd), batch_id=batch, config=cfg, db_url=db,
                                  validation_fraction=validation_fraction)
        except NonFiniteLossError as exc:
            raise ValueError(str(exc)) from exc
    typer.echo("")
    for key, value in out.items():
        typer.echo(f"{key:<34}{value:.4g}" if isinstance(value, float) else f"{key:<34}{value}")
