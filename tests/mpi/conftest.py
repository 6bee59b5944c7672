"""Fixtures of the tests that launch ``pilot hpc`` under ``mpiexec`` (here and in
tests/fault): the launched runs, ended whatever happens, and an embedded dispatcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mpi.harness import Launched


@pytest.fixture
def launched():
    runs = Launched()
    yield runs
    runs.cleanup()


@pytest.fixture
def server(tmp_path: Path):
    from pilot.server.serve import EmbeddedServer

    s = EmbeddedServer(tmp_path / "server.db").start()
    yield s
    s.stop()
