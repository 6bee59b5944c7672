"""/api/v1 conformance: the same calls, the same answers, from `pilot serve` and the real server.

One suite of /api/v1 calls runs against the embedded dispatcher (with the
1.0.4 quirk on, so that it answers as that server does) and, where
``../shared/tools/real-panda`` can bring it up, against the real
panda-server 1.0.4 as it ships. Against the real server the outcome is also
checked in its own tables after its Adder: the job finished with its start
and end times, its outputs and log registered with size, checksum and GUID,
and each event range finished (or failed) once.

``pilot run --url`` in pull mode then runs an ordinary and an event-service
job to the end against the real 1.0.4 and 0.8.1 (auto: /api/v1 on both; and
the legacy API of 0.8.1 on request), and ``pilot hpc`` under ``mpiexec`` an
event-service job against 1.0.4, to finished after the Adder. Both servers are
brought up once per session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from pilot.comm.pandaapi import PANDA_TIME
from pilot.server.serve import EmbeddedServer
from tests.tools import realpanda

JSON = {"Content-Type": "application/json", "Accept": "application/json"}
QUEUE = realpanda.QUEUE


@dataclass
class Backend:
    """What a conformance case needs from a server: where, how to load work, how to look."""

    name: str
    url: str
    headers: dict[str, str]
    serve: EmbeddedServer | None = None
    real: realpanda.RealPanda | None = None

    def post(self, path: str, body: Any, **kw: Any) -> requests.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(
            f"{self.url}/api/v1/{path}", data=data, headers=self.headers, timeout=120, **kw
        )

    def call(self, path: str, body: Any) -> dict[str, Any]:
        r = self.post(path, body)
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/plain")  # whatever the body is
        return r.json()

    def job(self, **spec: Any) -> tuple[int, int, int]:
        """(PandaID, jobsetID, jediTaskID) of a job ready for dispatch."""
        if self.real is not None:
            pid = self.real.submit(**spec)
            return (pid, 1001, 1) if spec.get("es") else (pid, 1, 0)
        assert self.serve is not None
        job = {"transformation": "x", "jobPars": "", "computingSite": QUEUE, "logFile": "l.tgz"}
        if spec.get("es"):
            task = {"nRanges": 4, "nEventsPerRange": 2, "jediTaskID": 1, "job": job}
            (pid,) = self.serve.load_task(task)["PandaIDs"]
            return pid, int(self.serve.store.job(pid)["jobset_id"]), 1
        (pid,) = self.serve.load_jobs([job])
        return pid, 0, 0


@pytest.fixture(params=["pilot serve", "panda-server 1.0.4"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "pilot serve":
        quirks = {"update_event_ranges_500"}  # as 1.0.4 answers
        with EmbeddedServer(tmp_path / "s.db", quirks=quirks) as server:
            auth = {"Authorization": f"Bearer {server.token}"}
            yield Backend(request.param, server.url, {**JSON, **auth}, serve=server)
    else:
        real = request.getfixturevalue("real_104")
        yield Backend(request.param, real.url, dict(JSON), real=real)


ACQUIRE = {"site_name": QUEUE, "memory": 2000, "disk_space": 10000, "node": "wn1",
           "prod_source_label": "managed", "computing_element": "localhost", "n_jobs": 1}  # fmt: skip


def _acquire(backend: Backend, panda_id: int) -> dict[str, Any]:
    answer = backend.call("pilot/acquire_jobs", ACQUIRE)
    assert answer["success"] is True and answer["message"] == "", answer
    assert answer["data"]["StatusCode"] == 0
    (job,) = answer["data"]["jobs"]
    assert job["PandaID"] == panda_id and isinstance(job["PandaID"], int)
    assert job["StatusCode"] == 0 and isinstance(job["attemptNr"], int)
    return job


def test_mistyped_unknown_and_missing_parameters(backend: Backend) -> None:
    cases = [
        ("pilot/acquire_jobs", {**ACQUIRE, "memory": "2000"},
         "Type error: 'memory' must be of type int, got str."),
        ("pilot/acquire_jobs", {**ACQUIRE, "workdir": "/w"},
         "Argument error: got an unexpected keyword argument 'workdir'"),
        ("pilot/acquire_jobs", {"memory": 1},
         "Argument error: missing a required argument: 'site_name'"),
        ("pilot/acquire_jobs", {**ACQUIRE, "n_jobs": None},
         "Type error: 'n_jobs' must be of type int, got NoneType."),
        ("pilot/update_job", {"job_id": "12", "job_status": "running"},
         "Type error: 'job_id' must be of type int, got str."),
        ("event/acquire_event_ranges", {"job_id": 1, "jobset_id": 1, "scattered": "no"},
         "Type error: 'scattered' must be of type bool, got str."),
        ("event/update_event_ranges", {"event_ranges": []},
         "Type error: 'event_ranges' must be of type str, got list."),
    ]  # fmt: skip
    for path, body, message in cases:
        assert backend.call(path, body) == {"success": False, "message": message, "data": None}
    r = requests.get(f"{backend.url}/api/v1/pilot/update_job", headers=backend.headers, timeout=60)
    assert r.json() == {"success": False, "message": "expecting POST, received GET", "data": None}
    r = backend.post("pilot/no_such_function", {})
    assert (r.status_code, r.text) == (403, "ERROR : method no_such_function is forbidden")
    r = backend.post("pilot/update_job", b"{not json")
    assert r.status_code == 500 and r.text.startswith("ERROR : received invalid JSON : ")
    # without Accept/Content-Type application/json the answer is a Python repr, not JSON
    plain = {k: v for k, v in backend.headers.items() if k not in ("Content-Type", "Accept")}
    r = requests.post(f"{backend.url}/api/v1/pilot/acquire_jobs", data=ACQUIRE, headers=plain)
    assert r.text.startswith("{'success': False, 'message': \"Type error: 'memory'")
    r = requests.get(f"{backend.url}/api/v1/system/is_alive", headers=JSON, timeout=60)
    assert r.json() == {"success": True, "message": "", "data": None}


def test_ordinary_job_acquire_update_final_with_files(backend: Backend) -> None:
    pid, _, _ = backend.job()
    assert backend.call("pilot/acquire_jobs", {**ACQUIRE, "site_name": "NO_SUCH_QUEUE"}) == {
        "success": False,
        "message": "No jobs in PanDA",
        "data": None,
    }
    job = _acquire(backend, pid)
    running = {"job_id": pid, "job_status": "running", "node": "wn1", "site_name": QUEUE,
               "attempt_nr": job["attemptNr"], "core_count": 1, "cpu_consumption_unit": "s"}  # fmt: skip
    # "NULL", a string, when there is no command: what 1.0.4 answers (not null)
    ok = {"success": True, "message": "", "data": {"StatusCode": 0, "command": "NULL"}}
    assert backend.call("pilot/update_job", {**running, "job_status": "starting"}) == ok
    assert backend.call("pilot/update_job", running) == ok
    assert backend.call("pilot/update_job", {**running, "job_status": "lost"}) == {
        "success": False,
        "message": "Invalid job status: lost",
        "data": {"StatusCode": 50},
    }
    log_lfn = job["logFile"]
    content = b"log of the conformance job\n" * 40
    report = {
        log_lfn: {
            "guid": job.get("logGUID") or "8a3d9e38-4d2c-4b8e-9b5e-3b2c1d0e9f11",
            "fsize": len(content),
            "adler32": f"{zlib.adler32(content) & 0xFFFFFFFF:08x}",
            "surl": f"file:///storage/{log_lfn}",
        }
    }
    start, end = time.time() - 60, time.time()
    final = {**running, "job_status": "finished", "trans_exit_code": 0, "pilot_error_code": 0,
             "exe_error_code": 0, "job_output_report": json.dumps(report),
             "start_time": time.strftime(PANDA_TIME, time.gmtime(start)),
             "end_time": time.strftime(PANDA_TIME, time.gmtime(end)),
             "pilot_timing": "1|0|10|1|0|0", "cpu_consumption_time": 9,
             "max_rss": 12345, "tot_rchar": 2048.0, "job_metrics": "coreCount=1"}  # fmt: skip
    assert backend.call("pilot/update_job", final) == ok
    # the same final update again (a spool resending it): taken, recorded once
    again = {"success": True, "message": "", "data": {"StatusCode": 0, "command": "alreadydone"}}
    assert backend.call("pilot/update_job", final) == again
    if backend.serve is not None:
        (record,) = backend.serve.final_records(pid)
        assert record["fields"]["xml"] == json.dumps(report)
        assert record["fields"]["startTime"] == final["start_time"]
        assert backend.serve.store.job(pid)["status"] == "finished"
        return
    real = backend.real
    assert real is not None
    assert real.job_row(pid)["jobstatus"] == "holding"  # until the Adder has run
    assert real.adder() >= 1
    row = real.job_row(pid)
    assert row["jobstatus"] == "finished", row
    assert (row["starttime"], row["endtime"]) == (final["start_time"], final["end_time"])
    (log,) = [f for f in real.files(pid) if f["type"] == "log"]
    entry = report[log_lfn]
    assert log["status"] == "ready" and int(log["fsize"]) == entry["fsize"]
    assert log["checksum"] == f"ad:{entry['adler32']}" and log["guid"] == entry["guid"]


def test_event_service_job_ranges_in_batches(backend: Backend) -> None:
    pid, jobset, task = backend.job(es=True)
    _acquire(backend, pid)
    assert backend.call("pilot/update_job", {"job_id": pid, "job_status": "running"})["success"]
    asked = {"job_id": pid, "jobset_id": jobset, "task_id": task, "n_ranges": 2}
    ranges = []
    for statuses in (("finished", "finished"), ("finished", "failed")):
        answer = backend.call("event/acquire_event_ranges", asked)
        assert answer["success"] is True and len(answer["data"]) == 2, answer
        for r in answer["data"]:
            assert set(r) >= {"eventRangeID", "startEvent", "lastEvent", "LFN", "GUID", "scope"}
            assert isinstance(r["startEvent"], int) and isinstance(r["lastEvent"], int)
        ranges += answer["data"]
        update = [
            {"eventRangeID": r["eventRangeID"], "eventStatus": s}
            | ({"errorCode": 1220, "errorDiag": "conformance"} if s == "failed" else {})
            for r, s in zip(answer["data"], statuses)
        ]
        r = backend.post("event/update_event_ranges", {"event_ranges": json.dumps(update)})
        # panda-server 1.0.4 writes the ranges, then fails to encode its answer (a set)
        assert r.status_code == 500 and "Type not serializable" in r.text, r.text
    assert backend.call("event/acquire_event_ranges", asked) == {
        "success": True,
        "message": "",
        "data": [],
    }
    ids = json.dumps([{"task_id": task, "panda_id": pid}])
    r = requests.get(
        f"{backend.url}/api/v1/event/get_event_range_statuses",
        params={"job_task_ids": ids},
        headers=backend.headers,
        timeout=60,
    )
    answer = r.json()
    assert answer["success"] is True
    statuses = {rid: v["status"] for rid, v in answer["data"][str(pid)].items()}
    assert sorted(statuses.values()) == ["failed", "finished", "finished", "finished"]
    assert set(statuses) == {r["eventRangeID"] for r in ranges}
    # a range already final does not change again
    again = [{"eventRangeID": ranges[3]["eventRangeID"], "eventStatus": "finished"}]
    backend.post("event/update_event_ranges", {"event_ranges": json.dumps(again)})
    if backend.real is not None:
        # in the server's own table: every range once, finished (3) or failed (7)
        assert [s for _, s in backend.real.events(pid)] == [3, 3, 3, 7]
    else:
        assert backend.serve is not None
        assert backend.serve.store.range_counts(pid) == {"finished": 3, "failed": 1}
        assert sorted(backend.serve.store.range_update_counts().values()) == [1, 1, 1, 1]


# -- pull mode: the pilot itself against the real servers -------------------------------------


def _pilot(real: realpanda.RealPanda, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "pilot.cli", "run", "--url", real.url, "--queue", QUEUE,
            "--max-jobs", "1", "--workdir", str(workdir), "--kill-grace", "2",
            # the queue names rucio, which this test has no server of: storage on disk
            "--copytool", "copy",
            "--queuedata-url", f"{real.url}/cache/schedconfig/{QUEUE}.all.json", *extra]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("version,api", [("1.0.4", "auto"), ("0.8.1", "auto"), ("0.8.1", "legacy")])
def test_pull_mode_ordinary_and_event_service_jobs(
    version: str, api: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    real = request.getfixturevalue("real_104" if version == "1.0.4" else "real_081")
    out = f"out.{time.time_ns()}.dat"
    write = f"open('{out}', 'w').write('x' * 1000)"
    pid = real.submit(transformation=sys.executable, jobPars=f'-c "{write}"', outputs=[out])
    proc = _pilot(real, tmp_path / "w1", "--panda-api", api)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"job {pid}: finished" in proc.stdout
    es = real.submit(
        es=True, transformation=sys.executable, jobPars="-m pilot.payloads.toysim --cpu-per-event 0"
    )
    storage = tmp_path / "w2" / "storage"  # the task's input, where stage-in looks for it
    storage.mkdir(parents=True)
    (storage / "EVNT.localtest.pool.root.1").write_bytes(b"toy events\n")
    proc = _pilot(real, tmp_path / "w2", "--panda-api", api)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"job {es}: finished" in proc.stdout
    # every range reported once, whatever the answers (v1: HTTP 500 after each write)
    assert [s for _, s in real.events(es)] == [3, 3, 3, 3]
    real.adder()
    row = real.job_row(pid)
    assert row["jobstatus"] == "finished" and row["piloterrorcode"] == "0", row
    for key in ("starttime", "endtime"):
        time.strptime(row[key], PANDA_TIME)  # recorded, in the server's format
    files = {f["lfn"]: f for f in real.files(pid)}
    output, (log,) = files[out], [f for f in files.values() if f["type"] == "log"]
    assert output["status"] == "ready" and int(output["fsize"]) == 1000
    assert output["checksum"] == f"ad:{zlib.adler32(b'x' * 1000) & 0xFFFFFFFF:08x}"
    assert log["status"] == "ready" and int(log["fsize"]) > 0 and log["checksum"].startswith("ad:")
    assert all(len(f["guid"]) == 36 for f in (output, log))
    assert real.job_row(es)["jobstatus"] in ("finished", "merging", "closed"), real.job_row(es)


@pytest.mark.slow
def test_pilot_hpc_event_service_job_against_the_real_server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``pilot hpc`` under mpiexec with the real 1.0.4: its ranges through /api/v1 from
    rank 0's link process, and a final update the server records with the fields
    ``pilot run`` sends: times, cores, CPU, and the droids' memory figures merged."""
    from tests.mpi.harness import mpi_argv

    real = request.getfixturevalue("real_104")
    es = real.submit(
        es=True,
        transformation=sys.executable,
        jobPars="-m pilot.payloads.toysim --cpu-per-event 0.2",
    )
    work = tmp_path / "hpc"
    work.mkdir()
    argv = [*mpi_argv(3), sys.executable, "-m", "pilot.ranks", "--url", real.url,
            "--queue", QUEUE, "--workdir", str(work), "--copytool", "copy",
            "--queuedata-url", f"{real.url}/cache/schedconfig/{QUEUE}.all.json",
            "--monitor-interval", "0.5", "--hb-interval", "1"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    rank0 = (work / "logs" / "rank0.log").read_text()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + rank0[-3000:]
    assert f"job {es}: finished" in rank0
    assert [s for _, s in real.events(es)] == [3, 3, 3, 3]  # every range finished, once
    real.adder()  # a final "finished" holds the job until the server's Adder runs
    cols = "jobstatus, starttime, endtime, actualcorecount, maxrss, avgrss, nevents"
    row = real.job_row(es, cols)
    why = real.job_row(es, "piloterrorcode, piloterrordiag, superrorcode, superrordiag")
    assert row["jobstatus"] in ("finished", "merging", "closed"), (row, why)
    for key in ("starttime", "endtime"):
        time.strptime(row[key], PANDA_TIME)
    assert int(row["actualcorecount"]) == 2 and int(row["nevents"]) == 8, row
    assert int(row["maxrss"]) > 1000 and 0 < int(row["avgrss"]) <= int(row["maxrss"]), row
    # the ranks' log tarball, stored and registered: without it the Adder fails the job
    (log,) = [f for f in real.files(es) if f["type"] == "log"]
    assert log["status"] == "ready" and int(log["fsize"]) > 0 and log["checksum"].startswith("ad:")
    assert len(log["guid"]) == 36
