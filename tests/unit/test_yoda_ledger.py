"""Range ledger and its journal: transitions, lookups, replay after a kill."""

from __future__ import annotations

import numpy as np
import pytest

from hpc import wire
from hpc.wire import ResultBatch
from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.job import EventRange
from yoda.journal import MAGIC, Book, Journal, Op, replay, resume_book
from yoda.ledger import TERMINAL, Ledger, State


def ranges(panda=1001, n=10, task=77, lfn="EVNT.01.pool.root"):
    return [
        EventRange(f"{task}-{panda}-5001-{i}-1", i * 10 + 1, i * 10 + 10, lfn, "G-1", "mc")
        for i in range(n)
    ]


def job(panda=1001, task=77):
    return {"PandaID": panda, "taskID": task, "transformation": "toysim"}


def test_ids_and_ranges_round_trip_through_the_compact_table():
    led = Ledger()
    rs = ranges(n=5) + ranges(panda=1002, n=3)
    rows = led.add_ranges(rs)
    assert list(rows) == list(range(8))
    for row, r in zip(rows, rs):
        assert led.event_range(int(row)) == r
        assert led.find(r.event_range_id) == row
    assert led.find("77-1001-5001-99-1") is None
    assert led.find("garbage") is None
    assert len(led.files) == 1
    assert led.count(State.READY) == 8


def test_duplicates_are_skipped():
    led = Ledger()
    led.add_ranges(ranges(n=4))
    again = led.add_ranges(ranges(n=6))
    assert list(again) == [4, 5]
    assert led.n == 6


def test_duplicates_are_found_past_the_filter_at_every_size():
    from yoda.ledger import ADD_DTYPE

    led = Ledger()
    job_ = led.add_job(1001, 77)
    rng = np.random.default_rng(3)
    known: list[int] = []
    for b in range(60):  # the filter is rebuilt several times on the way
        cols = np.zeros(1000, dtype=ADD_DTYPE)
        fresh = np.arange(b * 700, b * 700 + 700)
        again = rng.choice(known, 300) if known else np.arange(300) + 10**6
        cols["proc"] = np.concatenate([fresh, again])
        cols["file_id"], cols["attempt"] = 5001, 1
        rng.shuffle(cols)
        rows = led.add_block(job_, cols)
        want = 700 if known else len(np.unique(cols["proc"]))
        assert len(rows) == want
        known += led.rows["proc"][rows].tolist()
    assert led.n == len(set(known)) == len(known)
    for proc in rng.choice(known, 50).tolist():
        row = led.find(f"77-1001-5001-{proc}-1")
        assert row is not None and led.rows["proc"][row] == proc


def test_transitions_and_counts():
    led = Ledger()
    led.add_ranges(ranges(n=6))
    got = led.next_ready(4)
    assert got.tolist() == [0, 1, 2, 3]
    led.lease(got, droid=3, deadline=100.0)
    assert led.leased_by(3).tolist() == got.tolist()
    led.finish([0], State.FINISHED)
    led.release([1], charge=True)
    led.release([2], charge=False)
    assert led.next_ready(3).tolist() == [1, 2, 4]
    assert led.rows["tries"][1] == 1 and led.rows["tries"][2] == 0
    assert led.count(State.FINISHED) == 1 and led.count(State.LEASED) == 1
    with pytest.raises(ValueError):
        led.finish([3], State.READY)


def test_memory_per_range_is_small():
    led = Ledger(capacity=100_000)
    n = 100_000
    led.add_job(1, 1)
    led.add_columns(
        0, np.arange(n), np.zeros(n), np.ones(n), np.arange(n), np.arange(n), np.zeros(n)
    )
    assert led.nbytes() / n < 64


def _book(tmp_path):
    book = Book(Ledger(), Journal(tmp_path / "journal", sync_every=4))
    j = book.add_job(job())
    book.add_ranges(j, ranges(n=6))
    return book


def test_replay_rebuilds_the_ledger_and_unsent_results(tmp_path):
    book = _book(tmp_path)
    book.lease([0, 1, 2], droid=2, deadline=50.0)
    r0 = RangeResult("77-1001-5001-0-1", RangeStatus.FINISHED, "/o/0", 10, "0a0b0c0d")
    r1 = RangeResult("77-1001-5001-1-1", RangeStatus.FAILED, error_code=1224)
    keys = book.ledger.keys(np.array([0, 1]))
    book.done(2, ResultBatch.from_results([(0, keys[0], r0), (1, keys[1], r1)]))
    book.sent([0])
    book.release([2], charge=True)
    book.journal.close()
    rep = replay(tmp_path / "journal")
    led = rep.ledger
    assert [led.state(i) for i in range(6)] == [
        State.FINISHED,
        State.FAILED,
        State.READY,
        State.READY,
        State.READY,
        State.READY,
    ]
    unsent = rep.unsent.peek()
    assert unsent.rows.tolist() == [1] and unsent.results([r1.event_range_id]) == [r1]
    assert rep.jobs == [job()]
    assert led.rows["tries"][2] == 1


