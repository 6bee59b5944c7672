"""The Droid against a scripted Yoda over the in-process transport (no MPI, no payload)."""

from __future__ import annotations

import threading

import numpy as np

from droid.droid import Droid, DroidOptions
from droid.nullexec import NullExecutor
from hpc.transport import Envelope, Kind, LocalHub
from hpc.wire import ResultBatch
from pilot.job import EventRange
from yoda.ledger import Ledger

JOB = {"PandaID": 501, "taskID": 9, "jobsetID": 9, "transformation": "toysim"}


def work(rows, no_more=False):
    """A WORK body for ledger rows ``rows`` of job 501 (ranges 9-501-77-<row+1>-1)."""
    led = Ledger()
    led.add_job(501, 9)
    ranges = [
        EventRange(f"9-501-77-{i + 1}-1", i * 2, i * 2 + 1, "EVNT.root", "G", "mc")
        for i in range(10)
    ]
    led.add_ranges(ranges)
    batch = led.work_batch(np.asarray(rows, dtype=np.int64))
    batch.no_more = no_more
    return batch.body()


def start(tmp_path, delay=0.0, slots=2):
    hub = LocalHub(2)
    yoda = hub.endpoint(0)

    def factory(job, wd, s, lease_s):
        return NullExecutor(job, wd, s, delay=delay, write_outputs=True)

    droid = Droid(hub.endpoint(1), tmp_path, factory, DroidOptions(slots=slots, update_interval=0))
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", droid.run()), daemon=True)
    t.start()
    hello = yoda.recv(10)
    assert hello.kind is Kind.HELLO and hello.body["slots"] == slots
    cfg = {"jobs": [JOB], "lease_s": 60, "hb_interval": 60, "low_per_slot": 1, "high_per_slot": 2}
    yoda.send(1, Envelope(Kind.CONFIG, 1, 5, cfg))
    return hub, yoda, droid, t, result


def expect(yoda, kind, timeout=10):
    for _ in range(100):
        got = yoda.recv(timeout)
        assert got is not None, f"no {kind.name}"
        if got.kind is kind:
            return got
    raise AssertionError(f"no {kind.name}")


def test_work_results_ack_no_more_bye(tmp_path):
    hub, yoda, droid, t, result = start(tmp_path)
    req = expect(yoda, Kind.WORK_REQ)
    assert req.body["want"] == 4 and req.epoch == 5
    for junk in ({"cols": [1, 2]}, {**work([3]), "files": {}}, None, {"cols": np.zeros(3)}):
        yoda.send(1, Envelope(Kind.WORK, 2, 5, junk))  # dropped whole, nothing half applied
    yoda.send(1, Envelope(Kind.WORK, 2, 5, work([0, 1])))
    yoda.send(1, Envelope(Kind.WORK, 3, 4, work([7])))  # old epoch
    done = {}
    while len(done) < 2:
        up = expect(yoda, Kind.UPDATE)
        batch = ResultBatch.from_body(up.body)
        for row, r in zip(batch.rows.tolist(), batch.results(["?"] * len(batch))):
            done[row] = r
        yoda.send(1, Envelope(Kind.ACK, 4, 5, {"upto": up.seq}))
    assert set(done) == {0, 1} and all(r.status.value == "finished" for r in done.values())
    assert all(r.output_path.endswith(f"9-501-77-{row + 1}-1.out") for row, r in done.items())
    yoda.send(1, Envelope(Kind.WORK, 5, 5, work([], no_more=True)))
    bye = expect(yoda, Kind.BYE)
    assert bye.body["released"] == [] and bye.body["done"] == 2
    yoda.send(1, Envelope(Kind.STOP, 6, 5, {}))
    t.join(10)
    assert result["rc"] == 0


