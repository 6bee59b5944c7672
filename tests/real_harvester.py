"""Harvester's own messenger for tests, from ``../shared/tools/real-harvester``.

Harvester is not on PyPI: the tool directory beside the repository holds its
source and a setup script that builds a separate environment for it. Tests
that drive the pilot with it skip, saying why, where the directory is absent
(a user's clone). The environment is built once per machine and user, under
the temporary directory, behind a lock (about 40 s the first time).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

TOOL = REPO.parent / "shared" / "tools" / "real-harvester"
DRIVER = REPO / "tests" / "harvester_drive.py"


@dataclass(frozen=True)
class RealHarvester:
    python: Path
    env: dict[str, str]

    def drive(self, scenario: dict[str, Any], where: Path, timeout: float = 300) -> dict:
        """Run the scenario (see ``tests/harvester_drive.py``); returns Harvester's read-back."""
        path, result = where / "scenario.json", where / "harvester-result.json"
        scenario.setdefault("pilot_log", str(where / "pilot.log"))
        path.write_text(json.dumps(scenario))
        proc = subprocess.run(
            [str(self.python), str(DRIVER), str(path), str(result)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return json.loads(result.read_text())


def real_harvester() -> RealHarvester:
    """Build (once) and return Harvester's environment; skip when the tool is absent."""
    setup = TOOL / "setup.sh"
    if not setup.exists():
        print(f"Harvester's messenger not found at {TOOL}: skipped", file=sys.stderr)
        pytest.skip(f"Harvester's own messenger is not available ({TOOL} is absent)")
    base = Path(tempfile.gettempdir()) / f"pilot-real-harvester-{os.getuid()}"
    base.mkdir(exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(
            ["bash", str(setup), str(base)], capture_output=True, text=True, timeout=900
        )
    if proc.returncode != 0:
        pytest.fail(f"Harvester's setup failed: {proc.stderr[-2000:]}")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PANDA_HOME")}
    for line in proc.stdout.splitlines():
        if line.startswith("export "):
            for pair in line[len("export ") :].split():
                key, _, value = pair.partition("=")
                env[key] = value
    return RealHarvester(base / "hvenv" / "bin" / "python", env)
