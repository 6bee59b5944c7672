"""Running the dispatcher: ``pilot serve`` and :class:`EmbeddedServer` for tests and the demo.

waitress serves the WSGI application (PanDA's own server is WSGI too). The
event loop runs in one thread we own, one poll at a time, so that
:meth:`EmbeddedServer.stop` can end it from any thread without racing
waitress's internals: it sets a flag and pulls waitress's trigger, and the
loop thread closes every socket itself.

The pilot's calls need the bearer token, on loopback too: on a shared login
node any user can reach 127.0.0.1, and an open dispatcher would hand jobs to
anyone. The token is written to a file only its owner can read
(``<db>.token`` unless told otherwise), which ``pilot run``, ``pilot hpc``
and ``pilot demo`` read with ``--token-file`` or through PanDA's token
variables (``$OIDC_AUTH_TOKEN``, ``$OIDC_AUTH_DIR``).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from waitress.server import create_server

from pilot.server import loading
from pilot.server.app import DispatcherApp
from pilot.server.db import Store
from pilot.server.v1 import QUIRKS

log = logging.getLogger(__name__)

DEFAULT_PORT = 25080
TOKEN_ENV = "PILOT_SERVER_TOKEN"


class EmbeddedServer:
    """A dispatcher on ``host:port`` (0: an ephemeral port) in a background thread.

    ``url`` is ``http://host:port`` once :meth:`start` returns; ``store``
    gives tests direct access to jobs, ranges and final records.
    """

    def __init__(
        self,
        db_path: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        threads: int = 8,
        require_pilot_token: bool = True,
        token_file: str | Path | None = None,
        quirks: frozenset[str] | set[str] = frozenset(),
        legacy_only: bool = False,
    ) -> None:
        self.db_path = str(db_path)
        self.host = host
        self.port = port
        self.token = token or secrets.token_urlsafe(24)
        self.threads = threads
        self.require_pilot_token = require_pilot_token
        self.token_file = Path(token_file or f"{self.db_path}.token")
        self.quirks = frozenset(quirks)
        self.legacy_only = legacy_only
        self.store: Store | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("server not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> EmbeddedServer:
        """Open the database, bind, and serve in a thread; returns once listening."""
        self.store = Store(self.db_path)
        app = DispatcherApp(
            self.store,
            token=self.token,
            require_pilot_token=self.require_pilot_token,
            quirks=self.quirks,
            legacy_only=self.legacy_only,
        )
        try:
            self._server = create_server(
                app,
                host=self.host,
                port=self.port,
                threads=self.threads,
                max_request_body_size=app.max_body + 1024,
                clear_untrusted_proxy_headers=True,
                ident="pilot-dispatcher",
            )
        except OSError:
            self.store.close()
            self.store = None
            raise
        self.port = int(self._server.effective_port)
        # no newline: the PanDA pilot puts the file as it is into its Authorization header
        _write_private(str(self.token_file), self.token)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()
        log.info("dispatcher listening on %s (db %s)", self.url, self.db_path)
        return self

    def _loop(self) -> None:
        server = self._server
        while not self._stopping.is_set():
            server.asyncore.loop(timeout=1.0, map=server._map, count=1)
        server.task_dispatcher.shutdown()
        server.asyncore.close_all(server._map)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and close the database; safe to call twice."""
        if self._thread is not None:
            self._stopping.set()
            self._server.pull_trigger()
            self._thread.join(timeout)
            self._thread = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def wait(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (by a signal handler) or the loop ends, then stop."""
        thread = self._thread
        while thread is not None and thread.is_alive() and not stop.wait(1.0):
            pass
        self.stop()

    def load_jobs(self, jobs: list[dict[str, Any]] | dict[str, Any]) -> list[int]:
        assert self.store is not None, "server not started"
        return loading.load_jobs(self.store, jobs if isinstance(jobs, list) else [jobs])

    def load_task(self, task: dict[str, Any]) -> dict[str, Any]:
        assert self.store is not None, "server not started"
        return loading.load_task(self.store, task)

    def final_records(self, panda_id: int | None = None) -> list[dict[str, Any]]:
        assert self.store is not None, "server not started"
        return self.store.final_records(panda_id)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_main(argv: list[str] | None = None) -> int:
    """``pilot serve [--db FILE] [--host 127.0.0.1] [--port P] [--token T]``."""
    parser = argparse.ArgumentParser(
        prog="pilot serve", description="Embedded PanDA-compatible dispatcher (HTTP + SQLite)."
    )
    parser.add_argument("--db", default="pilot-server.db", help="SQLite file (created if absent)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port)")
    parser.add_argument(
        "--token",
        default=None,
        help=f"admin/bearer token (default ${TOKEN_ENV}, else a random one written to --token-file)",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help="write the token here (mode 0600; default DB.token) for pilot run/hpc/submit",
    )
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--quirk",
        action="append",
        default=[],
        choices=sorted(QUIRKS),
        help="answer as panda-server 1.0.4 does where it is wrong (update_event_ranges_500:"
        " HTTP 500 after the ranges were written); repeatable",
    )
    parser.add_argument(
        "--legacy-only",
        action="store_true",
        help="serve only /server/panda/<method>, /api/v1 answers 403 as an older server does",
    )
    parser.add_argument("--url-file", default=None, help="write the server URL here once listening")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server = EmbeddedServer(
        args.db,
        args.host,
        args.port,
        token,
        token_file=args.token_file,
        threads=args.threads,
        quirks=frozenset(args.quirk),
        legacy_only=args.legacy_only,
    )
    try:
        server.start()
    except OSError as exc:
        print(f"pilot serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    if args.url_file:
        _write_private(args.url_file, server.url + "\n")
    print(f"pilot serve: listening on {server.url} (db {args.db})", flush=True)
    print(f"pilot serve: bearer token (pilot calls and admin) in {server.token_file}", flush=True)

    server.wait(stop)
    print("pilot serve: stopped", flush=True)
    return 0


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


main = serve_main