def test_resume_releases_old_leases_without_charge_and_bumps_the_epoch(tmp_path):
    book = _book(tmp_path)
    book.epoch(1)
    book.lease([0, 1], droid=1, deadline=50.0)
    book.journal.close()
    with open(tmp_path / "journal", "ab") as fh:
        fh.write(b"\x06\x10\x00\x00\x00\x40")  # killed mid-write
    book2, epoch = resume_book(tmp_path / "journal")
    assert epoch == 2
    assert book2.ledger.count(State.READY) == 6
    assert book2.ledger.rows["tries"][0] == 0
    book2.journal.close()
    rep = replay(tmp_path / "journal")
    assert not rep.torn and rep.epoch == 2 and rep.ledger.count(State.READY) == 6


def test_corrupt_middle_of_journal_is_a_pilot_error(tmp_path):
    book = _book(tmp_path)
    book.epoch(2)
    book.journal.close()
    p = tmp_path / "journal"
    data = bytearray(p.read_bytes())
    data[len(MAGIC) + 20] ^= 0x01  # one bit of the first record
    p.write_bytes(bytes(data))
    with pytest.raises(PilotError, match="corrupt"):
        replay(p)
    p.write_bytes(b'{"op":"epoch","n":1}\n')  # not this format at all
    with pytest.raises(PilotError, match="not a Yoda journal"):
        replay(p)
    with pytest.raises(PilotError):
        replay(tmp_path / "missing")


def test_rows_released_after_a_replay_are_handed_out_once(tmp_path):
    book = _book(tmp_path)
    book.lease([3, 4], droid=1, deadline=9.0)
    book.journal.close()
    book2, _ = resume_book(tmp_path / "journal")
    led = book2.ledger
    got = led.next_ready(10)
    assert sorted(got) == list(range(6)) and len(got) == 6
    led.lease(got, 2, 1.0)
    assert led.count(State.LEASED) == 6 and led.count(State.READY) == 0
    led.release([1, 1], charge=False)
    assert led.count(State.READY) == 1


def test_result_columns_round_trip_and_report_like_the_model():
    r = RangeResult("1-2-3-4-5", RangeStatus.FATAL, "/p", 3, "01020304", 1.0, 2.0, 1228, "x")
    ok = RangeResult("1-2-3-4-6", RangeStatus.FINISHED, "/q", 4, "0a0b0c0d", 0.25, 2.0)
    batch = ResultBatch.from_results([(7, 70, r), (8, 80, ok)])
    back = ResultBatch.from_body(batch.body())
    assert back.results([r.event_range_id, ok.event_range_id]) == [r, ok]
    assert back.panda_entries([r.event_range_id, ok.event_range_id]) == [
        r.to_panda_v0(),
        ok.to_panda_v0(),
    ]
    assert [State(s) for s in (wire.FINISHED, wire.FAILED, wire.FATAL)] == list(TERMINAL)


def test_group_commit_holds_records_until_flush(tmp_path):
    book = Book(Ledger(), Journal(tmp_path / "journal", group=True))
    j = book.add_job(job())
    book.add_ranges(j, ranges(n=3))
    assert (tmp_path / "journal").stat().st_size == len(MAGIC)  # held in memory
    book.journal.flush()
    assert replay(tmp_path / "journal").ledger.n == 3
    book.lease(np.array([0]), droid=1, deadline=9.0)
    book.journal.close()  # close flushes too
    assert replay(tmp_path / "journal").ledger.count(State.LEASED) == 1


