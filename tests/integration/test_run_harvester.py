"""`pilot run --harvester DIR`: the real command against a stand-in Harvester."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pilot.data.checksum import adler32_file
from pilot.fileio import atomic_write_json
from tests.conftest import PYTHON, REPO, job_dict
from tests.integration.test_harvester_es import PANDA_ID, StandInHarvester, job_file

BEHAVE = str(REPO / "tests" / "payloads" / "behave.py")


def pilot(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "pilot.cli", "run", *args], capture_output=True, text=True, timeout=timeout
    )


def test_push_mode_event_service_job(tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    ap.mkdir()
    job_file(ap)
    harvester = StandInHarvester(ap, 60)
    harvester.start()
    try:
        proc = pilot("--harvester", str(ap))
    finally:
        harvester.stop_event.set()
        harvester.join(30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert harvester.duplicates == []
    assert set(harvester.dump) == harvester.handed_out and len(harvester.handed_out) == 60
    for entry in harvester.dump.values():
        assert entry["eventStatus"] == "finished"
        assert adler32_file(entry["path"]) == entry["chksum"]
    attrs = json.loads((ap / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "finished" and attrs["pilotErrorCode"] == 0
    assert int(attrs["nEvents"]) == 180
    assert (ap / "kill_worker.json").exists()


def test_push_mode_plain_job_leaves_outputs_for_harvester(tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    ap.mkdir()
    d = job_dict(
        3001, jobpars=f"{BEHAVE} write out.dat 5000", outFiles="out.dat,log.3001.tgz", scopeOut="s"
    )
    atomic_write_json(ap / "HPCJobs.json", {"3001": d})
    proc = pilot("--harvester", str(ap))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dump = json.loads((ap / "event_status.dump.json").read_text())["3001"]
    kinds = {e["type"]: e for e in dump}
    assert set(kinds) == {"output", "log"}
    assert Path(kinds["output"]["path"]).stat().st_size == 5000 == kinds["output"]["fsize"]
    assert adler32_file(kinds["output"]["path"]) == kinds["output"]["chksum"]
    assert json.loads((ap / "worker_attributes.json").read_text())["jobStatus"] == "finished"


def test_garbage_job_spec_is_reported_not_crashed(tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    ap.mkdir()
    (ap / "HPCJobs.json").write_text('{"3002": {"PandaID": 3002, "transf')
    proc = pilot("--harvester", str(ap))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    attrs = json.loads((ap / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "failed" and attrs["pilotErrorCode"] > 0
    assert (ap / "kill_worker.json").exists()


def test_pull_mode_requests_a_job(tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    ap.mkdir()
    proc = subprocess.Popen(
        [PYTHON, "-m", "pilot.cli", "run", "--harvester", str(ap), "--pull", "1", "--wait", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        import time

        deadline = time.monotonic() + 60
        delay = 0.02
        while not (ap / "worker_requestjob.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(delay)
            delay = min(2 * delay, 0.5)
        assert json.loads((ap / "worker_requestjob.json").read_text()) == {"nJobs": 1}
        atomic_write_json(ap / "HPCJobs.json", {"3003": job_dict(3003, jobpars=f"{BEHAVE} exit 0")})
        (ap / "worker_requestjob.json").unlink()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert json.loads((ap / "worker_attributes.json").read_text())["jobStatus"] == "finished"
    assert PANDA_ID != 3003
