"""The dispatcher's store keeps PanDA's rules (real SQLite, no HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilot.server import loading
from pilot.server.db import Store, StoreError


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "d.db")
    yield s
    s.close()


def _task(store: Store, n: int = 4, **extra) -> dict:
    task = {"job": {"transformation": "run.sh"}, "nRanges": n, "nEventsPerRange": 10, **extra}
    return loading.load_task(store, task)


def test_job_dispatched_once_and_by_site(store: Store) -> None:
    a, b = loading.load_jobs(
        store,
        [
            {"transformation": "/bin/true", "computingSite": "A"},
            {"transformation": "/bin/true", "computingSite": "B"},
        ],
    )
    job = store.dispatch_job("B", "node1")
    assert job["PandaID"] == b and job["attemptNr"] == 1
    assert store.dispatch_job("B", "node1") is None
    assert store.dispatch_job("A", "node1")["PandaID"] == a
    assert store.job(b)["status"] == "sent" and store.job(b)["node"] == "node1"


def test_load_rejects_bad_and_duplicate_jobs(store: Store) -> None:
    with pytest.raises(StoreError, match="transformation"):
        loading.load_jobs(store, [{"PandaID": 5}])
    loading.load_jobs(store, [{"PandaID": 5, "transformation": "x"}])
    with pytest.raises(StoreError, match="already exists"):
        loading.load_jobs(store, [{"PandaID": 5, "transformation": "x"}])
    with pytest.raises(StoreError):
        loading.load_jobs(store, [{"PandaID": "abc", "transformation": "x"}])
    with pytest.raises(StoreError):
        loading.load_jobs(store, [])
    # all or none: the good first job of a failing load is not kept
    with pytest.raises(StoreError):
        loading.load_jobs(store, [{"PandaID": 9, "transformation": "x"}, "garbage"])
    assert store.job(9) is None


def test_task_ranges_have_panda_ids(store: Store) -> None:
    t = _task(store, n=3, jediTaskID=77, nJobs=2, fileID=5, LFN="EVNT.root")
    assert t["jediTaskID"] == 77 and len(t["PandaIDs"]) == 2
    p1, p2 = t["PandaIDs"]
    ids = [r["range_id"] for r in store.ranges(p2)]
    assert ids == [f"77-{p2}-5-{k}-1" for k in (4, 5, 6)]
    starts = [r["start_event"] for r in store.ranges(p1) + store.ranges(p2)]
    assert starts == [0, 10, 20, 30, 40, 50]
    assert store.job(p1)["definition"]["eventService"] == "True"


def test_ranges_only_for_dispatched_job_and_once(store: Store) -> None:
    (pid,) = _task(store)["PandaIDs"]
    assert store.dispatch_ranges(pid, 2) == []  # not dispatched yet
    assert store.dispatch_ranges(999_999, 2) is None
    store.dispatch_job("Q", "n")
    first = store.dispatch_ranges(pid, 3)
    second = store.dispatch_ranges(pid, 3)
    assert len(first) == 3 and len(second) == 1
    assert not {r["eventRangeID"] for r in first} & {r["eventRangeID"] for r in second}
    assert store.dispatch_ranges(pid, 3) == []


def test_range_update_rules(store: Store) -> None:
    (pid,) = _task(store)["PandaIDs"]
    store.dispatch_job("Q", "n")
    r1, r2 = (r["eventRangeID"] for r in store.dispatch_ranges(pid, 2))
    undispatched = store.ranges(pid)[3]["range_id"]
    entries = [
        {"eventRangeID": r1, "eventStatus": "running"},
        {"eventRangeID": r1, "eventStatus": "finished", "cpuConsumptionTime": "1.5"},
        {"eventRangeID": r1, "eventStatus": "failed"},  # second terminal status
        {"eventRangeID": r2, "eventStatus": "fatal", "errorCode": 1228, "errorDiag": "x" * 999},
        {"eventRangeID": undispatched, "eventStatus": "finished"},
        {"eventRangeID": "1-2-3-4-5", "eventStatus": "finished"},
    ]
    returns, commands = store.update_ranges(entries)
    assert returns == [True, True, False, True, False, False]
    assert commands == {}
    by_id = {r["range_id"]: r for r in store.ranges(pid)}
    assert by_id[r1]["status"] == "finished" and by_id[r1]["cpu"] == 1.5
    assert by_id[r2]["error_code"] == 1228 and len(by_id[r2]["error_diag"]) == 256
    assert store.range_update_counts() == {r1: 1, r2: 1}


def test_retry_makes_new_attempt_and_refuses_old_ranges(store: Store) -> None:
    (pid,) = _task(store, n=2)["PandaIDs"]
    store.dispatch_job("Q", "n")
    done, pending = (r["eventRangeID"] for r in store.dispatch_ranges(pid, 2))
    assert store.update_ranges([{"eventRangeID": done, "eventStatus": "finished"}])[0] == [True]
    assert store.retry_job(pid) == 2
    # the old attempt's range can no longer be reported
    assert store.update_ranges([{"eventRangeID": pending, "eventStatus": "finished"}])[0] == [False]
    job = store.dispatch_job("Q", "n")
    assert job["attemptNr"] == 2
    fresh = store.dispatch_ranges(pid, 5)
    assert [r["eventRangeID"] for r in fresh] == [pending.rsplit("-", 1)[0] + "-2"]
    # an update from the old attempt's pilot is told to stop
    result = store.update_job(pid, "running", {"attemptNr": "1"})
    assert (result.command, result.disposition) == ("tobekilled", "stale")


def test_final_update_recorded_once(store: Store) -> None:
    (pid,) = loading.load_jobs(store, [{"transformation": "x"}])
    store.dispatch_job("Q", "n")
    assert store.update_job(pid, "running", {"state": "running"}).disposition == "recorded"
    first = store.update_job(pid, "failed", {"state": "failed", "pilotErrorCode": "1305"})
    again = store.update_job(pid, "failed", {"state": "failed", "pilotErrorCode": "1305"})
    late = store.update_job(pid, "running", {"state": "running"})
    assert (first.disposition, again.disposition, late.disposition) == (
        "recorded",
        "duplicate",
        "late",
    )
    assert again.status_code == 0 and again.command == "NULL"
    finals = store.final_records()
    assert len(finals) == 1 and finals[0]["fields"]["pilotErrorCode"] == "1305"
    assert store.job(pid)["status"] == "failed"
    assert store.update_job(424242, "running", {}).status_code == 30


def test_cancel(store: Store) -> None:
    waiting, running = loading.load_jobs(store, [{"transformation": "x"}, {"transformation": "y"}])
    assert store.dispatch_job("Q", "n")["PandaID"] == waiting
    assert store.cancel_job(running) == "cancelled"  # never dispatched
    assert store.dispatch_job("Q", "n") is None
    assert store.cancel_job(waiting) == "tobekilled"
    assert store.update_job(waiting, "running", {}).command == "tobekilled"
    assert store.update_job(waiting, "failed", {"pilotErrorCode": 1144}).disposition == "recorded"
    assert store.cancel_job(waiting) == "failed"
    assert store.cancel_job(31337) is None


def test_traces_and_queues(store: Store) -> None:
    assert store.add_traces([{"eventType": "get_sm"}, {"eventType": "put_sm"}]) == 2
    assert [t["eventType"] for t in store.traces()] == ["get_sm", "put_sm"]
    store.put_queue("Q", {"nickname": "Q"})
    assert store.get_queue("Q") == {"nickname": "Q"} and store.get_queue("R") is None


def test_store_reopens_with_its_data(tmp_path: Path) -> None:
    s = Store(tmp_path / "d.db")
    (pid,) = loading.load_jobs(s, [{"transformation": "x"}])
    s.close()
    s = Store(tmp_path / "d.db")
    assert s.job(pid)["status"] == "activated"
    assert s.summary()[0]["panda_id"] == pid
    s.close()