def test_pilot_hpc_journal_summarises_a_journal(tmp_path):
    import json
    import subprocess
    import sys

    book = _book(tmp_path)
    book.epoch(3)
    book.lease(np.array([0, 1]), droid=2, deadline=50.0)
    r0 = RangeResult("77-1001-5001-0-1", RangeStatus.FINISHED, "/o/0", 10, "0a0b0c0d")
    book.done(2, ResultBatch.from_results([(0, int(book.ledger.keys(np.array([0]))[0]), r0)]))
    book.journal.close()
    cmd = [sys.executable, "-m", "pilot.cli", "hpc", "journal", str(tmp_path / "journal")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    summary = json.loads(out.stdout)
    assert summary["epoch"] == 3 and summary["jobs"] == [1001] and summary["ranges"] == 6
    assert summary["states"] == {"ready": 4, "leased": 1, "finished": 1, "failed": 0, "fatal": 0}
    assert summary["unsent"] == 1 and not summary["torn"]
    (tmp_path / "bad").write_bytes(b"not a journal")
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 1 and "not a Yoda journal" in bad.stderr


def test_uniform_result_strings_travel_and_are_journaled_once(tmp_path):
    import pickle

    b = ResultBatch.failed(np.arange(3), np.zeros(3, dtype=np.uint64), 1224, "lost")
    body = b.body()
    assert body["diag"] == "lost" and body["path"] == ""  # one string, not a list of three
    back = ResultBatch.from_body(body)
    assert back.diag == ["lost"] * 3 and back.path == [""] * 3
    mixed = ResultBatch(b.cols, ["a", "b", ""], [""] * 3, ["", "", "x"])
    assert mixed.body()["path"] == ["a", "b", ""]
    again = pickle.loads(pickle.dumps(mixed))
    assert (again.path, again.adler32, again.diag) == (mixed.path, mixed.adler32, mixed.diag)
    with pytest.raises(ValueError):
        ResultBatch.from_body({**body, "path": ["x"]})  # a list must have one per result
    led = Ledger()
    book = Book(led, Journal(tmp_path / "j"))
    rows = book.add_ranges(book.add_job(job()), ranges(n=3))
    book.lease(rows, 1, 100.0)
    book.done(1, mixed)
    book.journal.close()
    rep = replay(tmp_path / "j")
    got = rep.unsent.peek()
    assert (got.path, got.adler32, got.diag) == (mixed.path, mixed.adler32, mixed.diag)


def test_range_ids_in_bulk_are_the_ids_one_by_one():
    led = Ledger()
    ranges_ = ranges(n=6) + ranges(panda=1002, n=3)
    ranges_ += [EventRange("77-1001-5002-9-2", 1, 2, "other.root", "G-2", "mc")]
    rows = led.add_ranges(ranges_)
    for pick in (rows[:6], rows[2:4], rows, rows[[0, 9]], rows[6:9]):
        assert led.range_ids(pick) == [led.range_id(int(r)) for r in pick]
    assert sorted(led.range_ids(rows)) == sorted(r.event_range_id for r in ranges_)


def test_panda_entries_match_the_model_whether_states_are_one_or_mixed():
    rid = [f"77-1001-5001-{i}-1" for i in range(3)]
    for statuses in ([RangeStatus.FINISHED] * 3, [RangeStatus.FINISHED, RangeStatus.FAILED] * 2):
        results = [
            RangeResult(r, s, error_code=0 if s is RangeStatus.FINISHED else 1220, error_diag="x")
            for r, s in zip(rid, statuses)
        ]
        batch = ResultBatch.from_results([(i, 0, r) for i, r in enumerate(results)])
        assert batch.panda_entries(rid) == [r.to_panda_v0() for r in results]


def test_replay_ends_each_row_as_the_live_ledger_left_it(tmp_path):
    """Replay applies leases, releases and results in one pass at the end; the ledger
    must come out as the live one, whatever the order of transitions was."""
    rng = np.random.default_rng(11)
    for trial in range(20):
        path = tmp_path / f"j{trial}"
        book = Book(Ledger(t0=1000.0), Journal(path))
        book.epoch(1)
        job_ = book.add_job(job())
        rows = np.zeros(0, dtype=np.int64)
        done_rows: set[int] = set()
        sent_rows: set[int] = set()
        for step in range(120):
            op = rng.integers(0, 5)
            st = book.ledger.rows["state"][: book.ledger.n]
            if op == 0 or not len(rows):
                lo = len(rows)
                batch = [
                    EventRange(f"77-1001-5001-{i}-1", i, i, "f.root", "G", "mc")
                    for i in range(lo, lo + int(rng.integers(1, 20)))
                ]
                rows = np.arange(book.add_ranges(job_, batch)[-1] + 1)
            elif op == 1:
                ready = np.flatnonzero(st == State.READY)
                pick = rng.permutation(ready)[: rng.integers(0, 12)]
                book.lease(pick, int(rng.integers(1, 4)), 2000.0 + step)
            elif op == 2:
                leased = np.flatnonzero(st == State.LEASED)
                pick = rng.permutation(leased)[: rng.integers(0, 12)]
                book.release(pick, charge=bool(rng.integers(0, 2)))
            elif op == 3:
                leased = np.flatnonzero(st == State.LEASED)
                pick = np.sort(rng.permutation(leased)[: rng.integers(0, 12)])
                state = rng.choice([State.FINISHED, State.FAILED, State.FATAL], len(pick))
                cols = np.zeros(len(pick), dtype=wire.RESULT_DTYPE)
                cols["row"], cols["key"], cols["state"] = pick, book.ledger.keys(pick), state
                n = len(pick)
                paths = [f"/out/{r}" for r in pick.tolist()]
                book.done(int(rng.integers(1, 4)), ResultBatch(cols, paths, [""] * n, ["x"] * n))
                done_rows.update(pick.tolist())
            else:
                unsent = book.unsent.rows()
                pick = rng.permutation(unsent)[: rng.integers(0, 12)]
                book.sent(pick)
                sent_rows.update(pick.tolist())
        book.journal.close()
        replayed = replay(path)
        waiting = replayed.unsent.peek()
        assert sorted(waiting.rows.tolist()) == sorted(done_rows - sent_rows)
        assert waiting.path == [f"/out/{r}" for r in waiting.rows.tolist()]
        assert set(waiting.diag) <= {"x"}
        live, rep = book.ledger, replayed.ledger
        rep.t0 = live.t0
        n = live.n
        assert rep.n == n
        for col in ("state", "droid", "tries", "job", "file_id", "proc"):
            assert np.array_equal(rep.rows[col][:n], live.rows[col][:n]), col
        leased = live.rows["state"][:n] == State.LEASED
        # replay knows deadlines to the journal's 1 ms; float32 columns, same offset
        got = rep.rows["deadline"][:n][leased].astype(float) + (0.0 - 1000.0)
        assert np.allclose(got, live.rows["deadline"][:n][leased], atol=1e-2)
        assert np.array_equal(rep.counts, live.counts)
        # rows given back and still READY are handed out first (in the order of their
        # last release after a replay; live, of their first)
        ready_back = {r for r in live._released if live.rows["state"][r] == State.READY}
        assert set(rep._released) == ready_back and len(rep._released) == len(ready_back)


@pytest.mark.parametrize("bad", ["lease", "state"])
def test_a_transition_the_ledger_cannot_take_is_a_named_journal_error(tmp_path, bad):
    book = Book(Ledger(), Journal(tmp_path / "j"))
    rows = book.add_ranges(book.add_job(job()), ranges(n=3))
    if bad == "lease":
        book.journal.append(Op.LEASE, {"d": 1, "t": 5.0}, np.asarray([1, 99], dtype=np.int64))
    else:
        cols = np.zeros(1, dtype=wire.RESULT_DTYPE)
        cols["row"], cols["state"] = rows[0], State.LEASED  # not a terminal state
        book.journal.append(Op.DONE, {"d": 1, "p": "", "a": "", "e": ""}, cols)
    book.journal.close()
    with pytest.raises(PilotError) as err:
        replay(tmp_path / "j")
    assert err.value.code == ErrorCode.FILEHANDLINGFAILURE
    assert ("LEASE" if bad == "lease" else "DONE") in str(err.value)


def test_a_done_record_whose_strings_are_not_strings_is_a_journal_error(tmp_path):
    book = Book(Ledger(), Journal(tmp_path / "j"))
    rows = book.add_ranges(book.add_job(job()), ranges(n=2))
    cols = np.zeros(2, dtype=wire.RESULT_DTYPE)
    cols["row"], cols["state"] = rows, State.FINISHED
    book.journal.append(Op.DONE, {"d": 1, "p": ["a", 7], "a": "", "e": ""}, cols)
    book.journal.close()
    with pytest.raises(PilotError) as err:
        replay(tmp_path / "j")
    assert err.value.code == ErrorCode.FILEHANDLINGFAILURE and "DONE" in str(err.value)


def test_range_keys_keep_their_values():
    """Keys travel in WORK, come back in UPDATE and are journaled with DONE records: a
    journal written before a change of how they are computed must still replay."""
    keys = wire.range_key([7000000001, 501], [1, 12345], [1, 99], [1, 2])
    assert keys.dtype == np.uint64
    assert keys.tolist() == [15910074467940894990, 16533929133545114086]
    assert int(wire.range_key(5, -1, 2, 3)) == 5251093780114870644  # scalars, a negative id
    assert wire.range_key([], [], [], []).shape == (0,)


def test_a_result_batch_cut_by_a_slice_keeps_its_texts_in_step():
    cols = np.zeros(4, dtype=wire.RESULT_DTYPE)
    cols["row"] = [10, 11, 12, 13]
    batch = ResultBatch(cols, ["a", "b", "c", "d"], ["1", "2", "3", "4"], ["", "x", "", "y"])
    head, tail = batch.select(slice(1)), batch.select(slice(1, None))
    assert head.rows.tolist() == [10] and head.path == ["a"] and head.diag == [""]
    assert tail.rows.tolist() == [11, 12, 13] and tail.adler32 == ["2", "3", "4"]
    assert ResultBatch.concat([head, tail]).path == batch.path
