"""Faults under a real mpiexec (Open MPI with ULFM) against the embedded dispatcher.

Each test breaks something on purpose (a rank, a payload, the upstream, the
walltime) and then checks the invariant: every range handed out ends in
exactly one accepted terminal report or is released; none is updated twice;
every finished output exists with its checksum.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.mpi.harness import (
    accepted_terminal,
    invariant,
    load_task,
    mpiexec,
    ranks,
    wait,
    wait_for,
)
from yoda.journal import replay
from yoda.ledger import State

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")]
SLOW = "--cpu-per-event 0.05"  # 2 events per range: ~0.1 s of CPU per range


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    return w


def test_sigkill_of_a_droid_rank_its_ranges_finish_elsewhere(server, launched, work):
    load_task(server, 1, 40, SLOW)
    proc = launched.start(server, work)
    wait_for(lambda: accepted_terminal(server) >= 5, 60, "first results")
    victim = ranks(proc)[2]
    # its payload outlives a SIGKILLed droid (a batch system's cgroup would end it at
    # the job's end): this test ends it, so that it does not wait on a dead channel
    payload = victim.children(recursive=True)
    victim.kill()
    for p in payload:
        with contextlib.suppress(psutil.Error):
            p.kill()
    wait(proc, 120)
    problems, counts = invariant(server, work)
    assert problems == []
    assert counts == {"finished": 40}
    log = (work / "logs" / "rank0.log").read_text()
    assert "droid rank 2 is dead" in log


def test_sigkill_of_a_payload_the_droid_restarts_it(server, launched, work):
    load_task(server, 1, 30, SLOW)
    proc = launched.start(server, work, n=3)
    wait_for(lambda: accepted_terminal(server) >= 3, 60, "first results")
    droid = ranks(proc)[1]

    def payload():
        try:
            kids = droid.children(recursive=True)
        except psutil.NoSuchProcess:  # a child vanished while the tree was read
            return None
        for p in kids:
            try:
                if "toysim" in " ".join(p.cmdline()):
                    return p
            except psutil.NoSuchProcess:  # a short-lived child that is already gone
                continue
        return None

    wait_for(lambda: payload() is not None, 30, "a payload")
    payload().kill()
    rc = wait(proc, 120)
    problems, counts = invariant(server, work)
    assert problems == []
    assert counts["finished"] + counts["failed"] == 30 and counts["finished"] >= 28
    assert "restart 1" in (work / "logs" / "rank1.log").read_text()
    assert rc == 0


def test_sigkill_of_rank_0_then_resume_reports_nothing_twice(server, launched, work):
    load_task(server, 1, 40, SLOW)
    proc = launched.start(server, work)
    wait_for(lambda: accepted_terminal(server) >= 8, 60, "first results")
    procs = ranks(proc)
    procs[0].kill()
    # the droids see rank 0 die (ULFM), stop their payloads and leave
    wait_for(
        lambda: not any(p.is_running() and p.status() != "zombie" for p in procs.values()),
        60,
        "droids gone",
    )
    launched.cleanup()  # mpiexec itself, as the batch system would end it
    before = accepted_terminal(server)
    assert before < 40
    rc = wait(launched.start(server, work, "--resume"), 120)
    problems, counts = invariant(server, work)
    assert problems == []
    assert counts == {"finished": 40}
    assert rc == 0
    assert replay(work / "yoda.journal").epoch == 2


def test_sigterm_to_every_rank_drains_and_loses_nothing(server, launched, work):
    load_task(server, 1, 60, SLOW)
    proc = launched.start(server, work, "--term-grace", "20")
    wait_for(lambda: accepted_terminal(server) >= 5, 60, "first results")
    for p in ranks(proc).values():
        p.send_signal(signal.SIGTERM)
    rc = wait(proc, 90)
    assert rc == 0
    rep = replay(work / "yoda.journal")
    led = rep.ledger
    assert led.count(State.LEASED) == 0 and not rep.unsent
    assert int(led.rows["tries"][: led.n].max()) == 0  # the walltime charges nobody
    released = {led.range_id(r) for r in range(led.n) if led.state(r) is State.READY}
    problems, counts = invariant(server, work, require_all=False)
    assert problems == []
    dispatched = counts["finished"] + counts["sent"]
    assert counts["sent"] == len(released) and dispatched == led.n
    # the next allocation finishes the rest
    assert wait(launched.start(server, work, "--resume"), 120) == 0
    problems, counts = invariant(server, work)
    assert problems == [] and counts == {"finished": 60}
    assert [j["status"] for j in server.store.jobs()] == ["finished"]  # only after the resume


def test_a_hanging_payload_is_killed_by_its_lease(server, launched, work):
    load_task(server, 1, 16, "--hang-on-event 9")  # event 9 is in range 5
    rc = wait(launched.start(server, work, "--lease", "4", n=3), 120)
    problems, counts = invariant(server, work)
    assert problems == []
    assert counts == {"finished": 15, "failed": 1}
    hung = [r for r in server.store.ranges() if r["status"] == "failed"]
    assert hung[0]["range_id"].split("-")[3] == "5" and hung[0]["error_code"] == 1375  # LEASETIME
    assert rc == 0


def test_upstream_down_for_a_while_every_update_arrives_once(server, launched, work, tmp_path):
    from pilot.server.serve import EmbeddedServer

    load_task(server, 1, 40, SLOW)
    proc = launched.start(server, work, "--retry-max", "2")
    wait_for(lambda: accepted_terminal(server) >= 5, 60, "first results")
    port = server.port
    server.stop()
    log = work / "logs" / "rank0.log"  # the dispatcher is down: Yoda backs off, droids go on
    wait_for(lambda: "updateEventRanges failed" in log.read_text(), 60, "an update held back")
    again = EmbeddedServer(tmp_path / "server.db", port=port, token=server.token).start()
    try:
        rc = wait(proc, 120)
        problems, counts = invariant(again, work)
        assert problems == []
        assert counts == {"finished": 40}
        assert rc == 0
    finally:
        again.stop()


def test_walltime_end_drains_in_time_and_charges_nobody(server, launched, work):
    load_task(server, 1, 120, "--cpu-per-event 0.25")  # ~0.5 s of CPU per range
    end = time.time() + 30
    proc = launched.start(server, work, "--walltime-end", str(end), "--drain-lead", "18")
    rc = wait(proc, 60)
    assert rc == 0 and time.time() < end  # out before the batch system's kill
    rep = replay(work / "yoda.journal")
    led = rep.ledger
    assert led.count(State.LEASED) == 0 and not rep.unsent
    assert led.count(State.READY) > 0 and led.count(State.FINISHED) > 0
    assert int(led.rows["tries"][: led.n].max()) == 0
    problems, counts = invariant(server, work, require_all=False)
    assert problems == []
    assert counts["sent"] == led.count(State.READY)  # handed out upstream, released here
    assert "DRAIN" in (work / "logs" / "rank1.log").read_text()
