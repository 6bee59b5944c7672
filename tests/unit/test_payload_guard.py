"""The guard rails object every payload starter uses (pilot.payload.guard)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil

from pilot.config import PilotConfig
from pilot.errors import ErrorCode, PilotError
from pilot.job import Job
from pilot.payload.container import ContainerSpec
from pilot.payload.guard import Guard, wall_limit
from pilot.payload.runner import TAG_VARIABLE, PayloadProcess
from tests.conftest import REPO
from tests.payloads.orphan import survivors

ORPHAN = str(REPO / "tests" / "payloads" / "orphan.py")


def job(**extra: object) -> Job:
    return Job.from_panda({"PandaID": 9, "transformation": sys.executable, "jobPars": "", **extra})


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_limits_come_from_the_job_and_the_queue(tmp_path):
    cfg = PilotConfig(queue={"maxrss": "300", "looping_limit": "40", "maxtime": "500"})
    g = Guard(job(maxWalltime="200", minRamCount="100"), tmp_path, cfg)
    assert g.limits.memory_kb == 300 * 1024  # the queue's maxrss beats 2 x minRamCount
    assert g.limits.looping_s == 40 and g.limits.walltime_s == 200
    assert wall_limit(job(maxWalltime="900"), cfg) == 500


def test_no_configuration_still_holds_the_job_to_its_own_limits(tmp_path):
    g = Guard(job(maxWalltime="60", minRamCount="50"), tmp_path, PilotConfig())
    assert g.limits.walltime_s == 60 and g.limits.memory_kb == 100 * 1024
    assert g.container is None and g.monitored


def test_the_container_has_no_network_under_deny_all_and_hides_the_pilots_secrets(tmp_path):
    spec = ContainerSpec(runtime="bwrap")
    cfg = PilotConfig(container=spec, connection_policy="deny-all", secret_files=("/t/tok",))
    g = Guard(job(container_name="/images/el9"), tmp_path, cfg)
    assert g.container is not None and g.container.image == "/images/el9"
    assert g.container.network is False and "/t/tok" in g.container.hide
    assert g.isolated  # what the payload tries cannot leave: reported, not held against it


def test_the_payload_environment_has_no_pilot_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("OIDC_AUTH_TOKEN", "pilot-secret")
    env = Guard(job(), tmp_path, PilotConfig()).environment()
    assert "OIDC_AUTH_TOKEN" not in env and env["PandaID"] == "9"


def test_what_a_restart_cannot_cure(tmp_path):
    fatal = Guard.fatal
    assert fatal(PilotError(ErrorCode.REACHEDMAXTIME, "x"))
    assert fatal(PilotError(ErrorCode.USERDIRTOOLARGE, "x"))
    assert fatal(PilotError(ErrorCode.STDOUTTOOBIG, "x"))
    assert not fatal(PilotError(ErrorCode.PAYLOADEXCEEDMAXMEM, "x"))
    assert not fatal(PilotError(ErrorCode.LOOPINGJOB, "x"))


def test_the_walltime_is_the_jobs_across_payload_restarts(tmp_path):
    clock = Clock()
    g = Guard(job(maxWalltime="100"), tmp_path, PilotConfig(monitor_interval=10), clock=clock)
    clock.t += 80  # the first payload ran 80 s
    second = PayloadProcess([sys.executable, "-c", "import time; time.sleep(30)"], cwd=tmp_path)
    try:
        m = g.watch(second)
        assert m.started == 1000.0 and g.monitors == 1
        assert m.check(now=1000.0 + 90) is None  # 90 s of the job's 100
        assert m.check(now=1000.0 + 101).code == ErrorCode.REACHEDMAXTIME
    finally:
        g.kill(second, PilotError(ErrorCode.REACHEDMAXTIME, "test"))
        g.ended(second)


def test_a_droids_walltime_runs_from_when_rank_0_started_the_job(tmp_path):
    clock = Clock()  # this rank's first range of the job comes 95 s after the job began
    g = Guard(job(maxWalltime="100"), tmp_path, PilotConfig(), clock=clock, started=905.0)
    payload = PayloadProcess([sys.executable, "-c", "import time; time.sleep(30)"], cwd=tmp_path)
    try:
        m = g.watch(payload)
        assert m.started == 905.0
        assert m.check(now=1006.0).code == ErrorCode.REACHEDMAXTIME
    finally:
        g.kill(payload, PilotError(ErrorCode.REACHEDMAXTIME, "test"))
        g.ended(payload)


def test_unmonitored_guard_never_wakes_its_caller_and_finds_no_breach(tmp_path):
    g = Guard.bare(job(), tmp_path)
    p = PayloadProcess([sys.executable, "-c", "pass"], cwd=tmp_path)
    assert g.watch(p) is None and g.next_due() == float("inf") and g.check() is None
    p.wait(10)
    assert g.ended(p) is None  # nothing left behind


def test_a_payload_leaving_an_orphan_behind_is_ended_with_it(tmp_path):
    marker = f"guard-{tmp_path.name}"
    g = Guard.bare(job(), tmp_path)
    p = PayloadProcess([sys.executable, ORPHAN, marker, "-c", "pass"], cwd=tmp_path)
    g.watch(p)
    assert p.wait(20) == 0
    left = survivors(marker)
    assert len(left) == 1  # set up right: the orphan outlived the payload
    orphan = psutil.Process(left[0])
    assert orphan.environ()[TAG_VARIABLE] == p.tag
    if g.subreaper:
        assert orphan.ppid() == psutil.Process().pid  # re-parented to the pilot, not init
    record = g.ended(p)
    assert record is not None and left[0] in record.pids
    assert survivors(marker) == []
    assert g.ended(p) is None  # once clean, clean: no second scan of the process table
    if g.subreaper:  # reaped, not left a zombie of the pilot
        assert left[0] not in [c.pid for c in psutil.Process().children()]


def test_ended_after_a_breach_writes_the_monitor_summary(tmp_path: Path):
    cfg = PilotConfig(monitor_interval=0.1, queue={"maxrss": "30"}, kill_grace=1.0)
    g = Guard(job(), tmp_path, cfg)
    hog = "import time; x = b'1' * (80 * 2**20); time.sleep(30)"
    p = PayloadProcess([sys.executable, "-c", hog], cwd=tmp_path)
    g.watch(p)
    breach = None
    for _ in range(400):  # bounded; each turn sleeps until the monitor is due
        if p.wait(timeout=max(0.05, g.next_due())) is not None:
            break
        breach = g.check()
        if breach is not None:
            break
    assert breach is not None and breach.code == ErrorCode.PAYLOADEXCEEDMAXMEM
    record = g.kill(p, breach)
    assert record.reason_code == ErrorCode.PAYLOADEXCEEDMAXMEM
    g.ended(p)
    assert (tmp_path / "monitor_evidence.txt").exists()
    assert (tmp_path / "memory_monitor_summary.json").exists()


def test_an_orphan_that_ends_by_itself_is_reaped_not_left_a_zombie(tmp_path):
    g = Guard.bare(job(), tmp_path)
    if not g.subreaper:
        return  # without a subreaper, init reaps it
    ends = "import os, time\nif os.fork() == 0:\n    time.sleep(0.2)\n    os._exit(0)\n"
    script = tmp_path / "ends.py"
    script.write_text(ends)
    p = PayloadProcess([sys.executable, "-c", f"exec(open({str(script)!r}).read())"], cwd=tmp_path)
    g.watch(p)
    assert p.wait(20) == 0
    for _ in range(100):  # bounded: until the orphan has ended (a zombie of the pilot)
        zombies = [
            c
            for c in psutil.Process().children()
            if c.status() == psutil.STATUS_ZOMBIE and os.getsid(c.pid) == p.pgid
        ]
        if zombies:
            break
        time.sleep(0.05)
    assert zombies
    g.ended(p)
    assert not [c for c in psutil.Process().children() if c.pid in {z.pid for z in zombies}]


def test_the_jobs_memory_and_io_span_every_payload_process(tmp_path):
    """An event-service payload restarted once: its final update's maxRSS is the higher
    of the two processes', the I/O totals add up, averages weigh by samples."""
    from types import SimpleNamespace

    summaries = iter(
        [
            ({"maxRSS": 500, "avgRSS": 100, "totRCHAR": 10, "cpuConsumptionTime": 3}, 1),
            ({"maxRSS": 300, "avgRSS": 200, "totRCHAR": 5, "cpuConsumptionTime": 9}, 3),
        ]
    )

    def factory(payload):
        got, n = next(summaries)
        return SimpleNamespace(summary=lambda: got, sampler=SimpleNamespace(count=n))

    g = Guard(job(), tmp_path, PilotConfig(), monitor_factory=factory)
    assert g.summary() == {}
    g.watch(None)
    g.watch(None)  # the restart
    assert g.summary() == {"maxRSS": 500, "avgRSS": 175, "totRCHAR": 15}


