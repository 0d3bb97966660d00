"""Process environment for the embedded default, set before Prefect or MLflow is imported.

Everything a run writes stays in the work directory: Prefect's home (its
SQLite database when no server is configured) and its result storage. A user
who points ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` at servers keeps them.

The console shows warnings and errors only, and an expected user error (bad
input, a bad config, a missing dataset) as the one ``error:`` line the CLI
prints: Prefect's console handler drops the records that carry it, while the
run's logs on the Prefect server keep the full traceback. ``--debug`` (or
``ALIGNFLOW_DEBUG=1``) shows everything, tracebacks included.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEBUG_ENV = "ALIGNFLOW_DEBUG"
# The signals (SIGINT, SIGTERM) that have stopped this command, in order (flows/cli.py notes them): errors that
# come after one are the stop's, not the command's, and are not shown (``--debug`` shows them).
STOP_SIGNALS: list[int] = []
# Errors of the machine rather than of alignflow: a full disk, a read-only file system.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class WorkdirError(Exception):
    """The work directory cannot be used (a file, not writable, not creatable)."""


class TemporaryServerError(WorkdirError):
    """Prefect's temporary server, on the work directory's database, did not start: one line, exit 2."""


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def check_workdir(workdir: Path) -> Path:
    """Create ``workdir`` if needed and prove it is a writable folder, or say in one line why it is not."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file, not a folder")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".alignflow-write-check-", dir=workdir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WorkdirError(f"--workdir {workdir} is not a writable folder: {exc.strerror or exc}") from None
    return workdir


def is_environment_error(exc: BaseException) -> bool:
    """A full disk or read-only file system, however the library that met it reports it."""
    import sqlite3

    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
        return True
    if isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_environment_error(cause)


