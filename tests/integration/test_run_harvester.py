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


def many_to_one(ap: Path, jobs: dict[int, dict]) -> None:
    """Harvester's layout for a ManyToOne worker: one job spec per AP/<PandaID>/."""
    for pid, d in jobs.items():
        (ap / str(pid)).mkdir(parents=True, exist_ok=True)
        atomic_write_json(ap / str(pid) / "HPCJobs.json", {str(pid): d})
    atomic_write_json(ap / "worker_pandaids.json", list(jobs))


def test_many_to_one_ordinary_jobs_each_in_its_directory(tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    jobs = {
        4101: job_dict(
            4101, jobpars=f"{BEHAVE} write out.dat 300", outFiles="out.dat,log.4101.tgz"
        ),
        4102: job_dict(4102, jobpars=f"{BEHAVE} exit 3 broken"),
        4103: job_dict(4103, jobpars=f"{BEHAVE} exit 0"),
    }
    many_to_one(ap, jobs)
    proc = pilot("--harvester", str(ap))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one job failed
    states = {
        pid: json.loads((ap / str(pid) / "worker_attributes.json").read_text()) for pid in jobs
    }
    assert [states[p]["jobStatus"] for p in jobs] == ["finished", "failed", "finished"]
    assert states[4102]["pilotErrorCode"] > 0 and states[4102]["transExitCode"] == 3
    for pid, attrs in states.items():
        assert len(attrs["startTime"]) == len("2026-01-01 00:00:00") == len(attrs["endTime"])
        assert (ap / str(pid) / "jobReport.json").exists()
        kinds = {
            e["type"]
            for e in json.loads((ap / str(pid) / "event_status.dump.json").read_text())[str(pid)]
        }
        assert "log" in kinds
    dump = json.loads((ap / "4101" / "event_status.dump.json").read_text())["4101"]
    out = next(e for e in dump if e["type"] == "output")
    assert Path(out["path"]).parent.parent == ap / "4101"  # ran in the job's directory
    assert not (ap / "worker_attributes.json").exists()
    assert (ap / "kill_worker.json").exists()


def test_event_service_job_in_a_many_to_one_worker_fails_alone(tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    es = job_dict(4201, jobpars="-m pilot.payloads.toysim", eventService="True")
    many_to_one(ap, {4201: es, 4202: job_dict(4202, jobpars=f"{BEHAVE} exit 0")})
    proc = pilot("--harvester", str(ap))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    attrs = json.loads((ap / "4201" / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "failed" and attrs["pilotErrorCode"] == 1341
    assert "ManyToOne" in attrs["pilotErrorDiag"]
    assert (
        json.loads((ap / "4202" / "worker_attributes.json").read_text())["jobStatus"] == "finished"
    )
    assert not (ap / "worker_requestevents.json").exists()
    assert (ap / "kill_worker.json").exists()


def test_many_to_one_bad_job_spec_is_reported_in_its_directory(tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    (ap / "4301").mkdir(parents=True)
    (ap / "4301" / "HPCJobs.json").write_text('{"4301": {"PandaID": 4301, "transf')
    (ap / "worker_pandaids.json").write_text("[4301]")
    proc = pilot("--harvester", str(ap))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    attrs = json.loads((ap / "4301" / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "failed" and attrs["pilotErrorCode"] == 1302
    assert (ap / "kill_worker.json").exists()


def test_unknown_map_type_is_refused_with_attributes_and_kill_file(tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    ap.mkdir()
    job_file(ap)
    proc = pilot("--harvester", str(ap), "--harvester-map-type", "OneToMany")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "OneToMany" in proc.stderr
    attrs = json.loads((ap / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "failed" and attrs["pilotErrorCode"] == 1341
    assert (ap / "kill_worker.json").exists()


def test_unreadable_job_spec_is_reported(tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    ap.mkdir()
    (ap / "HPCJobs.json").write_bytes(b"\xff\xfe\x00garbage")
    proc = pilot("--harvester", str(ap))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    attrs = json.loads((ap / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "failed" and attrs["pilotErrorCode"] == 1303
    assert (ap / "kill_worker.json").exists()


def test_harvester_options_apply_only_with_harvester(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps(job_dict(3101, jobpars=f"{BEHAVE} exit 0")))
    proc = pilot("--job-file", str(job), "--harvester-heartbeat", "5")
    assert proc.returncode == 2 and "applies only with --harvester" in proc.stderr


def test_a_zero_heartbeat_interval_is_refused(tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    ap.mkdir()
    job_file(ap)
    proc = pilot("--harvester", str(ap), "--harvester-heartbeat", "0")
    assert proc.returncode == 2 and "heartbeat interval" in proc.stderr
    assert json.loads((ap / "worker_attributes.json").read_text())["jobStatus"] == "failed"
    assert (ap / "kill_worker.json").exists()
