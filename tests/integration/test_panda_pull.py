"""Pull mode over the wire: three jobs from the dispatcher through the real workflow.

pull_jobs + PandaUpstream + the pilot's own run_job against an
EmbeddedServer: one job finishes, one fails with the payload's exit code,
one is cancelled on the server and killed through the heartbeat's
``command=tobekilled`` (1144 PANDAKILL). The server holds one final record
per job, with the right codes.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

from pilot.comm.panda import PandaClient, PandaUpstream, pull_jobs
from pilot.comm.spool import Spool
from pilot.config import PilotConfig
from pilot.job import Job
from pilot.server.serve import EmbeddedServer
from pilot.workflow import run_job
from tests.conftest import REPO, job_dict

BEHAVE = str(REPO / "tests" / "payloads" / "behave.py")


def _cancel_when_running(server: EmbeddedServer, panda_id: int, done: threading.Event) -> None:
    delay = 0.05
    while not done.is_set():
        record = server.store.job(panda_id)
        if record and record["status"] in ("starting", "running"):
            server.store.cancel_job(panda_id)
            return
        done.wait(delay)
        delay = min(delay * 2, 0.5)


def test_three_jobs_pulled_and_reported(tmp_path: Path, config: PilotConfig) -> None:
    config = dataclasses.replace(config, heartbeat_interval=0.5)
    with EmbeddedServer(tmp_path / "server.db") as server:
        jobs = []
        for panda_id, pars in (
            (2001, f"{BEHAVE} write out.dat 1000"),
            (2002, f"{BEHAVE} exit 7 boom"),
            (2003, f"{BEHAVE} sleep 60"),
        ):
            d = job_dict(panda_id, jobpars=pars, computingSite=config.site_name)
            if panda_id == 2001:
                d.update(outFiles="out.dat,log.2001.tgz", scopeOut="test")
            jobs.append(d)
        server.load_jobs(jobs)
        client = PandaClient(server.url, token=server.token, retries=1, backoff=0.05)
        upstream = PandaUpstream(client, Spool(tmp_path / "spool"), site_name=config.site_name)
        done = threading.Event()
        killer = threading.Thread(target=_cancel_when_running, args=(server, 2003, done))
        killer.start()
        states = {}
        try:
            for definition, seconds in pull_jobs(client, config.site_name, mem=2000):
                job = Job.from_panda(definition)
                result = run_job(job, config, upstream, getjob_seconds=seconds)
                states[job.panda_id] = result.state
        finally:
            done.set()
            killer.join(10)
        assert states == {2001: "finished", 2002: "failed", 2003: "failed"}
        finals = {r["panda_id"]: r["fields"] for r in server.final_records()}
        assert sorted(finals) == [2001, 2002, 2003]
        assert finals[2001]["pilotErrorCode"] == "0"
        assert "out.dat" in json.loads(finals[2001]["xml"])
        assert (finals[2002]["pilotErrorCode"], finals[2002]["transExitCode"]) == ("1305", "7")
        assert finals[2003]["pilotErrorCode"] == "1144"
        assert upstream.spool.pending() == []
        assert [server.store.job(p)["status"] for p in (2001, 2002, 2003)] == [
            "finished",
            "failed",
            "failed",
        ]


def test_server_down_mid_job_final_update_arrives_once(tmp_path: Path, config: PilotConfig) -> None:
    config = dataclasses.replace(config, heartbeat_interval=0.5)
    db = tmp_path / "server.db"
    server = EmbeddedServer(db).start()
    port, client_token = server.port, server.token
    server.load_jobs(job_dict(3001, jobpars=f"{BEHAVE} sleep 3"))
    client = PandaClient(server.url, token=server.token, retries=1, backoff=0.05)
    upstream = PandaUpstream(client, Spool(tmp_path / "spool"), site_name=config.site_name)
    ((definition, _),) = list(pull_jobs(client, config.site_name, max_jobs=1))
    done = threading.Event()

    def stop_when_running() -> None:
        delay = 0.05
        while not done.is_set():
            if server.store.job(3001)["status"] in ("starting", "running"):
                server.stop()
                return
            done.wait(delay)
            delay = min(delay * 2, 0.5)

    stopper = threading.Thread(target=stop_when_running)
    stopper.start()
    try:
        result = run_job(Job.from_panda(definition), config, upstream)
    finally:
        done.set()
        stopper.join(10)
    assert result.state == "finished", result.pilot_error_diag
    assert result.extra["final_update_delivered"] is False
    assert len(upstream.spool.pending()) == 1  # kept on disk, not lost
    server = EmbeddedServer(db, port=port, token=client_token).start()
    try:
        assert upstream.flush() == (1, 0)
        assert upstream.flush() == (0, 0)
        (record,) = server.final_records(3001)
        assert record["fields"]["state"] == "finished"
        assert server.store.job(3001)["status"] == "finished"
    finally:
        server.stop()
