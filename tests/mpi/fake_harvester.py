"""A stand-in for Harvester on the other side of the access point (a thread in the test).

It follows Harvester's ``SharedFileMessenger`` layout: a OneToOne worker has
its one job's spec, the event request and the event ranges at the top of
the access point. It answers ``worker_requestevents.json`` by writing
``JobsEventRanges.json`` in place (not atomically, as Harvester does; an
empty list when the job has no more) and deleting the request; takes
``event_status.dump.json`` by renaming it to ``.read``, reads it, and
renames it to ``.read.<time>``. Everything it handed out and read is
recorded. Tests that can use Harvester's own messenger do so
(``tests/real_harvester.py``); this one runs where it is absent.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from tests.mpi.fake_upstream import make_ranges


class FakeHarvester:
    def __init__(
        self, root: Path, panda_id: int, n_ranges: int, task: int = 77, pars: str = ""
    ) -> None:
        self.root = root
        self.panda_id = panda_id
        self.left = make_ranges(task, panda_id, n_ranges)
        self.dispatched: list[str] = []
        self.dump: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        definition = {
            "PandaID": panda_id,
            "taskID": task,
            "jobsetID": task,
            "transformation": os.environ.get("PYTHON", "python3"),
            "jobPars": f"-m pilot.payloads.toysim {pars}".strip(),
            "eventService": "True",
            "coreCount": 1,
        }
        with open(root / "HPCJobs.json", "w") as fh:  # in place, as Harvester's feed_jobs
            json.dump({str(panda_id): definition}, fh)
        (root / "worker_pandaids.json").write_text(json.dumps([panda_id]))

    def start(self) -> FakeHarvester:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._take_dumps()
        # Ranges still in a file the pilot never took were not handed to it: a worker
        # that ended before reading them leaves them with Harvester, as the real one does.
        out = self.root / "JobsEventRanges.json"
        if out.exists():
            untaken = {
                r["eventRangeID"] for r in json.loads(out.read_text()).get(str(self.panda_id), [])
            }
            self.dispatched = [rid for rid in self.dispatched if rid not in untaken]

    def _serve(self) -> None:
        req, out = self.root / "worker_requestevents.json", self.root / "JobsEventRanges.json"
        if not req.exists() or out.exists():
            return
        try:
            n = int(json.loads(req.read_text())[str(self.panda_id)]["nRanges"])
        except (ValueError, KeyError):
            return  # half written: next turn
        give, self.left = self.left[:n], self.left[n:]
        self.dispatched += [r["eventRangeID"] for r in give]
        with open(out, "w") as fh:  # in place, as Harvester's feed_events
            json.dump({str(self.panda_id): give}, fh)
        req.unlink()

    def _take_dumps(self) -> None:
        dump = self.root / "event_status.dump.json"
        if not dump.exists():
            return
        taken = dump.with_name(dump.name + ".read")
        try:
            os.replace(dump, taken)
        except FileNotFoundError:  # the pilot is merging into it right now
            return
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