def prepare(workdir: str | Path, *, server: bool = False) -> Path:
    """Check the work directory and set the process environment for it (Prefect's home, MLflow, offline
    hubs). ``server``: the command runs flows, so Prefect's temporary server is started here
    (:func:`start_prefect_server`), as soon as its database is seeded: it boots while the command sets up
    Prefect's logging and imports its flow."""
    workdir = check_workdir(Path(workdir).expanduser().resolve())
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server can take longer than the default 20 s to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(workdir / "prefect" / "storage"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow 3 reports usage to its telemetry service unless told not to: nothing leaves this machine
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if not debug():
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if not os.environ.get("PREFECT_API_URL"):
        _watch_temporary_server()
        _seed_prefect_database()
        if server:
            start_prefect_server()
    quiet_expected_errors()
    return workdir


def _seed_prefect_database() -> None:
    """A new Prefect home gets the migrated empty database (tasks/store_templates.py) instead of migrating its own."""
    from alignflow.tasks.store_templates import prefect_database_file, seed

    path = prefect_database_file()
    if path is not None:
        seed("prefect", path)


_REAPER = []
TEMPORARY_API_ENV = "ALIGNFLOW_TEMPORARY_PREFECT_API"  # the API URL of a temporary server this command started
_SERVER: list = []  # the temporary server (:class:`_TemporaryServer`) started by :func:`start_prefect_server`


# Settings of the temporary server (a user's own environment wins). On start, Prefect's server registers
# every block type it knows (the library's and its collections') in its database unless it remembers having
# done so for that database, which a new work directory never is: about 3 s of the ~8 s the server took to
# answer on this 2-core machine, while the command waited. The types are the catalogue of the UI, which the
# temporary server does not serve; saving a block registers its own type and schema (``Block.save``), so
# skipping the registration leaves every use of blocks as it was (tests/test_command_startup.py).
# Nor does the temporary server run the automations' services (triggers, and the actions they start): an
# automation is made through a server's API and lives in its database, and nothing makes one on a server that
# lives as long as one command. Their start built a second copy of Prefect's app for the actions' events
# client: without them the server answered in 4.2-4.5 s instead of 5.7-5.9 s and took ~1.2 CPU-s less to boot
# (2-core machine at half its usual speed, 2026-12-05). A server the user runs keeps its automations.
SERVER_SETTINGS = {
    "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
    "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",  # nothing to remember (and no registry to hash)
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
}


def start_prefect_server() -> None:
    """Start Prefect's temporary server now, so it boots while the command imports its flow.

    Without a configured server, Prefect starts a temporary one (``uvicorn ... create_app``) at the
    first API call, after the command has imported Prefect, MLflow and the flow (~6 s), and then waits
    for it (~4-5 s). Started here, right after :func:`prepare`, the two overlap. It is the same server,
    run the way Prefect runs it (its app built by :mod:`.prefect_server`), on a loopback socket bound here
    (no port race) and handed to it; child processes get its URL and use it instead of starting servers of
    their own. It stops when this process exits (``atexit``; the reaper or, on Linux, the parent-death
    signal if killed). A server that dies after it has answered is started again on the same socket
    (:class:`_TemporaryServer`).
    Does nothing when a server or a database other than the work directory's SQLite file is configured.
    """
    if _SERVER or os.environ.get("PREFECT_API_URL"):
        return
    import atexit

    from alignflow.tasks.store_templates import prefect_database_file

    database = prefect_database_file()
    if database is None:  # a server or a database the user configured (profile, toml)
        return
    server = _TemporaryServer(database)
    _SERVER.append(server)
    atexit.register(_stop_prefect_server)
    os.environ["PREFECT_API_URL"] = server.url
    os.environ[TEMPORARY_API_ENV] = server.url
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()  # Prefect read its settings at import: it now sees the URL


class _TemporaryServer:
    """Prefect's temporary server on a loopback socket that this process binds and keeps.

    The socket stays open here for as long as the command runs, so a request made while no server process
    is up waits in its backlog instead of being refused. Once the server has answered
    (:func:`wait_for_prefect_server`), a thread watches it: if it dies before the command stops it (killed,
    out of memory), a new one is started on the same socket, with the same database, up to
    :data:`SERVER_RESTARTS` times, and the command goes on (Prefect's client sends again what the dead one
    left unanswered). Before, the command's next API call failed after minutes of retries with a traceback
    of ``httpx.ConnectError``. A server that dies before it answered is not restarted: that is an error of its
    start (``wait_for_prefect_server`` reports it).
    """

    def __init__(self, database: Path) -> None:
        import importlib.util
        import socket
        import threading

        from .prefect_server import APP as SERVER_APP

        self.database = database
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Replies go out at once (no Nagle). uvicorn makes the socket of ``--fd`` as an AF_UNIX one, so asyncio
        # does not set TCP_NODELAY on the connections it accepts, as it does on a TCP server it binds itself; a
        # reply written in two parts (headers, then body) then waited for the client's delayed ACK: every request
        # to the temporary server took 40 ms or more, 1-4 ms with it (idle server, 2-core machine, 2026-12-05;
        # bench/serve/server_requests.py); a tiny four-stage pipeline 15.3-16.1 -> 13.3-13.6 s. Linux hands the
        # option on to the accepted connections.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)  # requests made while no server is up wait in the backlog
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/api"
        app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
        self.env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                    "PREFECT__SERVER_FINAL": "1"}  # as Prefect's own temporary server
        for name, value in SERVER_SETTINGS.items():
            self.env.setdefault(name, value)
        self.cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory", SERVER_APP,
                    "--fd", str(self.sock.fileno()), "--log-level", "error", "--lifespan", "on"]
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # a restart and stop() never interleave
        self.restarts = 0
        self.proc = self._spawn()
        self._watcher: threading.Thread | None = None

    @property
    def log(self) -> Path:
        """Where the server's own messages go (appended; ``--debug``: the console): beside its database."""
        return self.database.parent / "server.log"

    def _spawn(self):
        import subprocess
        import time

        from alignflow.tasks.processes import OWN_PROCESS_GROUP

        if debug():
            out = None
        else:  # a server's traceback (a corrupt database, a crash) is for its log, not above the command's line
            try:
                out = open(self.log, "ab")
                out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} Prefect's temporary server of process "
                          f"{os.getpid()} at {self.url}\n".encode())
                out.flush()
            except OSError:
                out = None
        try:
            return subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    pass_fds=(self.sock.fileno(),), preexec_fn=_die_with_parent,
                                    **OWN_PROCESS_GROUP)
        finally:
            if out is not None:
                out.close()

    def messages(self) -> str:
        """Where to read what the server said: its log, or the console above under ``--debug``."""
        return "its messages are above" if debug() or not self.log.is_file() else f"its messages: {self.log}"

    def answered(self) -> None:
        """The server is up: from now on one that dies is started again."""
        import threading

        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="alignflow-prefect-server-watch",
                                             daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self.stopping.wait(SERVER_WATCH_SECONDS):
            with self.lock:
                code = self.proc.poll()
                if code is None or self.stopping.is_set():
                    continue
                if self.restarts >= SERVER_RESTARTS:
                    logging.getLogger("alignflow").error(
                        "Prefect's temporary server exited (code %s; %s) and was restarted %d times already: "
                        "not again", code, self.messages(), self.restarts)
                    return
                self.restarts += 1
                logging.getLogger("alignflow").warning(
                    "Prefect's temporary server exited (code %s; %s); starting it again at %s", code,
                    self.messages(), self.url)
                self.proc = self._spawn()

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


# how often the temporary server's watcher looks at it, and how many times it starts a dead one again
SERVER_WATCH_SECONDS = 0.25
SERVER_RESTARTS = 3


