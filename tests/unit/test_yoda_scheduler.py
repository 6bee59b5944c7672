"""Scheduler rules, driven by messages and a fake clock (no MPI, no sleeping)."""

from __future__ import annotations

import numpy as np

from hpc.transport import Envelope, Kind
from hpc.wire import ResultBatch, WorkBatch
from pilot.eventservice.model import RangeResult, RangeStatus
from tests.unit.test_yoda_ledger import job, ranges
from yoda.journal import Book
from yoda.ledger import Ledger, State
from yoda.scheduler import Policy, Scheduler


def make(n=10, **kw):
    book = Book(Ledger(), None)
    j = book.add_job(job())
    book.add_ranges(j, ranges(n=n))
    pol = Policy(lease_s=100, hb_timeout=30, lease_grace=0, **kw)
    return Scheduler(book, pol, epoch=1)


def msg(kind, src, body=None, seq=0):
    return Envelope(kind, seq, 1, body, src)


def kinds(out):
    return [(dest, env.kind) for dest, env in out]


def hello(s, rank, slots=2, now=0.0):
    return s.on_message(msg(Kind.HELLO, rank, {"slots": slots, "node": f"n{rank}"}), now)


def results(s, rows, status=RangeStatus.FINISHED, keys=None):
    """An UPDATE body with a result for each of ``rows``."""
    rows = np.asarray(rows, dtype=np.int64)
    keys = s.ledger.keys(rows) if keys is None else keys
    items = [
        (row, key, RangeResult(s.ledger.range_id(row), status, cpu=1.0))
        for row, key in zip(rows.tolist(), np.asarray(keys).tolist())
    ]
    return ResultBatch.from_results(items).body()


def work_rows(out):
    """Rows of the WORK message in ``out``."""
    ((_, env),) = out
    assert env.kind is Kind.WORK
    return WorkBatch.from_body(env.body).cols["row"].tolist()


def test_hello_gets_config_and_requests_are_capped_by_the_high_watermark():
    s = make()
    out = hello(s, 1)
    assert kinds(out) == [(1, Kind.CONFIG)]
    assert out[0][1].body["jobs"][0]["PandaID"] == 1001
    out = s.on_message(msg(Kind.WORK_REQ, 1, {"want": 10}), 1.0)
    assert len(work_rows(out)) == 4  # high = 2 per slot
    assert s.ledger.count(State.LEASED) == 4


def test_unserved_request_is_served_when_ranges_arrive():
    s = make(n=0)
    hello(s, 1)
    assert s.on_message(msg(Kind.WORK_REQ, 1, {"want": 2}), 1.0) == []
    s.book.add_ranges(0, ranges(n=3))
    out = s.serve_waiting(2.0)
    assert len(work_rows(out)) == 2
    s.exhausted = True
    s.on_message(msg(Kind.WORK_REQ, 1, {"want": 4}), 3.0)  # gets the last one
    out = s.on_message(msg(Kind.WORK_REQ, 1, {"want": 1}), 3.0)
    none_left = WorkBatch.from_body(out[0][1].body)
    assert none_left.no_more and not len(none_left)  # upstream dry, nothing READY


def test_update_is_journaled_then_acked_and_late_results_dropped():
    s = make()
    hello(s, 1)
    rows = work_rows(s.on_message(msg(Kind.WORK_REQ, 1, {"want": 2}), 1.0))
    out = s.on_message(msg(Kind.UPDATE, 1, results(s, rows[:1]), seq=7), 2.0)
    assert kinds(out) == [(1, Kind.ACK)] and out[0][1].body["upto"] == 7
    assert s.ledger.state(rows[0]) is State.FINISHED
    assert s.book.unsent.rows().tolist() == rows[:1]
    # the same result again and one for a range it does not hold; garbage; a wrong key
    s.on_message(msg(Kind.UPDATE, 1, results(s, [rows[0], 9]), seq=8), 3.0)
    s.on_message(msg(Kind.UPDATE, 1, {"cols": "x", "path": []}, seq=9), 3.0)
    s.on_message(msg(Kind.UPDATE, 1, results(s, rows[1:], keys=[12345]), seq=10), 3.0)
    assert s.dropped == 4
    assert s.ledger.count(State.FINISHED) == 1 and s.ledger.state(rows[1]) is State.LEASED


def test_dead_droid_leases_go_to_another_droid():
    s = make(n=4)
    hello(s, 1)
    hello(s, 2)
    s.on_message(msg(Kind.WORK_REQ, 1, {"want": 4}), 1.0)
    assert s.on_message(msg(Kind.WORK_REQ, 2, {"want": 4}), 1.0) == []
    out = s.on_failed(1, 2.0)
    assert len(work_rows(out)) == 4
    assert all(s.ledger.rows["tries"][r] == 1 for r in range(4))
    assert s.on_message(msg(Kind.HB, 1, {}), 3.0) == [] and s.dropped == 1


