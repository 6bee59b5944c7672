"""The pilot driven by Harvester's own SharedFileMessenger (not a stand-in).

Each test runs ``tests/harvester_drive.py`` in Harvester's environment: it feeds
the jobs as Harvester's submitter or monitor would, answers event requests,
and reads back what Harvester would tell PanDA. Skipped, saying why, where
``../shared/tools/real-harvester`` is absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, REPO, adler32_of
from tests.mpi.fake_upstream import make_ranges
from tests.mpi.harness import mpi_argv, mpiexec
from tests.real_harvester import RealHarvester, real_harvester

BEHAVE = str(REPO / "tests" / "payloads" / "behave.py")
PANDA_TIME_LEN = len("2026-12-01 22:00:00")


@pytest.fixture(scope="module")
def harvester() -> RealHarvester:
    return real_harvester()


def getjob(pid: int, jobpars: str, outputs: tuple[str, ...] = (), **extra: Any) -> dict:
    """A getJob answer as PanDA sends it (every value a string), with the keys Harvester's
    JobSpec reads."""
    log = f"log.{pid}.tgz"
    lfns = [*outputs, log]
    d = {
        "PandaID": pid,
        "taskID": 77,
        "jobsetID": 76,
        "attemptNr": 1,
        "currentPriority": 1000,
        "transformation": PYTHON,
        "jobPars": jobpars,
        "coreCount": 1,
        "outFiles": ",".join(lfns),
        "scopeOut": ",".join("test" for _ in outputs),
        "scopeLog": "test",
        "logFile": log,
        "logGUID": "5e3c4a0e-1d1b-4c6e-9d7e-000000000001",
        "realDatasets": ",".join(f"ds.{lfn}" for lfn in lfns),
        "ddmEndPointOut": ",".join("SITE_DATADISK" for _ in lfns),
        "prodSourceLabel": "managed",
        "inFiles": "",
        "GUID": "",
        "fsize": "",
        "checksum": "",
        "scopeIn": "",
        "realDatasetsIn": "",
        "ddmEndPointIn": "",
    }
    d.update(extra)
    return {k: str(v) for k, v in d.items()}


def pilot_run(ap: Path, *extra: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "pilot.cli",
        "run",
        "--harvester",
        str(ap),
        "--harvester-heartbeat",
        "1",
        *extra,
    ]


def scenario(tmp_path: Path, jobs: list[dict], pilot: list[str], **kw: Any) -> dict:
    ap = tmp_path / "ap"
    return {
        "ap": str(ap),
        "map_type": kw.pop("map_type", "OneToOne"),
        "mode": kw.pop("mode", "push"),
        "jobs": jobs,
        "pilot": pilot,
        "env": {"PYTHON": PYTHON, "PYTHONUNBUFFERED": "1"},
        **kw,
    }


def check_final(job: dict, status: str) -> dict:
    """What PanDA would get for a job that ended: its state, codes, times, node, cores."""
    attrs = job["attributes"]
    assert job["jobStatus"] == status and job["status"] == status, job
    for key in ("pilot_error_code", "node", "core_count", "start_time", "end_time"):
        assert key in attrs, (key, attrs)
    assert len(attrs["start_time"]) == len(attrs["end_time"]) == PANDA_TIME_LEN
    assert isinstance(job["metaData"], dict)  # the job report went to PanDA as metaData
    return attrs


def check_ranges_once(result: dict, pid: int, n: int) -> list[dict]:
    """Every range handed out reached Harvester exactly once, with a final status."""
    handed = result["dispatched"][str(pid)]
    events = result["events"].get(str(pid), [])
    ids = [e["eventRangeID"] for e in events]
    assert len(handed) == n and sorted(ids) == sorted(handed), (len(handed), len(ids))
    assert len(set(ids)) == len(ids)
    assert all(e["eventStatus"] in ("finished", "failed") for e in events)
    return events


def test_push_ordinary_job(harvester: RealHarvester, tmp_path: Path) -> None:
    """Harvester's preparator staged an input; its messenger links it into the access point."""
    ap = tmp_path / "ap"
    staged = tmp_path / "staged" / "in.dat"
    staged.parent.mkdir()
    staged.write_bytes(b"x" * 1234)
    inputs = {
        "inFiles": "in.dat",
        "GUID": "5e3c4a0e-1d1b-4c6e-9d7e-0000000000aa",
        "fsize": "1234",
        "checksum": "ad:" + adler32_of(b"x" * 1234),
        "scopeIn": "test",
        "realDatasetsIn": "ds.in",
        "ddmEndPointIn": "SITE_DATADISK",
    }
    job = getjob(7001, f"{BEHAVE} write out.dat 4000", ("out.dat",), **inputs)
    sc = scenario(tmp_path, [job], pilot_run(ap), staged={"7001": {"in.dat": str(staged)}})
    res = harvester.drive(sc, tmp_path)
    assert (ap / "in.dat").is_symlink() and (ap / "PoolFileCatalog_H.xml").exists()
    assert (ap / "PandaJob_7001" / "in.dat").exists()
    assert res["pilot_rc"] == 0 and res["killed"]
    attrs = check_final(res["jobs"]["7001"], "finished")
    assert attrs["pilot_error_code"] == 0 and attrs["trans_exit_code"] == 0
    assert int(attrs["attempt_nr"]) == 1
    kinds = {lfn: (kind, size) for lfn, kind, size, _ck, _p in res["jobs"]["7001"]["outFiles"]}
    assert kinds["out.dat"] == ("output", 4000) and kinds["log.7001.tgz"][0] == "log"
    assert all(res["alive"])  # the heartbeat never went stale