def wait_for_prefect_server() -> None:
    """Block until the server of :func:`start_prefect_server` answers (no-op if none was started)."""
    if not _SERVER:
        return
    import time
    import urllib.request

    server = _SERVER[0]
    url = server.url
    # the server takes seconds to boot: meanwhile load the MLflow store every flow logs to next (its SQL store
    # imports SQLAlchemy and its models, ~1 s, which would otherwise come after the wait, inside the flow)
    from alignflow.tasks.tracking import user_tracking_uri

    uri = user_tracking_uri()  # None: the work directory's SQLite file
    if uri is None or uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
    deadline = time.monotonic() + timeout
    while True:
        proc = server.proc
        if proc.poll() is not None:
            raise TemporaryServerError(
                f"Prefect's temporary server exited with code {proc.returncode} before it answered, on the "
                f"database {server.database} ({server.messages()})")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TemporaryServerError(
                f"Prefect's temporary server did not answer at {url} within {timeout:.0f} s "
                "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=min(left, 10)) as resp:
                if resp.status == 200:
                    server.answered()
                    return
        except OSError:
            time.sleep(0.1)


def on_temporary_server() -> bool:
    """Whether this command's flows report to a temporary server: the one :func:`start_prefect_server` started
    (here or in the command that started this process), or the one Prefect starts when no server is configured."""
    api = os.environ.get("PREFECT_API_URL")
    return not api or api == os.environ.get(TEMPORARY_API_ENV)


@contextmanager
def flow_run_settings() -> Iterator[None]:
    """Prefect settings for the flow run the command makes (``with flow_run_settings(): flow(...)``).

    On a temporary server the run sends no heartbeats. A heartbeat lets a server that outlives the run mark
    it crashed when they stop; a temporary server stops with the command, so nothing could ever read one.
    Sending them is not free either: at the end of every flow run, Prefect's engine joins its heartbeat
    thread, which sleeps in 1 s steps (0.5 s of wall on average, up to 1 s, for each command). Prefect's
    setting cannot be unset from the environment (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` must be >= 30), so
    it is unset here, for this run only. On a server the user runs, heartbeats stay as configured.
    """
    if not on_temporary_server():
        yield
        return
    from prefect.settings import temporary_settings

    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield


def _stop_prefect_server() -> None:
    while _SERVER:
        _SERVER.pop().stop()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM when this process dies, even by SIGKILL."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _watch_temporary_server() -> None:
    """Once per process: a reaper stops Prefect's temporary server if this process is killed."""
    if not _REAPER:
        from .reaper import watch

        _REAPER.append(watch())


class _ExpectedErrorFilter(logging.Filter):
    """Drops console records of an expected user error (the CLI prints it as one line), and every error record
    once the command has been stopped by a signal (it prints ``interrupted`` or ``terminated``): Prefect's
    "Crash detected! Execution was aborted by an interrupt signal." and "Finished in state Crashed(...)" lines
    say the same thing three times over. Prefect's server still records the crash, and ``--debug`` shows them.

    A record carrying a user error is dropped, and so are later records that
    quote its message (Prefect's "Finished in state Failed(...)" lines).
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if debug() or record.levelno < logging.WARNING:
            return True
        if STOP_SIGNALS and record.levelno >= logging.ERROR:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            from .cli import is_user_error

            if not is_user_error(exc):
                return True
            self.seen = [*self.seen[-7:], str(exc)[:200]]
            return False
        message = record.getMessage()
        return not any(text and text in message for text in self.seen)


def quiet_expected_errors() -> None:
    """Attach the filter to the console handlers Prefect configures, and let it know of a SIGTERM that Prefect's
    flow engine catches (:func:`_note_prefect_sigterm`)."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    _note_prefect_sigterm()
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if not any(isinstance(f, _ExpectedErrorFilter) for f in handler.filters):
                handler.addFilter(_ExpectedErrorFilter())


def _note_prefect_sigterm() -> None:
    """Note a SIGTERM in ``STOP_SIGNALS`` when it comes, also during a flow run: Prefect's engine swaps in its own
    handler then, which raises ``TerminationSignal``, marks the runs crashed (three ERROR records on the
    console) and only then sends the signal again to the handler before it (the command's). Prefect installs
    and recognises its handler through its module's global, which is wrapped here once."""
    from prefect.utilities import engine

    handler = getattr(engine, "_prefect_sigterm_handler", None)
    if handler is None or getattr(handler, "alignflow_noted", False):
        return  # a Prefect without the handler: its records stay on the console, the command still says terminated

    def _prefect_sigterm_handler(signum: int, *args: object):
        STOP_SIGNALS.append(signum)
        return handler(signum, *args)

    _prefect_sigterm_handler.alignflow_noted = True
    engine._prefect_sigterm_handler = _prefect_sigterm_handler
