"""Event-service range outputs stored through Rucio: ``pilot run --url`` and ``pilot hpc``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pilot.server.loading import load_queue
from pilot.server.serve import EmbeddedServer
from tests.conftest import PYTHON
from tests.mpi.harness import Launched, mpiexec, wait
from tests.mpi.invariants import journal_outputs
from tests.rucio.conftest import wait_for_traces
from tests.tools.rucio_server import SCOPE


def es_task(queue: str, dataset: str, n_ranges: int, log: str) -> dict:
    return {
        # range ids (and so output names) carry the task id: unique per test in one Rucio
        "jediTaskID": int(uuid.uuid4().int % 10**9) + 1,
        "nRanges": n_ranges,
        "nEventsPerRange": 2,
        "LFN": "EVNT.toy",
        "job": {
            "transformation": PYTHON,
            "jobPars": "-m pilot.payloads.toysim",
            "computingSite": queue,
            "coreCount": 1,
            "logFile": log,
            "scopeLog": SCOPE,
            # the log is PanDA's last output: it carries the RSE and dataset of the job
            "outFiles": log,
            "ddmEndPointOut": "LOCAL_DISK2",
            "destinationDblock": dataset,
        },
    }


def registered(client, dataset: str) -> dict[str, dict]:
    names = [c["name"] for c in client.list_content(SCOPE, dataset)]
    reps = client.list_replicas([{"scope": SCOPE, "name": n} for n in names]) if names else []
    return {r["name"]: r for r in reps}


def test_event_service_ranges_go_to_rucio_by_the_queue_acopytools(
    rucio_server, rucio_client, tmp_path, unique
) -> None:
    dataset = f"es.{unique}_sub0"
    with EmbeddedServer(tmp_path / "panda.db") as server:
        load_queue(
            server.store,
            {
                "nickname": "ESQ",
                "panda_resource": "ESQ",
                "copytools": {"rucio": {}, "copy": {}},
                "acopytools": {"pr": ["copy"], "pw": ["rucio"], "es_events": ["rucio"]},
            },
        )
        (panda_id,) = server.load_task(es_task("ESQ", dataset, 8, f"log.{unique}.tgz"))["PandaIDs"]
        proc = subprocess.run(
            [PYTHON, "-m", "pilot.cli", "run", "--url", server.url, "--queue", "ESQ"]
            + ["--workdir", str(tmp_path / "w"), "--kill-grace", "2"]
            + ["--token-file", str(server.token_file)],
            env={**os.environ, "RUCIO_CONFIG": str(rucio_server.client_config)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (record,) = server.final_records(panda_id)
        assert record["fields"]["state"] == "finished"
        rows = server.store.query("SELECT status, COUNT(*) AS n FROM ranges GROUP BY status")
        assert {r["status"]: r["n"] for r in rows} == {"finished": 8}
    reps = registered(rucio_client, dataset)
    outputs = {n: r for n, r in reps.items() if n.startswith("toysim.")}
    assert len(outputs) == 8 and f"log.{unique}.tgz" in reps
    assert all(list(r["rses"]) == ["LOCAL_DISK2"] and r["adler32"] for r in outputs.values())
    assert not list((tmp_path / "w").glob("storage/**/toysim.*"))  # nothing went to the copy path
    traces = wait_for_traces(
        rucio_server, lambda ts: {t.get("filename") for t in ts} >= set(outputs)
    )
    puts = [t for t in traces if t.get("filename") in outputs]
    assert len(puts) == 8 and {t["eventType"] for t in puts} == {"put_sm"}


@pytest.mark.mpi
@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")
def test_pilot_hpc_droids_store_range_outputs_through_rucio(
    rucio_server, rucio_client, tmp_path, unique, monkeypatch
) -> None:
    dataset = f"hpc.{unique}_sub0"
    monkeypatch.setenv("RUCIO_CONFIG", str(rucio_server.client_config))
    server = EmbeddedServer(tmp_path / "server.db").start()
    launched = Launched()
    try:
        task = es_task("MPIQ", dataset, 12, f"log.hpc.{unique}.tgz")
        task["job"]["transformation"] = sys.executable
        server.load_task(task)
        work = tmp_path / "work"
        work.mkdir()
        rc = wait(launched.start(server, work, "--copytool", "rucio", n=3), timeout=240)
        assert rc == 0, (work.parent / "work.mpiexec.log").read_text()[-3000:]
        rows = server.store.query("SELECT status, COUNT(*) AS n FROM ranges GROUP BY status")
        assert {r["status"]: r["n"] for r in rows} == {"finished": 12}
        (job,) = server.store.jobs()
        final = job["final"] if isinstance(job["final"], dict) else json.loads(job["final"])
    finally:
        launched.cleanup()
        server.stop()
    stored = journal_outputs(work / "yoda.journal")
    assert len(stored) == 12
    assert all(path.startswith("file://localhost/") for path, _, _ in stored.values())
    reps = registered(rucio_client, dataset)
    by_pfn = {r["rses"]["LOCAL_DISK2"][0]: r for r in reps.values()}
    for path, fsize, adler in stored.values():
        assert by_pfn[path]["adler32"] == adler and by_pfn[path]["bytes"] == fsize
    assert not list(Path(work).glob("storage/**/*"))
    # rank 0's log tarball went the same way, was traced, and is in the final update
    log = f"log.hpc.{unique}.tgz"
    assert final["state"] == "finished" and log in json.loads(final["xml"]), final
    assert list(reps[log]["rses"]) == ["LOCAL_DISK2"] and reps[log]["adler32"]
    assert json.loads(final["xml"])[log]["adler32"] == reps[log]["adler32"]
    traces = wait_for_traces(rucio_server, lambda ts: log in {t.get("filename") for t in ts})
    assert [t["eventType"] for t in traces if t.get("filename") == log] == ["put_sm"]
