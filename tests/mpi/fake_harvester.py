"""A stand-in for Harvester on the other side of the access point (a thread in the test).

It does what Harvester's shared-file messenger does with the files: answers
``worker_requestevents.json`` with ``JobsEventRanges.json`` (an empty list
when the job has no more) and deletes the request; takes
``event_status.dump.json`` by renaming it to ``.read``, reads it, and renames
it to ``.read.<time>``. Everything it handed out and read is recorded.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from tests.mpi.fake_upstream import make_ranges


class FakeHarvester:
    def __init__(self, root: Path, jobs: dict[int, int], task: int = 77) -> None:
        self.root = root
        self.left = {pid: make_ranges(task, pid, n) for pid, n in jobs.items()}
        self.dispatched: list[str] = []
        self.dump: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        definitions = {
            str(pid): {
                "PandaID": pid,
                "taskID": task,
                "jobsetID": task,
                "transformation": os.environ.get("PYTHON", "python3"),
                "jobPars": "-m pilot.payloads.toysim",
                "eventService": "True",
                "coreCount": 1,
            }
            for pid in jobs
        }
        (root / "HPCJobs.json").write_text(json.dumps(definitions))

    def start(self) -> FakeHarvester:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._take_dumps()

    def _write(self, path: Path, obj) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)

    def _serve(self) -> None:
        for pid in list(self.left):
            d = self.root / str(pid)
            req, out = d / "worker_requestevents.json", d / "JobsEventRanges.json"
            if not req.exists() or out.exists():
                continue
            try:
                n = int(json.loads(req.read_text())[str(pid)]["nRanges"])
            except (ValueError, KeyError):
                continue  # half written: next turn
            give, self.left[pid] = self.left[pid][:n], self.left[pid][n:]
            self.dispatched += [r["eventRangeID"] for r in give]
            self._write(out, {str(pid): give})
            req.unlink()

    def _take_dumps(self) -> None:
        for dump in self.root.glob("*/event_status.dump.json"):
            taken = dump.with_name(dump.name + ".read")
            os.replace(dump, taken)
            for entries in json.loads(taken.read_text()).values():
                self.dump += entries
            os.replace(taken, dump.with_name(f"{dump.name}.read.{time.time_ns()}"))

    def _run(self) -> None:
        delay = 0.05
        for _ in range(20_000):  # bounded
            if self._stop.is_set():
                return
            self._serve()
            self._take_dumps()
            time.sleep(delay)
