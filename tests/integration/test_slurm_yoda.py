"""Yoda and Droids in a real sbatch allocation, against the embedded dispatcher.

The batch script is the one ``pilot hpc submit`` renders (Open MPI's
``mpiexec`` with ULFM, 3 ranks on the one node, oversubscribed); the ranks
talk to an EmbeddedServer on 127.0.0.1. A whole task finishes with the
invariant green; ``scancel --batch --signal=TERM`` mid-run drains with
nothing lost, and a ``--resume`` job finishes what was given back. Every wait
is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hpc.batch import submit_script
from tests.mpi.harness import accepted_terminal, invariant
from tests.slurm_env import ensure_slurm, job_state, slurm, wait_for, wait_for_job
from yoda.journal import replay
from yoda.ledger import State

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
QUEUE = "SLURMQ"
RANKS = 3


@pytest.fixture(scope="module")
def slurm_up() -> None:
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def server(slurm_up, tmp_path: Path):
    from pilot.server.serve import EmbeddedServer

    s = EmbeddedServer(tmp_path / "server.db", host="127.0.0.1").start()
    yield s
    s.stop()


def _load(server, n_ranges: int, cpu_per_event: float = 0.0) -> None:
    server.load_task(
        {
            "nJobs": 1,
            "nRanges": n_ranges,
            "nEventsPerRange": 2,
            "job": {
                "transformation": sys.executable,
                "jobPars": f"-m pilot.payloads.toysim --cpu-per-event {cpu_per_event}",
                "computingSite": QUEUE,
                "coreCount": 1,
            },
        }
    )


def _submit(tmp: Path, server, *extra: str) -> str:
    work, logs = tmp / "work", tmp / "logs"
    work.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    script = logs / f"job{len(list(logs.glob('job*.sh')))}.sh"
    argv = [
        "--scheduler", "slurm", "--nodes", "1", "--ranks-per-node", str(RANKS - 1),  # + Yoda
        "--oversubscribe", "--ulfm", "--walltime", "10",
        "--url", server.url, "--queue", QUEUE,
        "--workdir", str(work), "--log-dir", str(logs), "--job-name", "yoda-slurm-test",
        "--pilot-command", f"{sys.executable} -m pilot.cli",
        "--env", f"PYTHONPATH={REPO}", "--env", "PYTHONUNBUFFERED=1",
        "--env", f"OIDC_AUTH_TOKEN={server.token_file}",
        "--dry-run", "--script-out", str(script),
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "hpc.batch", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = script.read_text(encoding="utf-8")
    assert f"-m pilot.cli hpc --url {server.url} --queue {QUEUE}" in text
    assert "--with-ft ulfm" in text and "--oversubscribe" in text
    assert f"#SBATCH --ntasks={RANKS - 1}\n#SBATCH --overcommit" in text
    return submit_script("slurm", script).job_id


def _logs(tmp: Path) -> str:
    parts = []
    for p in sorted((tmp / "logs").glob("*.out")) + sorted((tmp / "logs").glob("*.err")):
        parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}")
    for p in sorted((tmp / "work" / "logs").glob("rank*.log")):
        parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts)


def _ended(job_id: str, tmp: Path, timeout: float) -> str:
    try:
        return wait_for_job(job_id, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs(tmp)}") from exc


def test_sbatch_yoda_droid_job_finishes_a_task(server, tmp_path: Path) -> None:
    _load(server, 45)
    job_id = _submit(tmp_path, server)
    state = _ended(job_id, tmp_path, 180)
    log = _logs(tmp_path)
    assert state == "COMPLETED", log
    assert "exit code 0" in log
    problems, counts = invariant(server, tmp_path / "work")
    assert problems == [], log
    assert counts == {"finished": 45}
    assert [j["status"] for j in server.store.jobs()] == ["finished"]
    droids = {int(p.name[5:]) for p in (tmp_path / "work").glob("droid*")}
    assert droids == set(range(1, RANKS)), log


def test_scancel_term_drains_and_loses_nothing(server, tmp_path: Path) -> None:
    n = 150
    _load(server, n, cpu_per_event=0.02)
    job_id = _submit(tmp_path, server)
    try:
        wait_for(lambda: accepted_terminal(server) >= 10, 120, f"first results of job {job_id}")
        # --batch: the batch shell, which passes TERM on to the ranks (hpc/batch.py)
        slurm("scancel", "--batch", "--signal=TERM", job_id)
    except AssertionError as exc:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=False)
        raise AssertionError(f"{exc}\nstate {job_state(job_id)}\n{_logs(tmp_path)}") from exc
    state = _ended(job_id, tmp_path, 150)
    log = _logs(tmp_path)
    assert state == "COMPLETED", log
    assert "SIGTERM, forwarding" in log

    work = tmp_path / "work"
    rep = replay(work / "yoda.journal")
    led = rep.ledger
    assert led.count(State.LEASED) == 0, log
    assert not rep.unsent, log  # every result Yoda journaled reached the dispatcher
    released = {led.range_id(r) for r in range(led.n) if led.state(r) is State.READY}
    problems, _ = invariant(server, work, require_all=False)
    assert problems == [], log
    ranges = server.store.ranges()
    by_status: dict[str, set[str]] = {}
    for r in ranges:
        by_status.setdefault(r["status"], set()).add(r["range_id"])
    # finished exactly once (invariant), or given back: handed to Yoda but not
    # reported (READY in its journal), or never fetched from the dispatcher at all
    assert set(by_status) <= {"finished", "sent", "ready"}, Counter(r["status"] for r in ranges)
    assert by_status.get("sent", set()) == released
    assert 0 < len(by_status.get("finished", ())) < n, "the drain came after the task ended"
    # a drain is not a failure: the job is neither failed nor finished yet
    assert [j["status"] for j in server.store.jobs()] not in (["failed"], ["finished"])

    # what was given back is still there: the next allocation finishes it
    job2 = _submit(tmp_path, server, "--resume")
    state = _ended(job2, tmp_path, 180)
    log = _logs(tmp_path)
    assert state == "COMPLETED", log
    problems, counts = invariant(server, work)
    assert problems == [], log
    assert counts == {"finished": n}
    assert [j["status"] for j in server.store.jobs()] == ["finished"]


def _first_try(tmp: Path, server, *extra: str) -> tuple[str, Path]:
    """What a new user types first: ``pilot hpc submit --scheduler slurm --nodes 1 --url
    URL --queue Q --workdir NEW``, all else the defaults (no walltime: the partition's)."""
    new = tmp / "NEW"
    assert not new.exists()
    proc = subprocess.run(
        [sys.executable, "-m", "pilot.cli", "hpc", "submit", "--scheduler", "slurm",
         "--nodes", "1", "--url", server.url, "--queue", QUEUE, "--workdir", str(new), *extra],
        cwd=tmp, capture_output=True, text=True, timeout=60, check=False,
        # the user's PanDA token, where PanDA's tools look for it (sbatch passes it on)
        env={**os.environ, "OIDC_AUTH_TOKEN": str(server.token_file)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert new.is_dir()  # made at submit time
    return proc.stdout.strip(), new


def _first_logs(tmp: Path) -> str:
    parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in tmp.glob("*.out")]
    for p in sorted((tmp / "NEW" / "logs").glob("rank*.log")):
        parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts)


def test_first_try_with_the_defaults_runs_the_job_to_the_end(server, tmp_path: Path) -> None:
    _load(server, 30)
    job_id, work = _first_try(tmp_path, server)
    try:
        state = wait_for_job(job_id, timeout=180)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_first_logs(tmp_path)}") from exc
    log = _first_logs(tmp_path)
    assert state == "COMPLETED", log
    problems, counts = invariant(server, work)
    assert problems == [] and counts == {"finished": 30}, log
    assert [j["status"] for j in server.store.jobs()] == ["finished"]
    assert {p.name for p in work.glob("droid*")} == {"droid1"}  # Yoda + one droid


