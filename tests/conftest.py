"""Shared fixtures: job definitions and pilot configurations for real runs."""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from pilot.config import PilotConfig
from tests.tools.debian import ensure_tool

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def adler32_of(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    d = tmp_path / "storage"
    d.mkdir()
    return d


@pytest.fixture
def config(tmp_path: Path, storage: Path) -> PilotConfig:
    return PilotConfig(
        workdir=tmp_path / "work",
        site_name="TEST_QUEUE",
        input_url=str(storage),
        output_url=str(tmp_path / "out"),
        kill_grace=2.0,
        monitor_interval=1.0,
        heartbeat_interval=3600.0,
    )


def job_dict(
    panda_id: int = 1001, *, jobpars: str, transformation: str = PYTHON, **extra: Any
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "PandaID": str(panda_id),
        "jobsetID": "1000",
        "taskID": "77",
        "attemptNr": "1",
        "transformation": transformation,
        "jobPars": jobpars,
        "coreCount": "1",
        "logFile": f"log.{panda_id}.tgz",
        "scopeLog": "test",
    }
    d.update(extra)
    return d


def write_job(path: Path, d: dict[str, Any]) -> Path:
    path.write_text(json.dumps(d), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def bwrap() -> None:
    """Real bubblewrap, installed from Debian's package where it is missing and can be."""
    reason = ensure_tool("bwrap", "bubblewrap")
    if reason:
        print(f"SKIP bubblewrap: {reason}")
        pytest.skip(reason)
