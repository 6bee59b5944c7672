"""A real Rucio server for the tests in this directory, brought up once per session.

The server comes from PyPI into its own cached venv (tests/tools/rucio_server.py);
when it cannot be installed or started here, or rucio-clients is missing, the
tests skip and say why. The pilot side sees the server the way a site's pilot
does: through ``RUCIO_CONFIG`` pointing at a client configuration.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.tools.rucio_server import SCOPE, RucioServer, Unavailable, server_venv

# the bring-up's timings, for the summary line (kept on the pytest config, not in a global)
TIMINGS = pytest.StashKey[dict]()


def _skip_reason() -> str | None:
    try:
        import rucio.client  # noqa: F401, PLC0415
    except ImportError as exc:
        return f"rucio-clients is not installed ({exc}); pip install -e '.[test]'"
    return None


@pytest.fixture(scope="session")
def rucio_server(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[RucioServer]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        venv, took = server_venv()
    except (Unavailable, OSError) as exc:
        pytest.skip(f"no Rucio server here: {exc}")
    timings = pytestconfig.stash.setdefault(TIMINGS, {})
    timings["install"] = took
    try:
        server = RucioServer.start(tmp_path_factory.mktemp("rucio"), venv)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the Rucio server did not start: {str(exc)[-500:]}")
    timings["start"] = server.timings["start"]
    old = os.environ.get("RUCIO_CONFIG")
    os.environ["RUCIO_CONFIG"] = str(server.client_config)
    from rucio.common.config import clean_cached_config  # noqa: PLC0415

    clean_cached_config()
    try:
        yield server
    finally:
        server.stop()
        if old is None:
            os.environ.pop("RUCIO_CONFIG", None)
        else:
            os.environ["RUCIO_CONFIG"] = old
        clean_cached_config()


@pytest.fixture(scope="session")
def rucio_client(rucio_server: RucioServer) -> Any:
    from pilot.data.rucio import RucioSettings  # noqa: PLC0415

    return RucioSettings.from_environ().client()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


def seed(
    server: RucioServer,
    client: Any,
    name: str,
    data: bytes,
    rse: str = "LOCAL_DISK",
    tmp: Path | None = None,
) -> Path:
    """Put ``data`` into Rucio as ``tests:name`` on ``rse`` with the real upload client."""
    import logging  # noqa: PLC0415

    from rucio.client.uploadclient import UploadClient  # noqa: PLC0415

    from pilot.data.rucio import _Log  # noqa: PLC0415

    src = (tmp or server.root / "seed") / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    UploadClient(_client=client, logger=_Log(logging.getLogger("seed")), tracing=False).upload(
        [
            {
                "path": str(src),
                "rse": rse,
                "did_scope": SCOPE,
                "did_name": name,
                "register_after_upload": True,
            }
        ]
    )
    return src


def wait_for_traces(server: RucioServer, pred, timeout: float = 10.0) -> list[dict]:
    """The server's traces once ``pred(traces)`` holds (bounded wait, 0.1 s naps)."""
    deadline = time.monotonic() + timeout
    traces = server.traces()
    while not pred(traces) and time.monotonic() < deadline:
        time.sleep(0.1)
        traces = server.traces()
    return traces


def pytest_terminal_summary(terminalreporter: Any) -> None:
    timings = terminalreporter.config.stash.get(TIMINGS, None)
    if timings:
        terminalreporter.write_line(
            "rucio server: venv ready in {install:.1f} s, bootstrap+start {start:.1f} s".format(
                **{"install": 0.0, "start": 0.0, **timings}
            )
        )