def test_heartbeat_timeout_and_lease_expiry():
    s = make(n=4)
    hello(s, 1, slots=1, now=0.0)
    hello(s, 2, slots=1, now=0.0)
    s.on_message(msg(Kind.WORK_REQ, 1, {"want": 1}), 0.0)
    s.on_message(msg(Kind.WORK_REQ, 2, {"want": 1}), 0.0)
    s.on_message(msg(Kind.HB, 2, {"queued": []}), 25.0)
    out = s.tick(40.0)  # rank 1 silent for 40 s > 30 s
    assert (1, Kind.STOP) in kinds(out) and not s.droids[1].alive
    s.on_message(msg(Kind.HB, 2, {"queued": []}), 60.0)
    s.tick(101.0)  # rank 2's started range passed its 100 s lease
    assert s.ledger.count(State.LEASED) == 0
    assert s.ledger.count(State.READY) == 4


def test_queued_ranges_are_renewed_by_heartbeat():
    s = make(n=4)
    hello(s, 1, slots=1)
    rows = work_rows(s.on_message(msg(Kind.WORK_REQ, 1, {"want": 2}), 0.0))
    s.on_message(msg(Kind.HB, 1, {"queued": [rows[1]]}), 90.0)
    s.tick(120.0)
    assert s.ledger.state(rows[0]) is State.READY
    assert s.ledger.state(rows[1]) is State.LEASED


def test_too_many_lost_leases_fail_the_range():
    s = make(n=1, max_tries=2)
    for rank in (1, 2):
        hello(s, rank)
        s.on_message(msg(Kind.WORK_REQ, rank, {"want": 1}), 0.0)
        s.on_failed(rank, 1.0)
    assert s.ledger.state(0) is State.FAILED
    assert s.book.unsent.peek().cols["error_code"].tolist() == [1224]


def test_drain_before_walltime_and_bye_releases_without_charge():
    s = make(n=6, walltime_end=1000.0, drain_lead=100.0)
    hello(s, 1)
    rows = work_rows(s.on_message(msg(Kind.WORK_REQ, 1, {"want": 4}), 0.0))
    s.on_message(msg(Kind.HB, 1, {"queued": rows}), 800.0)
    assert s.tick(800.0) == []
    s.on_message(msg(Kind.HB, 1, {"queued": rows}), 900.0)
    out = s.tick(905.0)
    assert kinds(out) == [(1, Kind.DRAIN)] and out[0][1].body["by"] <= 1000.0
    out = s.on_message(msg(Kind.WORK_REQ, 1, {"want": 1}), 906.0)
    assert out[0][1].body["no_more"] is True
    s.on_message(msg(Kind.UPDATE, 1, results(s, rows[:1]), seq=1), 907.0)
    out = s.on_message(msg(Kind.BYE, 1, {"released": rows[1:]}), 908.0)
    assert (1, Kind.STOP) in kinds(out)
    assert s.ledger.count(State.READY) == 5 and s.ledger.rows["tries"].max() == 0
    assert s.finished()
    assert (2, Kind.DRAIN) in kinds(hello(s, 2, now=909.0))  # a late droid drains at once


def test_no_more_when_the_upstream_is_dry_and_everything_is_done():
    s = make(n=1)
    s.exhausted = True
    hello(s, 1)
    rows = work_rows(s.on_message(msg(Kind.WORK_REQ, 1, {"want": 2}), 0.0))
    s.on_message(msg(Kind.UPDATE, 1, results(s, rows[:1]), seq=1), 1.0)
    out = s.on_message(msg(Kind.WORK_REQ, 1, {"want": 2}), 2.0)
    assert WorkBatch.from_body(out[0][1].body).no_more
    s.on_message(msg(Kind.BYE, 1, {}), 3.0)
    assert s.finished()


def test_request_that_overtook_its_results_is_served_when_they_arrive():
    s = make(n=6)
    hello(s, 1, slots=1)
    rows = work_rows(s.on_message(msg(Kind.WORK_REQ, 1, {"want": 2}), 0.0))
    assert s.on_message(msg(Kind.WORK_REQ, 1, {"want": 2}), 1.0) == []  # still holds 2
    out = s.on_message(msg(Kind.UPDATE, 1, results(s, rows), seq=3), 1.1)
    assert kinds(out) == [(1, Kind.ACK), (1, Kind.WORK)]
    assert len(work_rows(out[1:])) == 2


def test_bye_keeps_the_well_formed_metrics_of_each_job():
    """A droid's memory figures go into its jobs' final updates: what is malformed in
    them (a bad PandaID, a non-integer, a negative, no samples) is left out, not trusted."""
    s = make(n=1)
    hello(s, 1)
    metrics = {
        "501": {
            "cpu": 12.5,
            "fields": {"maxRSS": 900, "avgRSS": 400, "bad": "x", "neg": -1},
            "samples": 3,
        },
        "502": {"cpu": -1, "fields": {"maxRSS": 1}, "samples": 0},
        "504": {"cpu": 3},  # figures without a monitor's sample: only the CPU
        "505": {"cpu": True},
        "../x": {"cpu": 1, "fields": {"maxRSS": 1}, "samples": 1},
        "503": "not a dict",
    }
    s.on_message(msg(Kind.BYE, 1, {"metrics": metrics}), 1.0)
    assert s.droids[1].metrics == {501: ({"maxRSS": 900, "avgRSS": 400}, 3)}
    assert s.droids[1].job_cpu == {501: 12.5, 504: 3.0}
    hello(s, 2)
    s.on_message(msg(Kind.BYE, 2, {"metrics": ["nothing", "of", "use"]}), 2.0)
    assert s.droids[2].metrics == {} and s.droids[2].job_cpu == {}
