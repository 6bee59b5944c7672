"""Rank 0's upstream link: the child process, its answers, its death, and recovery of
ranges it fetched for a rank 0 that was killed before journaling them."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from droid.droid import Droid, DroidOptions
from droid.nullexec import NullExecutor
from hpc.transport import LocalHub
from hpc.wire import FINISHED, RESULT_DTYPE, ResultBatch
from pilot.errors import ErrorCode, PilotError
from tests.mpi.fake_upstream import make_ranges
from tests.mpi.invariants import check
from yoda.journal import Book, Journal
from yoda.ledger import Ledger
from yoda.link import IdParts, InlineLink, ProcessLink, Ranges, Updated, recover_fetched
from yoda.master import Yoda, YodaOptions
from yoda.scheduler import Policy, Scheduler

ROOT = str(Path(__file__).resolve().parents[2])
JOB = {"PandaID": 501, "taskID": 9, "jobsetID": 9, "transformation": "toysim"}


class FileUpstream:
    """Ranges from memory; every update appended to a JSON-lines file the test reads."""

    def __init__(self, n: int, updates: str, fail_updates: int = 0) -> None:
        self.left = make_ranges(9, 501, n)
        self.updates = updates
        self.fail_updates = fail_updates

    def get_event_ranges(self, panda_id, jobset_id, task_id, n_ranges):
        out, self.left = self.left[:n_ranges], self.left[n_ranges:]
        return out

    def update_event_ranges(self, entries, version=0):
        if self.fail_updates:
            self.fail_updates -= 1
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, "upstream down")
        with open(self.updates, "a") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in entries)
        return [True] * len(entries)


class Broken:
    def __init__(self) -> None:
        raise RuntimeError("no upstream here")


def spec(tmp_path: Path, n: int = 20, **kw) -> dict:
    kwargs = {"n": n, "updates": str(tmp_path / "updates.jsonl"), **kw}
    return {
        "factory": "tests.unit.test_yoda_link:FileUpstream",
        "kwargs": kwargs,
        "path": [ROOT],
        "fetched": str(tmp_path / "fetched"),
        "log": str(tmp_path / "link.log"),
    }


def answer(link, timeout=10.0):
    got = link.answers(timeout)
    assert len(got) == 1, got
    return got[0]


def results_for(book: Book, rows: np.ndarray) -> tuple[ResultBatch, IdParts]:
    cols = np.zeros(len(rows), dtype=RESULT_DTYPE)
    cols["row"], cols["key"], cols["state"] = rows, book.ledger.keys(rows), FINISHED
    n = len(rows)
    return ResultBatch(cols, [""] * n, [""] * n, [""] * n), IdParts(*book.ledger.id_parts(rows))


def test_fetch_update_and_dry_through_the_child(tmp_path):
    link = ProcessLink(spec(tmp_path, n=5))
    try:
        link.fetch(1, 0, 501, 9, 9, 3)
        got = answer(link)
        assert isinstance(got, Ranges) and got.job == 0 and len(got.intake.cols) == 3
        book = Book(Ledger(), None)
        book.add_job(JOB)
        rows = book.add_columns(0, got.intake.cols, got.intake.files)
        link.update(7, *results_for(book, rows))
        done = answer(link)
        assert isinstance(done, Updated) and done.req == 7 and done.ok.all()
        lines = (tmp_path / "updates.jsonl").read_text().splitlines()
        assert [json.loads(x)["eventRangeID"] for x in lines] == book.ledger.range_ids(rows)
        link.fetch(1, 0, 501, 9, 9, 10)
        assert len(answer(link).intake.cols) == 2
        link.fetch(1, 0, 501, 9, 9, 10)
        last = answer(link)
        assert last.intake is None and not last.error  # the job has no more ranges
    finally:
        link.close()


def test_sigterm_is_ignored_and_a_killed_child_is_replaced(tmp_path):
    link = ProcessLink(spec(tmp_path, n=50))
    try:
        os.kill(link._proc.pid, signal.SIGTERM)  # a walltime signal is rank 0's to handle
        link.fetch(1, 0, 501, 9, 9, 5)
        assert len(answer(link).intake.cols) == 5
        link.fetch(1, 0, 501, 9, 9, 5)
        link._proc.kill()
        link._proc.wait(10)
        got = answer(link)
        # Either the fetch was still out (answered as lost), or the child answered just
        # before the kill landed and the loss was seen right after: replaced either way.
        assert isinstance(got, Ranges) and got.error in ("link died", "")
        assert link.restarts == 1
        if not got.error:
            assert len(got.intake.cols) == 5
        link.fetch(1, 0, 501, 9, 9, 5)  # the new child starts from its own upstream object
        assert len(answer(link).intake.cols) == 5
    finally:
        link.close()


def test_an_upstream_that_cannot_be_built_is_a_pilot_error(tmp_path):
    with pytest.raises(PilotError, match="no upstream here"):
        ProcessLink({"factory": "tests.unit.test_yoda_link:Broken", "path": [ROOT]})


def test_ranges_fetched_but_never_journaled_are_recovered_once(tmp_path):
    link = ProcessLink(spec(tmp_path, n=8))
    try:
        link.fetch(1, 0, 501, 9, 9, 5)
        first = answer(link)
        link.fetch(1, 0, 501, 9, 9, 5)
        answer(link)  # rank 0 "died" before journaling this one
    finally:
        link.close()
    book = Book(Ledger(), Journal(tmp_path / "journal"))
    book.add_job(JOB)
    book.add_columns(0, first.intake.cols, first.intake.files)
    with open(tmp_path / "fetched", "ab") as fh:
        fh.write(b"\x03\x01")  # and the child was killed mid-write of a third
    assert recover_fetched(book, tmp_path / "fetched") == 3
    assert book.ledger.n == 8
    assert recover_fetched(book, tmp_path / "fetched") == 0  # already there: skipped


def run_yoda(tmp_path: Path, link, n_droids: int = 2) -> tuple[int, Yoda]:
    hub = LocalHub(n_droids + 1)
    book = Book(Ledger(), Journal(tmp_path / "journal"))
    book.epoch(1)
    book.add_job(JOB)
    policy = Policy(hb_interval=0.2, hb_timeout=5, high_per_slot=6, low_per_slot=3)
    options = YodaOptions(update_interval=0.05, retry_min=0.05, retry_max=0.2, bye_wait_s=5)
    yoda = Yoda(hub.endpoint(0), None, Scheduler(book, policy, epoch=1), options, link=link)

    def factory(job, wd, slots, lease_s):
        return NullExecutor(job, wd, slots, write_outputs=True)

    opts = DroidOptions(slots=2, update_interval=0.05, hello_timeout=10, yoda_timeout=20)
    droids = [Droid(hub.endpoint(r), tmp_path / f"d{r}", factory, opts) for r in (1, 2)]
    threads = [threading.Thread(target=d.run, daemon=True) for d in droids]
    for t in threads:
        t.start()
    rc = yoda.run(max_seconds=60)
    for t in threads:
        t.join(30)
    return rc, yoda


@pytest.mark.parametrize("kind", ["process", "inline"])
def test_yoda_reports_every_range_once_through_either_link(tmp_path, kind):
    s = spec(tmp_path, n=60, fail_updates=2)  # the upstream refuses the first two updates
    if kind == "process":
        link = ProcessLink(s)
    else:
        link = InlineLink(FileUpstream(**s["kwargs"]))
    rc, yoda = run_yoda(tmp_path, link)
    assert rc == 0 and yoda.reported == 60
    updates = [json.loads(x) for x in (tmp_path / "updates.jsonl").read_text().splitlines()]
    ids = [r["eventRangeID"] for r in make_ranges(9, 501, 60)]
    assert check(ids, updates) == []