def test_first_try_scancel_signal_term_drains_and_loses_nothing(server, tmp_path: Path) -> None:
    n = 150
    _load(server, n, cpu_per_event=0.02)
    job_id, work = _first_try(tmp_path, server)
    try:
        wait_for(lambda: accepted_terminal(server) >= 10, 120, f"first results of job {job_id}")
        # no --batch: Slurm signals the job's steps; the script's relay step passes it on
        slurm("scancel", "--signal=TERM", job_id)
        state = wait_for_job(job_id, timeout=150)
    except AssertionError as exc:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=False)
        raise AssertionError(f"{exc}\nstate {job_state(job_id)}\n{_first_logs(tmp_path)}") from exc
    log = _first_logs(tmp_path)
    assert state == "COMPLETED", log
    assert "SIGTERM, forwarding" in log
    rep = replay(work / "yoda.journal")
    led = rep.ledger
    assert led.count(State.LEASED) == 0 and not rep.unsent, log
    released = {led.range_id(r) for r in range(led.n) if led.state(r) is State.READY}
    problems, _ = invariant(server, work, require_all=False)
    assert problems == [], log
    by_status: dict[str, set[str]] = {}
    for r in server.store.ranges():
        by_status.setdefault(r["status"], set()).add(r["range_id"])
    assert set(by_status) <= {"finished", "sent", "ready"}
    assert by_status.get("sent", set()) == released  # given back, for the next job
    assert 0 < len(by_status.get("finished", ())) < n, "the drain came after the task ended"
