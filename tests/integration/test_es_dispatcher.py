"""An event-service task through the embedded dispatcher over real HTTP."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pilot.comm.panda import PandaClient
from pilot.eventservice.outputs import adler32_of
from pilot.job import Job
from pilot.onenode import OneNode, run_event_service
from pilot.server.serve import EmbeddedServer


@pytest.fixture
def server(tmp_path: Path):
    s = EmbeddedServer(tmp_path / "server.db", token="admintoken").start()
    yield s
    s.stop()


def dispatch(
    server: EmbeddedServer,
    client: PandaClient,
    n_ranges: int,
    pars: str = "",
    transformation: str = sys.executable,
) -> Job:
    server.load_task(
        {
            "nJobs": 1,
            "nRanges": n_ranges,
            "nEventsPerRange": 4,
            "job": {
                "transformation": transformation,
                "jobPars": f"-m pilot.payloads.toysim {pars}".strip(),
                "computingSite": "ESQ",
                "coreCount": 1,
            },
        }
    )
    definition = client.get_job("ESQ")
    assert definition is not None
    return Job.from_panda(definition)


def all_updates(server: EmbeddedServer) -> dict[str, int]:
    rows = server.store._query(
        "SELECT range_id, COUNT(*) AS n FROM range_updates GROUP BY range_id"
    )
    return {r["range_id"]: r["n"] for r in rows}


def test_500_ranges_each_reported_finished_once(server, tmp_path):
    client = PandaClient(server.url, token=server.token, retries=2, backoff=0.1)
    # as users write it: transformation python3, jobPars -m pilot.payloads.toysim
    job = dispatch(server, client, 500, transformation="python3")
    assert job.event_service
    s = run_event_service(job, tmp_path / "work", client, OneNode(batch_size=100))
    assert s.error is None and s.n_finished == 500 and s.n_undelivered == 0
    assert s.n_events == 2000
    ranges = server.store.ranges(job.panda_id)
    assert len(ranges) == 500 and {r["status"] for r in ranges} == {"finished"}
    assert set(all_updates(server).values()) == {1}  # sent once, accepted once
    assert set(server.store.range_update_counts().values()) == {1}
    by_id = {r.event_range_id: r for r in s.results}
    assert set(by_id) == {r["range_id"] for r in ranges}
    for r in by_id.values():
        assert Path(r.output_path).is_file() and adler32_of(Path(r.output_path)) == r.adler32
        assert Path(r.output_path).stat().st_size == r.fsize


def test_crashing_payload_fails_chosen_ranges_with_codes(server, tmp_path):
    client = PandaClient(server.url, token=server.token, retries=2, backoff=0.1)
    # ranges hold events 0-3, 4-7, ...: event 41 is in range 11, 201 in range 51
    job = dispatch(
        server, client, 120, "--segfault-on-event 41 --fail-on-event 201 --fatal-on-event 301"
    )
    s = run_event_service(job, tmp_path / "work", client, OneNode(batch_size=50))
    assert s.error is None and s.restarts == 1
    ranges = {r["range_id"].split("-")[3]: r for r in server.store.ranges(job.panda_id)}
    assert ranges["11"]["status"] == "failed" and ranges["11"]["error_code"] == 1224
    assert ranges["51"]["status"] == "failed" and ranges["51"]["error_code"] == 1224
    assert ranges["76"]["status"] == "fatal" and ranges["76"]["error_code"] == 1228
    others = [r for k, r in ranges.items() if k not in ("11", "51", "76")]
    assert len(others) == 117 and all(r["status"] == "finished" for r in others)
    assert set(all_updates(server).values()) == {1}
    assert (s.n_finished, s.n_failed, s.n_fatal) == (117, 2, 1)
