"""Empty, migrated Prefect and MLflow databases, copied into each new work directory.

A new work directory starts with no Prefect or MLflow database. Prefect's temporary server runs its
database migrations before it answers (~6-9 s on a 2-core machine) and MLflow runs its own on first
access (~2 s): a quarter of a small ingest's wall time went to building the same empty schemas again.
For one library version the migrated, empty database is always the same, so it is built once into a
cache folder (one file per library and version) and copied into every new work directory. Prefect
and MLflow open the copy, find it at the latest revision and go on; the default experiment and
everything else a run writes are created by the libraries as before.

The cache is ``$ALIGNFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/alignflow``, else ``~/.cache/alignflow``.
``make install`` fills it; a missing template is built on first need (in a child process, under a
file lock). Whenever a template cannot be built or copied, the store migrates itself as it would
without alignflow: a template only saves time.

    python -m alignflow.tasks.store_templates     # build the templates of the installed versions
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from alignflow.tasks.processes import file_lock

log = logging.getLogger(__name__)

CACHE_ENV = "ALIGNFLOW_CACHE_DIR"
KINDS = ("prefect", "mlflow")
BUILD_TIMEOUT_S = 300


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "alignflow")
    return Path(root) / "store-templates"


def template_path(kind: str, folder: Path | None = None) -> Path:
    """The template of ``kind`` for the installed version of its library."""
    if kind not in KINDS:
        raise ValueError(f"unknown store kind {kind!r}, expected one of {KINDS}")
    try:
        ver = version(kind)
    except PackageNotFoundError:
        ver = "unknown"
    return (folder or cache_dir()) / f"{kind}-{ver}.sqlite"


def is_usable(path: Path) -> bool:
    """A complete SQLite database that went through its library's migrations."""
    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            ok = db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
            return ok and db.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
    except sqlite3.Error:
        return False


def seed(kind: str, dest: Path) -> bool:
    """Copy the template of ``kind`` to ``dest`` if ``dest`` does not exist yet; True if it was copied.

    Never replaces a database: when another process creates ``dest`` first, its file stays.
    """
    dest = Path(dest)
    if dest.exists():
        return False
    try:
        template = ensure_template(kind)
        if template is None:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(template, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.link(tmp, dest)  # fails if dest appeared meanwhile: the other process's database stays
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    except OSError as exc:
        log.debug("no %s template copied to %s: %s", kind, dest, exc)
        return False


def ensure_template(kind: str) -> Path | None:
    """The template of ``kind``, built first if missing; None if it cannot be built here."""
    path = template_path(kind)
    if is_usable(path):
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.parent / ".lock"):
            if not is_usable(path):  # another process may have built it while we waited
                _build_in_child(path.parent)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("store templates not built in %s: %s", path.parent, exc)
        return None
    return path if is_usable(path) else None




def _build_in_child(folder: Path) -> None:
    """Run :func:`build` in a fresh interpreter: the migrations import Prefect's server and MLflow's store,
    which the calling process need not hold, and they must not see the caller's database settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true")
    subprocess.run([sys.executable, "-m", "alignflow.tasks.store_templates", str(folder)], env=env,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=BUILD_TIMEOUT_S, check=True)


def build(folder: Path) -> dict[str, Path]:
    """Migrate an empty Prefect and an empty MLflow SQLite database into ``folder`` (missing ones only).

    Run in a process of its own (:func:`_build_in_child`, or ``python -m``): it points Prefect's settings
    at the template before Prefect is imported."""
    folder.mkdir(parents=True, exist_ok=True)
    built = {}
    with tempfile.TemporaryDirectory(prefix=".build-", dir=folder) as tmp:
        for kind in KINDS:
            final = template_path(kind, folder)
            if is_usable(final):
                continue
            db = Path(tmp) / f"{kind}.sqlite"
            _MIGRATE[kind](db)
            with contextlib.closing(sqlite3.connect(db)) as conn:  # one self-contained file, no WAL left over
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if not is_usable(db):
                raise RuntimeError(f"the migrated {kind} database in {db} is not usable")
            os.replace(db, final)
            built[kind] = final
    return built


def _migrate_prefect(db: Path) -> None:
    os.environ["PREFECT_HOME"] = str(db.parent)
    os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{db}"
    import asyncio

    from prefect.server.database import provide_database_interface

    asyncio.run(provide_database_interface().create_db())  # what the server runs on start: every migration


def _migrate_mlflow(db: Path) -> None:
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables  # what MLflow's store runs on an empty database

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()


_MIGRATE = {"prefect": _migrate_prefect, "mlflow": _migrate_mlflow}


# Environment variables alignflow sets itself, or that say nothing about where Prefect's API or database is.
_NEUTRAL_PREFECT_ENV = frozenset({
    "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
    "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_LOGGING_LEVEL", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
})


def default_database_file() -> Path | None:
    """Prefect's database file when nothing but ``PREFECT_HOME`` configures Prefect, found without importing
    Prefect; None when something else might (then only Prefect's settings can say).

    Importing Prefect's settings imports Prefect (~1.5 s on this 2-core machine), and the command's temporary
    server can only start once its database is known: with nothing configured, the file is Prefect's default,
    ``$PREFECT_HOME/prefect.db``. Anything that could say otherwise sends the question to Prefect: another
    ``PREFECT_*`` variable, a profiles file in the home, a ``.env`` or ``prefect.toml`` in the working folder,
    a ``[tool.prefect]`` table in its ``pyproject.toml``, or Prefect's settings already loaded in this process
    (which may hold temporary settings). tests/test_command_startup.py compares the answer with Prefect's.
    """
    home = os.environ.get("PREFECT_HOME")
    if not home or "prefect.settings" in sys.modules:
        return None
    if any(name.startswith("PREFECT_") and name not in _NEUTRAL_PREFECT_ENV for name in os.environ):
        return None
    home_path = Path(home).expanduser()
    if not home_path.is_absolute() or (home_path / "profiles.toml").exists():
        return None
    if Path(".env").exists() or Path("prefect.toml").exists():
        return None
    try:
        if "tool.prefect" in Path("pyproject.toml").read_text(encoding="utf-8", errors="replace"):
            return None
    except FileNotFoundError:
        pass
    except OSError:
        return None
    return home_path / "prefect.db"


def prefect_database_file() -> Path | None:
    """The SQLite file Prefect's temporary server will use, or None (a configured server or database)."""
    default = default_database_file()
    if default is not None:
        return default
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return None
    url = settings.server.database.connection_url
    url = url.get_secret_value() if url is not None else ""
    prefix = "sqlite+aiosqlite:///"
    if not url.startswith(prefix) or url[len(prefix):] in ("", ":memory:"):
        return None
    return Path(url[len(prefix):])


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else cache_dir()
    built = build(folder)
    for kind in KINDS:
        path = template_path(kind, folder)
        print(f"{kind:<8} {path}{'  (built)' if kind in built else ''}")
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a process
    sys.exit(main(sys.argv[1:]))
