"""A real Rucio server for the tests: PyPI's ``rucio`` package, SQLite, on 127.0.0.1.

The server package pins old ``requests``/``urllib3`` (``rucio==41.5.1`` wants
``urllib3<=1.26.19``), so it cannot share the pilot's environment: it is
installed once into its own venv under a cache directory
(``$PILOT_TEST_CACHE``, default ``~/.cache/panda-pilot-tests``), of the same
version as the ``rucio-clients`` the pilot uses. Later runs reuse that venv;
only the database, storage and traces are new per run.

The bring-up is the one Rucio documents for a development server: schema and
root account from ``rucio.db.sqla.util`` (``build_database``,
``create_base_vo``, ``create_root_account``), Rucio's Flask app under
gunicorn with one sync worker (SQLite cannot take concurrent writers), then
two posix RSEs, a scope and quotas through the client API. Gunicorn is given
a socket already bound to port 0, so parallel runs never race for a port.
Traces posted to ``/traces/`` are written as JSON lines to ``trace_file``.

Two configurations are written: ``server.cfg`` (with ``[database]``, which
puts the Rucio library in server mode) for the server, and ``client.cfg``
(client sections only, with a private token directory) for the pilot and the
tests, as a site's ``RUCIO_CONFIG`` would be.
"""

from __future__ import annotations

import configparser
import fcntl
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_VERSION = "41.5.1"
GUNICORN = "gunicorn==27.0.1"
RSES = ("LOCAL_DISK", "LOCAL_DISK2")
SCOPE = "tests"
USERNAME, PASSWORD = "ddmlab", "secret"


class Unavailable(Exception):
    """The server cannot be had here (no network for PyPI, no venv module...): tests skip."""


def client_version() -> str:
    """The rucio-clients version installed for the pilot; the server must match it."""
    try:
        return importlib.metadata.version("rucio-clients")
    except importlib.metadata.PackageNotFoundError:
        return DEFAULT_VERSION


def cache_dir() -> Path:
    return Path(os.environ.get("PILOT_TEST_CACHE") or Path.home() / ".cache" / "panda-pilot-tests")


def server_venv(version: str | None = None, timeout: float = 900.0) -> tuple[Path, float]:
    """The venv with the Rucio server (installed now if needed) and the seconds it took."""
    version = version or client_version()
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    venv = base / f"rucio-server-{version}"
    stamp = venv / ".complete"
    start = time.monotonic()
    with open(base / f"rucio-server-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time; others wait, then reuse
        if stamp.exists():
            return venv, time.monotonic() - start
        subprocess.run(["rm", "-rf", str(venv)], check=False)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
            ]
            + [f"rucio=={version}", f"rucio-clients=={version}", GUNICORN],
        ]
        for cmd in steps:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise Unavailable(
                    f"installing the Rucio server timed out ({timeout:.0f} s)"
                ) from None
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise Unavailable(f"cannot install the Rucio server {version}: {' | '.join(tail)}")
        stamp.write_text(version)
    return venv, time.monotonic() - start