def test_drain_gives_back_what_did_not_start(tmp_path):
    hub, yoda, droid, t, result = start(tmp_path, delay=0.3, slots=1)
    expect(yoda, Kind.WORK_REQ)
    yoda.send(1, Envelope(Kind.WORK, 2, 5, work(range(5))))
    for _ in range(1000):  # bounded: until the first range started
        if any(ex.in_flight() for ex in list(droid.executors.values())):
            break
        threading.Event().wait(0.01)
    yoda.send(1, Envelope(Kind.DRAIN, 3, 5, {"by": 1e12}))
    released, finished = set(), set()
    while True:
        got = yoda.recv(10)
        assert got is not None
        if got.kind is Kind.UPDATE:
            released.update(got.body["released"])
            finished.update(ResultBatch.from_body(got.body).rows.tolist())
            yoda.send(1, Envelope(Kind.ACK, 4, 5, {"upto": got.seq}))
        elif got.kind is Kind.BYE:
            released.update(got.body["released"])
            break
    assert finished | released == set(range(5)) and not finished & released
    assert len(finished) == 1  # one slot: only the running range finishes
    yoda.send(1, Envelope(Kind.STOP, 5, 5, {}))
    t.join(10)
    assert result["rc"] == 0


def test_stop_ends_the_droid_and_yoda_death_too(tmp_path):
    hub, yoda, droid, t, result = start(tmp_path)
    expect(yoda, Kind.WORK_REQ)
    hub.kill(0)
    t.join(10)
    assert not t.is_alive() and droid.yoda_dead


def test_after_results_the_droid_looks_again_at_once(tmp_path):
    """Progress resets the wait: the turn after results came does not sleep, so the last
    results of a job and its BYE are not held back by a wait that grew while idle."""
    polls: list[tuple[float, int]] = []

    class Recording(NullExecutor):
        def poll(self, timeout):
            got = super().poll(timeout)
            polls.append((timeout, len(got)))
            return got

    hub = LocalHub(2)
    yoda = hub.endpoint(0)
    droid = Droid(
        hub.endpoint(1),
        tmp_path,
        lambda job, wd, s, lease_s: Recording(job, wd, s, delay=0.05),
        DroidOptions(slots=2, update_interval=0),
    )
    t = threading.Thread(target=droid.run, daemon=True)
    t.start()
    assert yoda.recv(10).kind is Kind.HELLO
    cfg = {"jobs": [JOB], "lease_s": 60, "hb_interval": 60, "low_per_slot": 1, "high_per_slot": 6}
    yoda.send(1, Envelope(Kind.CONFIG, 1, 5, cfg))
    expect(yoda, Kind.WORK_REQ)
    yoda.send(1, Envelope(Kind.WORK, 2, 5, work(range(6), no_more=True)))
    upd = expect(yoda, Kind.UPDATE)
    yoda.send(1, Envelope(Kind.ACK, 3, 5, {"upto": upd.seq}))
    while (got := yoda.recv(10)) is not None and got.kind is not Kind.BYE:
        if got.kind is Kind.UPDATE:
            yoda.send(1, Envelope(Kind.ACK, 4, 5, {"upto": got.seq}))
    assert got is not None and got.kind is Kind.BYE
    yoda.send(1, Envelope(Kind.STOP, 5, 5, {}))
    t.join(10)
    after = [polls[i + 1][0] for i in range(len(polls) - 1) if polls[i][1]]
    assert after and all(timeout == 0 for timeout in after), polls


def test_a_long_range_is_no_reason_to_think_yoda_dead(tmp_path):
    """Yoda says nothing while a range runs (nothing is owed): the droid waits for the
    range, not for Yoda, however long its yoda_timeout is."""
    hub = LocalHub(2)
    yoda = hub.endpoint(0)

    def factory(job, wd, s, lease_s):
        return NullExecutor(job, wd, s, delay=1.5, write_outputs=True)

    opts = DroidOptions(slots=1, update_interval=0, yoda_timeout=0.5)
    droid = Droid(hub.endpoint(1), tmp_path, factory, opts)
    t = threading.Thread(target=droid.run, daemon=True)
    t.start()
    assert yoda.recv(10).kind is Kind.HELLO
    cfg = {"jobs": [JOB], "lease_s": 60, "hb_interval": 60, "low_per_slot": 0, "high_per_slot": 1}
    yoda.send(1, Envelope(Kind.CONFIG, 1, 5, cfg))
    expect(yoda, Kind.WORK_REQ)
    yoda.send(1, Envelope(Kind.WORK, 2, 5, work([0], no_more=True)))
    up = expect(yoda, Kind.UPDATE)  # 1.5 s later: three yoda_timeouts of silence
    assert len(ResultBatch.from_body(up.body)) == 1
    yoda.send(1, Envelope(Kind.ACK, 3, 5, {"upto": up.seq}))
    assert expect(yoda, Kind.BYE).body["done"] == 1
    yoda.send(1, Envelope(Kind.STOP, 4, 5, {}))
    t.join(10)
    assert not t.is_alive()


