"""After any ``pilot run``, no process of any payload tree is left: each payload here leaves
a setsid'd orphan behind on purpose (tests/payloads/orphan.py). The event-service payload
is under the same monitor as a job's: a memory hog among its ranges is killed with 1235.

(``pilot hpc``, Droids and whole jobs: tests/mpi/test_mpi_guard.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pilot.queue import QueueConfig
from pilot.server.serve import EmbeddedServer
from tests.conftest import PYTHON, REPO, job_dict, write_job
from tests.payloads.orphan import survivors

ORPHAN = str(REPO / "tests" / "payloads" / "orphan.py")
BEHAVE = str(REPO / "tests" / "payloads" / "behave.py")


def test_pilot_run_single_job_leaves_no_payload_process(tmp_path: Path) -> None:
    marker = f"run-{tmp_path.name}"
    job = write_job(
        tmp_path / "job.json", job_dict(4101, jobpars=f"{ORPHAN} {marker} {BEHAVE} exit 0")
    )
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "run", "--job-file", str(job), "--workdir", str(tmp_path / "w"),
         "--monitor-interval", "0.5", "--kill-grace", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert survivors(marker) == []
    assert (
        "payload left processes behind"
        in (tmp_path / "w" / "PandaJob_4101" / "pilot.log").read_text()
    )


def test_pilot_run_event_service_hog_is_1235_and_leaves_no_payload_process(tmp_path: Path) -> None:
    marker = f"es-{tmp_path.name}"
    with EmbeddedServer(tmp_path / "panda.db") as server:
        queue = QueueConfig.default("TEST_QUEUE").to_dict()
        server.store.put_queue("TEST_QUEUE", {**queue, "maxrss": 100})
        pars = f"{ORPHAN} {marker} -m pilot.payloads.toysim --hog-on-event 5"
        task = {
            "nRanges": 6,
            "nEventsPerRange": 2,
            "LFN": "EVNT.toy",
            "job": {"transformation": PYTHON, "jobPars": pars, "scopeLog": "toy",
                    "logFile": "toy.log.tgz", "computingSite": "TEST_QUEUE"},
        }  # fmt: skip
        (panda_id,) = server.load_task(task)["PandaIDs"]
        proc = subprocess.run(
            [PYTHON, "-m", "pilot.cli", "run", "--url", server.url, "--queue", "TEST_QUEUE",
             "--workdir", str(tmp_path / "w"), "--monitor-interval", "0.2", "--kill-grace", "2",
             "--token-file", str(server.token_file)],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert survivors(marker) == []  # the orphans of both payload processes
        rows = server.store.query("SELECT status, error_code FROM ranges ORDER BY status")
        (record,) = server.final_records(panda_id)
    assert [(r["status"], r["error_code"]) for r in rows if r["status"] != "finished"] == [
        ("failed", 1235)
    ], proc.stdout + proc.stderr
    assert sum(r["status"] == "finished" for r in rows) == 5
    assert record["fields"]["state"] == "finished"
    evidence = next((tmp_path / "w").rglob("monitor_evidence.txt")).read_text()
    assert "1235 PAYLOADEXCEEDMAXMEM" in evidence and json.dumps(record)


def test_pilot_run_event_service_past_its_walltime_is_1213(tmp_path: Path) -> None:
    """The job's walltime holds its payload on one node as in a Droid: the range in
    flight fails with 1213, the ranges not started are released, the job fails with 1213."""
    with EmbeddedServer(tmp_path / "panda.db") as server:
        task = {
            "nRanges": 6,
            "nEventsPerRange": 2,
            "LFN": "EVNT.toy",
            "job": {"transformation": PYTHON, "jobPars": "-m pilot.payloads.toysim --hang-on-event 2",
                    "scopeLog": "toy", "logFile": "toy.log.tgz", "computingSite": "TEST_QUEUE",
                    "maxWalltime": 4},
        }  # fmt: skip
        (panda_id,) = server.load_task(task)["PandaIDs"]
        proc = subprocess.run(
            [PYTHON, "-m", "pilot.cli", "run", "--url", server.url, "--queue", "TEST_QUEUE",
             "--workdir", str(tmp_path / "w"), "--monitor-interval", "0.5", "--kill-grace", "2",
             "--token-file", str(server.token_file)],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        rows = server.store.query("SELECT start_event, status, error_code FROM ranges")
        (record,) = server.final_records(panda_id)
    by_start = {r["start_event"]: (r["status"], r["error_code"]) for r in rows}
    assert by_start[0] == ("finished", None), proc.stdout + proc.stderr
    assert by_start[2] == ("failed", 1213)
    assert all(by_start[s][0] != "failed" for s in (4, 6, 8, 10))  # released, not charged
    assert int(record["fields"]["pilotErrorCode"]) == 1213
