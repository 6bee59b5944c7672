"""Fixtures shared by the integration tests: the real PanDA servers, brought up once a session."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.tools import realpanda


def _real(version: str) -> Iterator[realpanda.RealPanda]:
    why = realpanda.unavailable()
    if why:
        print(f"real PanDA {version}: skipped: {why}")
        pytest.skip(why)
    try:
        server = realpanda.bring_up(version)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"real PanDA {version}: skipped: {exc}")
        pytest.skip(f"real PanDA {version} did not come up: {str(exc)[:300]}")
    try:
        yield server
    finally:
        server.down()
        server.remove()


@pytest.fixture(scope="session")
def real_104() -> Iterator[realpanda.RealPanda]:
    yield from _real("1.0.4")


@pytest.fixture(scope="session")
def real_081() -> Iterator[realpanda.RealPanda]:
    yield from _real("0.8.1")
