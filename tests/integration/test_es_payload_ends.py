"""How an event-service job ends when its payload never talks, through `pilot run --url`.

A payload that never connects to the yampl channel used to keep the pilot
waiting for ever, and the SIGTERM that ended it then crashed the job report:
no final update at all. Both endings must reach the server.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from pilot.server.serve import EmbeddedServer
from tests.conftest import PYTHON

SILENT = "-c 'import time; time.sleep(300)'"  # an ES payload that never asks for events


@pytest.fixture
def server(tmp_path: Path):
    with EmbeddedServer(tmp_path / "panda.db") as srv:
        yield srv


def load_silent_task(server: EmbeddedServer) -> int:
    task = {
        "nRanges": 4,
        "nEventsPerRange": 2,
        "job": {"transformation": PYTHON, "jobPars": SILENT, "scopeLog": "toy",
                "logFile": "toy.log.tgz", "computingSite": "TEST_QUEUE"},
    }  # fmt: skip
    (panda_id,) = server.load_task(task)["PandaIDs"]
    return panda_id


def pilot_argv(server: EmbeddedServer, workdir: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "pilot.cli", "run", "--url", server.url, "--queue", "TEST_QUEUE",
            "--workdir", str(workdir), "--kill-grace", "2", "--token-file",
            str(server.token_file), *extra]  # fmt: skip


def test_payload_that_never_connects_fails_the_job_in_bounded_time(server, tmp_path):
    panda_id = load_silent_task(server)
    proc = subprocess.run(
        pilot_argv(server, tmp_path / "w", "--es-ready-timeout", "2"),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    (record,) = server.final_records(panda_id)
    fields = record["fields"]
    assert fields["state"] == "failed" and int(fields["pilotErrorCode"]) == 1317
    assert "did not ask for events" in fields["pilotErrorDiag"]
    statuses = {r["status"] for r in server.store.ranges(panda_id)}
    assert "finished" not in statuses  # the ranges it was handed go back, none is lost


def test_sigterm_to_a_pilot_whose_payload_is_silent_still_sends_the_final_update(server, tmp_path):
    panda_id = load_silent_task(server)
    proc = subprocess.Popen(
        pilot_argv(server, tmp_path / "w"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        stdout = tmp_path / "w" / f"PandaJob_{panda_id}" / "payload.stdout"
        for _ in range(300):
            if stdout.exists():
                break
            time.sleep(0.1)
        assert stdout.exists(), "the payload never started"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err, err
    assert "not JSON serializable" not in err
    (record,) = server.final_records(panda_id)
    fields = record["fields"]
    assert fields["state"] == "failed" and int(fields["pilotErrorCode"]) == 1201  # SIGTERM
    report = tmp_path / "w" / f"PandaJob_{panda_id}" / "pilot_job_report.json"
    assert report.is_file()
