"""A payload that connects to a local listener is reported, and failed under a deny policy."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pilot.errors import ErrorCode, PilotError
from pilot.monitor.connections import TRACER_LOG, ConnectionPolicy, TracerLog
from pilot.monitor.limits import Limits
from pilot.monitor.pytracer import tracer_env
from pilot.monitor.watch import JobMonitor
from pilot.payload.runner import PayloadProcess

PY = sys.executable
LIMITS = Limits(looping_s=60, walltime_s=60)


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP listener on 127.0.0.1 that accepts and holds connections until the test ends."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield server.getsockname()[1]
    stop.set()
    t.join(timeout=2)
    for c in held:
        c.close()
    server.close()


def holder(port: int, seconds: float = 20) -> list[str]:
    code = (
        f"import socket, time; s = socket.create_connection(('127.0.0.1', {port})); "
        f"time.sleep({seconds})"
    )
    return [PY, "-c", code]


def watch(
    workdir: Path, argv: list[str], policy: ConnectionPolicy, *, turns: int = 30, env=None
) -> tuple[PilotError | None, JobMonitor]:
    payload = PayloadProcess(argv, cwd=workdir, env=env)
    monitor = JobMonitor(payload, workdir, LIMITS, policy, interval=0.1)
    breach = None
    try:
        for _ in range(turns):
            if payload.wait(timeout=max(0.02, monitor.next_due())) is not None:
                break
            breach = monitor.check()
            if breach is not None:
                monitor.save_evidence()
                break
    finally:
        record = payload.kill_tree(1.0)
        assert record.survivors == []
    return breach, monitor


def test_connection_is_reported_under_report_policy(tmp_path: Path, listener: int) -> None:
    breach, monitor = watch(tmp_path, holder(listener), ConnectionPolicy.from_spec("report"))
    assert breach is None
    report = monitor.connections_report()
    assert f"127.0.0.1:{listener}/tcp" in report
    assert "psutil" in report and "allowed" in report


def test_connection_fails_the_job_under_deny_all(tmp_path: Path, listener: int) -> None:
    breach, monitor = watch(tmp_path, holder(listener), ConnectionPolicy.from_spec("deny-all"))
    assert breach is not None and breach.code == ErrorCode.GENERALERROR
    assert f"127.0.0.1:{listener}" in breach.detail and "deny-all" in breach.detail
    assert "DENIED" in monitor.connections_report()
    assert "outbound connections" in (tmp_path / "monitor_evidence.txt").read_text()


def test_allow_list_by_network_and_port(tmp_path: Path, listener: int) -> None:
    allowed = ConnectionPolicy.from_spec(f"allow:127.0.0.0/8:{listener}")
    breach, _ = watch(tmp_path, holder(listener, 2), allowed, turns=8)
    assert breach is None
    other = ConnectionPolicy.from_spec("allow:10.0.0.0/8,*:443")
    breach, _ = watch(tmp_path, holder(listener), other)
    assert breach is not None and breach.code == ErrorCode.GENERALERROR


def test_python_tracer_records_a_short_connection(tmp_path: Path, listener: int) -> None:
    # Connects and closes at once: too quick for socket sampling, caught by the tracer.
    code = f"import socket; socket.create_connection(('127.0.0.1', {listener})).close()"
    env = tracer_env(tmp_path)
    breach, monitor = watch(
        tmp_path, [PY, "-c", code], ConnectionPolicy.from_spec("report"), env=env
    )
    assert breach is None
    lines = (tmp_path / TRACER_LOG).read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f" tcp 127.0.0.1:{listener}")
    conns = TracerLog(tmp_path / TRACER_LOG).read_new()
    assert conns[0].port == listener and conns[0].pid > 0
    assert "via tracer" in monitor.connections_report()


def test_tracer_does_not_break_a_payload_that_cannot_write_the_log(
    tmp_path: Path, listener: int
) -> None:
    env = tracer_env(tmp_path)
    env["PANDA_TRACER_LOG"] = str(tmp_path / "no" / "such" / "dir" / TRACER_LOG)
    code = (
        f"import socket; socket.create_connection(('127.0.0.1', {listener})).close(); print('ok')"
    )
    payload = PayloadProcess([PY, "-c", code], cwd=tmp_path, env=env, stdout=tmp_path / "out")
    assert payload.wait(timeout=20) == 0
    assert (tmp_path / "out").read_text().strip() == "ok"


def test_tracer_keeps_an_existing_sitecustomize(tmp_path: Path, listener: int) -> None:
    other = tmp_path / "site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['SITE_HOOK_RAN'] = 'yes'\n")
    env = tracer_env(tmp_path, {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(other)})
    code = (
        "import os, socket; "
        f"socket.create_connection(('127.0.0.1', {listener})).close(); "
        "print(os.environ.get('SITE_HOOK_RAN'))"
    )
    payload = PayloadProcess([PY, "-c", code], cwd=tmp_path, env=env, stdout=tmp_path / "out")
    assert payload.wait(timeout=20) == 0
    assert (tmp_path / "out").read_text().strip() == "yes"
    assert f"127.0.0.1:{listener}" in (tmp_path / TRACER_LOG).read_text()
