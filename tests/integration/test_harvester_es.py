"""An event-service task through Harvester's shared files, with a stand-in Harvester."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from pilot.comm.harvester import HarvesterAccessPoint, HarvesterEventSource, HarvesterUpstream
from pilot.eventservice.executor import EventExecutor
from pilot.eventservice.outputs import adler32_of
from pilot.fileio import atomic_write_json
from pilot.onenode import OneNode, run_event_service

PANDA_ID = 4242


class StandInHarvester(threading.Thread):
    """Does what Harvester's shared-file messenger does, from its side.

    Answers event requests from its pool of ranges (an empty list once it is
    exhausted) and deletes the request; takes the stage-out dump by renaming
    it to ``.read``, processes it and renames it to ``.read.<time>``.
    Optionally starts by writing a truncated ranges file, as a writer caught
    in the middle would leave it.
    """

    def __init__(self, ap: Path, n_ranges: int, *, garbage_first: bool = False) -> None:
        super().__init__(daemon=True)
        self.ap = ap
        self.pool = [
            {
                "eventRangeID": f"9-{PANDA_ID}-1-{i}-1",
                "startEvent": 3 * i,
                "lastEvent": 3 * i + 2,
                "LFN": "EVNT.pool.root",
                "GUID": "C0FFEE",
                "scope": "mc",
            }
            for i in range(n_ranges)
        ]
        self.handed_out: set[str] = set()
        self.dump: dict[str, dict] = {}
        self.duplicates: list[str] = []
        self.requests = 0
        self.garbage_first = garbage_first
        self.stop_event = threading.Event()

    def run(self) -> None:
        for _ in range(100_000):
            self.sweep()
            if self.stop_event.wait(0.02):
                break
        self.sweep()

    def sweep(self) -> None:
        request = self.ap / "worker_requestevents.json"
        ranges_file = self.ap / "JobsEventRanges.json"
        if request.exists() and not ranges_file.exists():
            wanted = json.loads(request.read_text())[str(PANDA_ID)]["nRanges"]
            self.requests += 1
            if self.garbage_first:
                self.garbage_first = False
                ranges_file.write_text(f'{{"{PANDA_ID}": [{{"eventRangeID": ')
                time.sleep(0.3)
            give, self.pool = self.pool[:wanted], self.pool[wanted:]
            self.handed_out.update(r["eventRangeID"] for r in give)
            atomic_write_json(ranges_file, {str(PANDA_ID): give})
            request.unlink()
        dump = self.ap / "event_status.dump.json"
        taken = self.ap / "event_status.dump.json.read"
        if dump.exists() and not taken.exists():
            try:
                os.rename(dump, taken)
            except FileNotFoundError:  # the pilot is merging into it right now
                pass
        if taken.exists():
            for entry in json.loads(taken.read_text())[str(PANDA_ID)]:
                rid = entry["eventRangeID"]
                if rid in self.dump:
                    self.duplicates.append(rid)
                self.dump[rid] = entry
            os.rename(taken, self.ap / f"event_status.dump.json.read.{time.time_ns()}")


def job_file(ap: Path, pars: str = "") -> None:
    job = {
        "PandaID": PANDA_ID,
        "taskID": 9,
        "jobsetID": 8,
        "transformation": sys.executable,
        "jobPars": f"-m pilot.payloads.toysim {pars}".strip(),
        "eventService": "True",
    }
    atomic_write_json(ap / "HPCJobs.json", {str(PANDA_ID): job})


def run(tmp_path: Path, n: int, pars: str = "", garbage_first: bool = False):
    ap_dir = tmp_path / "ap"
    ap_dir.mkdir()
    job_file(ap_dir, pars)
    harvester = StandInHarvester(ap_dir, n, garbage_first=garbage_first)
    harvester.start()
    try:
        ap = HarvesterAccessPoint(ap_dir)
        (job,) = ap.read_jobs()
        source = HarvesterEventSource(ap, wait_timeout=30, first_delay=0.02)
        work = ap_dir / "work"
        summary = run_event_service(
            job,
            work,
            source,
            OneNode(batch_size=100, report_interval=0.5, n_ranges_per_request=50),
            executor=EventExecutor(job, work, output_dir=ap_dir / "outputs"),
        )
        HarvesterUpstream(ap).final_update(job, {"state": "finished", **summary.job_fields()})
    finally:
        harvester.stop_event.set()
        harvester.join(30)
    return harvester, summary


def test_500_ranges_through_harvester_files(tmp_path):
    harvester, s = run(tmp_path, 500)
    assert s.error is None and s.n_finished == 500 and s.n_undelivered == 0
    assert not harvester.duplicates
    assert set(harvester.dump) == harvester.handed_out and len(harvester.dump) == 500
    for entry in harvester.dump.values():
        assert entry["eventStatus"] == "finished" and entry["type"] == "es_output"
        path = Path(entry["path"])
        assert path.parent == tmp_path / "ap" / "outputs"
        assert adler32_of(path) == entry["chksum"] and path.stat().st_size == entry["fsize"]
    attrs = json.loads((tmp_path / "ap" / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "finished" and attrs["nEvents"] == 1500
    assert (tmp_path / "ap" / "kill_worker.json").exists()


def test_crashes_and_a_truncated_ranges_file(tmp_path):
    harvester, s = run(
        tmp_path, 60, "--segfault-on-event 31 --fail-on-event 61", garbage_first=True
    )
    assert s.error is None and s.n_finished == 58 and s.n_failed == 2
    assert not harvester.duplicates and set(harvester.dump) == harvester.handed_out
    failed = {rid: e for rid, e in harvester.dump.items() if e["eventStatus"] == "failed"}
    assert set(failed) == {f"9-{PANDA_ID}-1-10-1", f"9-{PANDA_ID}-1-20-1"}
    assert all(e["errorCode"] == 1224 and "path" not in e for e in failed.values())
