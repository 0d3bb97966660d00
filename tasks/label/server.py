"""Running the labeling app: in the foreground (``alignflow label serve``) or in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from .app import create_app
from .store import LabelStore

__all__ = ["serve_forever", "background_server", "free_port"]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _server(store: LabelStore, host: str, port: int, log_level: str):  # noqa: ANN202
    import uvicorn

    config = uvicorn.Config(create_app(store), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_keep_alive=30, backlog=512)
    return uvicorn.Server(config)


def serve_forever(store: LabelStore, *, host: str = LOOPBACK, port: int = 8765, log_level: str = "info") -> None:
    _server(store, host, port, log_level).run()


@contextlib.contextmanager
def background_server(store: LabelStore, *, port: int | None = None, log_level: str = "warning") -> Iterator[str]:
    """The app on a loopback port in a daemon thread; yields its base URL and stops it on exit."""
    port = port or free_port()
    server = _server(store, LOOPBACK, port, log_level)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the labeling app did not start on {LOOPBACK}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