@dataclass
class RucioServer:
    """A running server; ``client_config`` is what the pilot's ``RUCIO_CONFIG`` points at."""

    root: Path
    venv: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client_config(self) -> Path:
        return self.root / "etc" / "client.cfg"

    @property
    def server_config(self) -> Path:
        return self.root / "etc" / "server.cfg"

    @property
    def trace_file(self) -> Path:
        return self.root / "log" / "trace" / "trace"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "server.log"

    def rse_dir(self, rse: str) -> Path:
        return self.root / "rse" / rse

    def traces(self) -> list[dict]:
        """Every trace the server took, in order (lines that are not JSON are skipped)."""
        if not self.trace_file.exists():
            return []
        out = []
        for line in self.trace_file.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    # -- bring-up ---------------------------------------------------------------------

    @classmethod
    def start(cls, root: Path, venv: Path | None = None, wait: float = 90.0) -> RucioServer:
        t0 = time.monotonic()
        if venv is None:
            venv, _ = server_venv()
        server = cls(root=root, venv=venv)
        server.timings["install"] = time.monotonic() - t0
        t1 = time.monotonic()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        server.port = sock.getsockname()[1]
        try:
            server._write_configs()
            server._python(
                "from rucio.db.sqla.util import build_database as b, create_base_vo as v, "
                "create_root_account as r; b(); v(); r()",
                server.server_config,
            )
            server._serve(sock)
            server._wait_ready(wait)
            server._python(_SETUP, server.client_config)
        except BaseException:
            server.stop()
            raise
        finally:
            sock.close()  # gunicorn holds its own copy
        server.timings["start"] = time.monotonic() - t1
        return server

    def _write_configs(self) -> None:
        for d in ("etc", "log/trace", "tokens", *(f"rse/{r}" for r in RSES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        site = subprocess.run(
            [
                str(self.venv / "bin" / "python"),
                "-c",
                "import rucio,os;print(os.path.dirname(rucio.__file__))",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.strip()
        db = f"sqlite:///{self.root}/rucio.db?timeout=60"
        client = {
            "rucio_host": self.url,
            "auth_host": self.url,
            "auth_type": "userpass",
            "username": USERNAME,
            "password": PASSWORD,
            "account": "root",
            "request_retries": "1",
            "auth_token_file_path": str(self.root / "tokens" / "auth_token_root"),
        }
        common = {"logdir": str(self.root / "log"), "loglevel": "WARNING"}
        policy = {"permission": "generic", "schema": "generic", "lfn2pfn_algorithm_default": "hash"}
        policy["support"] = "nobody@localhost"
        _write_ini(self.client_config, {"common": common, "client": client, "policy": policy})
        _write_ini(
            self.server_config,
            {
                "common": common,
                "client": client,
                "database": {"default": db, "pool_recycle": "3600"},
                "bootstrap": {
                    "userpass_identity": USERNAME,
                    "userpass_pwd": PASSWORD,
                    "userpass_email": "rucio@localhost",
                },
                "alembic": {"cfg": str(self.root / "etc" / "alembic.ini")},
                # an empty broker list: traces go to the trace file only, no STOMP attempts
                "trace": {
                    "tracedir": str(self.root / "log" / "trace"),
                    "brokers": "",
                    "port": "61013",
                    "username": "none",
                    "password": "none",
                    "topic": "/topic/rucio.tracer",
                },
                "policy": policy,
                "api": {
                    "endpoints": "accounts, auth, config, dids, heartbeats, identities, locks, "
                    "meta_conventions, ping, redirect, replicas, requests, rses, rules, scopes, "
                    "traces, vos"
                },
            },
        )
        _write_ini(
            self.root / "etc" / "alembic.ini",
            {
                "alembic": {
                    "script_location": f"{site}/db/sqla/migrate_repo/",
                    "sqlalchemy.url": db,
                },
                "loggers": {"keys": "root"},
                "handlers": {"keys": "console"},
                "formatters": {"keys": "generic"},
                "logger_root": {"level": "WARN", "handlers": "console"},
                "handler_console": {
                    "class": "StreamHandler",
                    "args": "(sys.stderr,)",
                    "level": "NOTSET",
                    "formatter": "generic",
                },
                "formatter_generic": {"format": "%%(levelname)-5.5s [%%(name)s] %%(message)s"},
            },
            raw=True,
        )

    def _env(self, config: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUCIO_", "X509_"))}
        env["RUCIO_CONFIG"] = str(config)
        env["PYTHONNOUSERSITE"] = "1"
        env.pop("PYTHONPATH", None)
        return env

    def _python(self, code: str, config: Path, timeout: float = 180.0) -> str:
        proc = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", code],
            env={
                **self._env(config),
                "RUCIO_TEST_ROOT": str(self.root),
                "RUCIO_TEST_RSES": ",".join(RSES),
                "RUCIO_TEST_SCOPE": SCOPE,
            },
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rucio setup step failed: {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def _serve(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        os.set_inheritable(fd, True)
        log = open(self.log_file, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                [str(self.venv / "bin" / "gunicorn"), "--bind", f"fd://{fd}"]
                + ["--workers", "1", "--worker-class", "sync", "--timeout", "120"]
                + ["--no-control-socket", "rucio.web.rest.flaskapi.v1.main:application"],
                env=self._env(self.server_config),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=(fd,),
                start_new_session=True,
                cwd=self.root,
            )
        finally:
            log.close()

    def _wait_ready(self, wait: float) -> None:
        import requests  # noqa: PLC0415

        deadline = time.monotonic() + wait
        for _ in range(int(wait / 0.2) + 1):
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                if requests.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        tail = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
        raise RuntimeError(f"the Rucio server did not answer /ping: {tail}")

    def restart(self, wait: float = 90.0) -> None:
        """Serve again on the same port, database and storage (a server restart)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self.port))
            sock.listen(64)
            self._serve(sock)
            self._wait_ready(wait)
        finally:
            sock.close()

    def stop(self) -> None:
        """Stop the gunicorn master this object started (its workers follow it)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _write_ini(path: Path, sections: dict[str, dict[str, str]], raw: bool = False) -> None:
    parser = configparser.RawConfigParser() if raw else configparser.ConfigParser()
    for name, values in sections.items():
        parser[name] = {k: v.replace("%%", "%") if raw else v for k, v in values.items()}
    with open(path, "w", encoding="utf-8") as fh:
        parser.write(fh)


# Run in the server's venv with the client configuration: RSEs, protocols, quota, scope.
_SETUP = """
import os
from rucio.client import Client
root = os.environ['RUCIO_TEST_ROOT']; c = Client()
dom = {'wan': {'read': 1, 'write': 1, 'delete': 1, 'third_party_copy_read': 1,
               'third_party_copy_write': 1}, 'lan': {'read': 1, 'write': 1, 'delete': 1}}
for rse in os.environ['RUCIO_TEST_RSES'].split(','):
    c.add_rse(rse)
    c.add_protocol(rse, {'scheme': 'file', 'hostname': 'localhost', 'port': 0,
                         'prefix': f'{root}/rse/{rse}/', 'impl': 'rucio.rse.protocols.posix.Default',
                         'domains': dom})
    c.set_local_account_limit('root', rse, -1)
c.add_scope('root', os.environ['RUCIO_TEST_SCOPE'])
"""
