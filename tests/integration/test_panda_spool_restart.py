"""The server stops mid-job and comes back: the final update arrives exactly once."""

from __future__ import annotations

from pathlib import Path

from pilot.comm.panda import PandaClient, PandaUpstream
from pilot.comm.spool import Spool, flush_spool
from pilot.job import Job
from pilot.server.serve import EmbeddedServer

FINAL = {"state": "finished", "transExitCode": 0, "pilotErrorCode": 0, "cpuConsumptionTime": 3}


def test_final_update_spooled_and_delivered_once(tmp_path: Path) -> None:
    db = tmp_path / "server.db"
    server = EmbeddedServer(db, token="t").start()
    port = server.port
    (pid,) = server.load_jobs({"transformation": "/bin/true"})
    client = PandaClient(server.url, token=server.token, retries=1, backoff=0.01)
    spool = Spool(tmp_path / "spool")
    upstream = PandaUpstream(client, spool, site_name="Q", node="n1")
    job = Job.from_panda(client.get_job("Q"))
    assert upstream.heartbeat(job, {"state": "running"}) is None
    server.stop()  # the server goes away mid-job

    assert upstream.heartbeat(job, {"state": "running"}) is None  # not fatal
    assert upstream.final_update(job, FINAL) is False
    (entry,) = spool.pending()
    assert entry.method == "updateJob" and entry.fields["jobId"] == pid
    assert spool.flush(client) == (0, 1)  # still down: kept

    server = EmbeddedServer(db, port=port, token="t").start()
    try:
        # the pilot died after sending and before deleting: the update goes twice
        assert client.post(entry.method, entry.fields).ok
        assert upstream.flush() == (1, 0)  # what the next pilot does at start
        assert spool.pending() == []
        (record,) = server.final_records(pid)
        assert record["fields"]["state"] == "finished"
        assert record["fields"]["node"] == "n1"
        dispositions = [u["disposition"] for u in server.store.updates(pid)]
        assert dispositions == ["recorded", "recorded", "duplicate"]
        assert server.store.job(pid)["status"] == "finished"
    finally:
        server.stop()


def test_final_update_direct_and_spool_order(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "s.db") as server:
        first, second = server.load_jobs([{"transformation": "a"}, {"transformation": "b"}])
        client = PandaClient(server.url, token=server.token, retries=0)
        spool = Spool(tmp_path / "spool")
        upstream = PandaUpstream(client, spool, site_name="Q")
        job1 = Job.from_panda(client.get_job("Q"))
        job2 = Job.from_panda(client.get_job("Q"))
        # an older undelivered update of job 1 waits in the spool
        spool.put("updateJob", {"jobId": first, "state": "failed", "pilotErrorCode": 1318})
        assert upstream.final_update(job2, FINAL) is True
        assert spool.pending() == []
        records = server.final_records()
        assert (
            [r["panda_id"] for r in records]
            == [job1.panda_id, job2.panda_id]
            == [
                first,
                second,
            ]
        )
        # refused for good (a state PanDA does not know): kept aside, never lost, never
        # retried forever; on /api/v1 that is success false, on the legacy API a 4xx
        spool.put("updateJob", {"jobId": second, "state": "lost"})
        assert flush_spool(spool.directory, client) == 0
        legacy = PandaClient(server.url, token=server.token, retries=0, api="legacy")
        spool.put("updateJob", {"jobId": 5555, "state": "failed"})  # legacy: unknown job
        assert flush_spool(spool.directory, legacy) == 0
        assert [e.fields["jobId"] for e in spool.rejected()] == [second, 5555]


def test_server_command_reaches_heartbeat(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "s.db") as server:
        (pid,) = server.load_jobs({"transformation": "x"})
        client = PandaClient(server.url, token=server.token, retries=0)
        upstream = PandaUpstream(client, Spool(tmp_path / "spool"), site_name="Q")
        job = Job.from_panda(client.get_job("Q"))
        server.store.cancel_job(pid)
        assert upstream.heartbeat(job, {"state": "running"}) == "tobekilled"