def test_leftovers_of_an_earlier_pilot_are_ended_only_in_their_work_directory(tmp_path):
    from pilot.payload.runner import end_leftovers

    here, elsewhere = tmp_path / "job", tmp_path / "other"
    here.mkdir()
    elsewhere.mkdir()
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    tagged = {**os.environ, TAG_VARIABLE: "1-2"}
    import subprocess

    procs = {
        "leftover": subprocess.Popen(sleep, cwd=here, env=tagged),
        "untagged": subprocess.Popen(sleep, cwd=here, env={**os.environ, TAG_VARIABLE: ""}),
        "elsewhere": subprocess.Popen(sleep, cwd=elsewhere, env=tagged),
    }
    try:
        time.sleep(0.2)  # their environments are in place
        assert end_leftovers(here, grace=2.0) == [procs["leftover"].pid]
        assert procs["leftover"].wait(5) is not None
        assert procs["untagged"].poll() is None and procs["elsewhere"].poll() is None
    finally:
        for p in procs.values():
            p.kill()
            p.wait(5)


def test_droids_side_by_side_merge_into_one_set_of_fields():
    """Rank 0 merges its droids' figures as a guard merges restarts: highest maxima,
    averages weighted by samples, totals summed, CPU left out."""
    from pilot.payload.guard import merge_metrics

    parts = [
        ({"maxRSS": 800, "avgRSS": 300, "totWBYTES": 7, "cpuConsumptionTime": 4}, 2),
        ({"maxRSS": 900, "avgRSS": 600, "totWBYTES": 5}, 1),
        ({}, 5),
    ]
    assert merge_metrics(parts) == {"maxRSS": 900, "avgRSS": 400, "totWBYTES": 12}
    assert merge_metrics([]) == {}