def test_pull_ordinary_job_in_cgi_format(harvester: RealHarvester, tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    job = getjob(7002, f"{BEHAVE} exit 0")
    sc = scenario(
        tmp_path,
        [job],
        pilot_run(ap, "--pull", "1", "--wait", "120"),
        mode="pull",
        messenger={"jobSpecFileFormat": "cgi"},
    )
    res = harvester.drive(sc, tmp_path)
    assert res["pilot_rc"] == 0 and res["killed"]
    assert check_final(res["jobs"]["7002"], "finished")["pilot_error_code"] == 0


def test_failing_payload(harvester: RealHarvester, tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    job = getjob(7003, f"{BEHAVE} exit 3 broken", ("out.dat",))
    res = harvester.drive(scenario(tmp_path, [job], pilot_run(ap)), tmp_path)
    assert res["pilot_rc"] == 1 and res["killed"]
    attrs = check_final(res["jobs"]["7003"], "failed")
    assert attrs["pilot_error_code"] > 0 and attrs["trans_exit_code"] == 3
    assert attrs["pilot_error_diag"]
    # the failed job's log still goes out; its missing output does not
    assert {f[1] for f in res["jobs"]["7003"]["outFiles"]} == {"log"}


def test_bad_job_spec(harvester: RealHarvester, tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    job = getjob(7004, "", transformation="")  # PanDA sent a job with nothing to run
    res = harvester.drive(scenario(tmp_path, [job], pilot_run(ap)), tmp_path)
    assert res["pilot_rc"] == 1 and res["killed"]
    got = res["jobs"]["7004"]
    assert got["jobStatus"] == "failed" and got["status"] == "failed"
    assert got["attributes"]["pilot_error_code"] == 1311  # NOTDEFINED: empty transformation


def test_one_to_one_event_service_on_one_node(harvester: RealHarvester, tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    job = getjob(7005, "-m pilot.payloads.toysim --fail-on-event 31", eventService="True")
    sc = scenario(tmp_path, [job], pilot_run(ap), ranges={"7005": make_ranges(77, 7005, 40)})
    res = harvester.drive(sc, tmp_path)
    assert res["pilot_rc"] == 0 and res["killed"]
    events = check_ranges_once(res, 7005, 40)
    failed = [e for e in events if e["eventStatus"] == "failed"]
    assert len(failed) == 1  # the range holding event 31
    attrs = check_final(res["jobs"]["7005"], "finished")
    assert attrs["n_events"] == 39 * 5
    es = [f for f in res["jobs"]["7005"]["outFiles"] if f[1] == "es_output"]
    assert len(es) == 39
    assert all(Path(f[4]).exists() for f in es)
    # a few requests, each asking ahead of the free slot
    assert len(res["requests"]) <= 5 and res["requests"][0][1] >= 4
    assert all(res["alive"])


@pytest.mark.mpi
@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")
def test_one_to_one_event_service_under_mpi(harvester: RealHarvester, tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    job = getjob(7006, "-m pilot.payloads.toysim", eventService="True")
    sc = scenario(
        tmp_path, [job], hpc_argv(tmp_path, ap), ranges={"7006": make_ranges(77, 7006, 30)}
    )
    sc["env"]["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    res = harvester.drive(sc, tmp_path)
    assert res["pilot_rc"] == 0 and res["killed"], (tmp_path / "pilot.log").read_text()[-3000:]
    events = check_ranges_once(res, 7006, 30)
    assert all(e["eventStatus"] == "finished" for e in events)
    got = res["jobs"]["7006"]
    # reported as pilot run reports: final attributes, job report, log tarball
    attrs = check_final(got, "finished")
    assert attrs["n_events"] == 150 and attrs["core_count"] == 2 and attrs["pilot_error_code"] == 0
    assert got["metaData"]["PandaID"] == 7006 and got["metaData"]["reported"] == 30
    assert len([f for f in got["outFiles"] if f[1] == "es_output"]) == 30
    assert [f[0] for f in got["outFiles"] if f[1] == "log"] == ["log.7006.tgz"]
    assert all(res["alive"])


def test_many_to_one_ordinary_jobs(harvester: RealHarvester, tmp_path: Path) -> None:
    ap = tmp_path / "ap"
    jobs = [
        getjob(7011, f"{BEHAVE} write a.dat 1000", ("a.dat",)),
        getjob(7012, f"{BEHAVE} exit 2 bad"),
        getjob(7013, "-m pilot.payloads.toysim", eventService="True"),
    ]
    res = harvester.drive(scenario(tmp_path, jobs, pilot_run(ap), map_type="ManyToOne"), tmp_path)
    assert res["pilot_rc"] == 1 and res["killed"]
    check_final(res["jobs"]["7011"], "finished")
    assert check_final(res["jobs"]["7012"], "failed")["trans_exit_code"] == 2
    es = res["jobs"]["7013"]
    assert es["jobStatus"] == "failed" and es["attributes"]["pilot_error_code"] == 1341
    for pid in ("7011", "7012"):
        assert res["jobs"][pid]["access_point"] == str(ap / pid)
    assert res["requests"] == []  # nothing asked of Harvester that it cannot answer
    assert os.path.exists(ap / "7011" / "PandaJob_7011")
    assert sys.executable  # the pilot ran in its own environment


def hpc_argv(tmp_path: Path, ap: Path, *extra: str) -> list[str]:
    return mpi_argv(3) + [
        PYTHON,
        "-m",
        "pilot.cli",
        "hpc",
        "--harvester",
        str(ap),
        "--workdir",
        str(tmp_path / "work"),
        "--hb-interval",
        "1",
        "--harvester-heartbeat",
        "1",
        *extra,
    ]


@pytest.mark.mpi
@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")
def test_many_to_one_three_ordinary_jobs_under_mpi(
    harvester: RealHarvester, tmp_path: Path
) -> None:
    ap = tmp_path / "ap"
    jobs = [
        getjob(7021, f"{BEHAVE} write a.dat 1000", ("a.dat",)),
        getjob(7022, f"{BEHAVE} exit 2 bad"),
        getjob(7023, f"{BEHAVE} write b.dat 2000", ("b.dat",)),
    ]
    sc = scenario(tmp_path, jobs, hpc_argv(tmp_path, ap), map_type="ManyToOne")
    sc["env"]["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    res = harvester.drive(sc, tmp_path)
    assert res["pilot_rc"] == 1 and res["killed"], (tmp_path / "pilot.log").read_text()[-3000:]
    for pid, lfn, size in (("7021", "a.dat", 1000), ("7023", "b.dat", 2000)):
        attrs = check_final(res["jobs"][pid], "finished")
        assert attrs["pilot_error_code"] == 0
        files = {f[0]: (f[1], f[2]) for f in res["jobs"][pid]["outFiles"]}
        assert files[lfn] == ("output", size) and files[f"log.{pid}.tgz"][0] == "log"
    assert check_final(res["jobs"]["7022"], "failed")["trans_exit_code"] == 2
    assert res["requests"] == [] and all(res["alive"])


def test_heartbeat_stays_fresh_through_a_long_payload(
    harvester: RealHarvester, tmp_path: Path
) -> None:
    """Harvester's is_alive with a 3 s limit, every cycle of an 8 s payload."""
    ap = tmp_path / "ap"
    job = getjob(7031, f"{BEHAVE} sleep 8")
    sc = scenario(tmp_path, [job], pilot_run(ap), heartbeat_minutes=0.05, cycle=0.5)
    res = harvester.drive(sc, tmp_path)
    assert res["pilot_rc"] == 0 and res["killed"]
    assert len(res["alive"]) >= 14 and all(res["alive"]), res["alive"]
    check_final(res["jobs"]["7031"], "finished")


def test_event_service_with_a_slow_harvester(harvester: RealHarvester, tmp_path: Path) -> None:
    """Harvester answers once per 2 s cycle: requests sized from the rate cover the rest in
    a few answers, the waits end no ranges, the heartbeat stays fresh."""
    ap = tmp_path / "ap"
    job = getjob(7032, "-m pilot.payloads.toysim --cpu-per-event 0.002", eventService="True")
    sc = scenario(
        tmp_path,
        [job],
        pilot_run(ap, "--harvester-latency", "4"),
        ranges={"7032": make_ranges(77, 7032, 120)},
        cycle=2.0,
        heartbeat_minutes=0.05,
    )
    res = harvester.drive(sc, tmp_path)
    assert res["pilot_rc"] == 0 and res["killed"]
    events = check_ranges_once(res, 7032, 120)
    assert all(e["eventStatus"] == "finished" for e in events)
    assert check_final(res["jobs"]["7032"], "finished")["n_events"] == 600
    assert len(res["requests"]) <= 4, res["requests"]
    assert all(res["alive"])