def test_the_queue_description_comes_with_config(tmp_path):
    """Rank 0 reads the queue once; a droid takes it from CONFIG and asks no server."""
    from types import SimpleNamespace

    from hpc.payloadconfig import payload_config

    hub = LocalHub(2)
    yoda = hub.endpoint(0)
    droid = Droid(hub.endpoint(1), tmp_path, lambda *a: None, DroidOptions(hello_timeout=10))
    t = threading.Thread(target=droid.hello, daemon=True)
    t.start()
    assert yoda.recv(10).kind is Kind.HELLO
    queue = {"nickname": "Q", "maxrss": 123, "container_type": ""}
    body = {"jobs": [JOB], "queue": queue, "started": 1764600000.5}
    yoda.send(1, Envelope(Kind.CONFIG, 1, 5, body))
    t.join(10)
    assert droid.queuedata == queue and droid.started == 1764600000.5
    # a dead server in --url: with the queue given, nobody asks it
    args = SimpleNamespace(workdir=str(tmp_path), queue="Q", url="http://127.0.0.1:9")
    config = payload_config(args, queue=droid.queuedata)
    assert config.queue["maxrss"] == 123
    assert payload_config(args, queue=None).queue == {}


def test_the_counts_kept_beside_the_queue_and_the_results_match_them(tmp_path):
    """The loop reads the queued and unsent counts every turn without summing batches:
    they must follow every way ranges enter and leave the queue and the results."""
    from pilot.job import Job

    hub = LocalHub(2)

    def factory(job, wd, s, lease_s):
        return NullExecutor(job, wd, s)

    opts = DroidOptions(slots=2, update_batch=1000, update_interval=60)
    droid = Droid(hub.endpoint(1), tmp_path, factory, opts)
    droid.jobs[501] = Job.from_panda(JOB)
    droid.configured, droid.epoch = True, 5

    def counted():
        queued = sum(len(w) for q in droid.queue.values() for w in q)
        assert (droid.queued(), droid._n_results) == (queued, sum(map(len, droid.results)))
        return droid.queued(), droid._n_results

    droid._work(work([0, 1, 2, 3, 4]))
    assert counted() == (5, 0)
    droid._work(work([3, 4, 5]))  # two of them held already: only row 5 is new
    assert counted() == (6, 0)
    droid._feed()  # the executor takes its two slots' worth
    assert counted() == (4, 0)
    ex = droid.executors[501]
    assert droid._took(ex.poll(0.0), 501)
    assert counted() == (4, 2)
    droid._feed()
    droid._took(ex.poll(0.0), 501)
    assert counted() == (2, 4)
    droid._drain(None)  # what did not start goes back with the results
    assert counted() == (0, 0)
    update = expect(hub.endpoint(0), Kind.UPDATE)
    assert len(ResultBatch.from_body(update.body)) == 4 and update.body["released"] == [4, 5]


def test_bye_splits_the_payloads_cpu_between_jobs_in_their_ranges_shares(tmp_path, monkeypatch):
    """The CPU a droid's reaped payloads used is exact but not per job: two jobs share it
    as their ranges' results claim (evenly if they claim none), and each job's memory
    figures travel beside its share."""
    import droid.droid as module

    class Ran:
        def __init__(self, fields):
            self.fields = fields

        def metrics(self):
            return {"fields": self.fields, "samples": 2} if self.fields else {}

    hub = LocalHub(2)
    droid = Droid(hub.endpoint(1), tmp_path, None, DroidOptions(slots=1))
    droid.executors = {501: Ran({"maxRSS": 700}), 502: Ran({})}
    monkeypatch.setattr(module, "_payload_cpu", lambda: 8.0)
    droid.range_cpu = {501: 3.0, 502: 1.0}
    assert droid._metrics() == {
        "501": {"cpu": 6.0, "fields": {"maxRSS": 700}, "samples": 2},
        "502": {"cpu": 2.0},
    }
    droid.range_cpu = {}
    assert [m["cpu"] for m in droid._metrics().values()] == [4.0, 4.0]
