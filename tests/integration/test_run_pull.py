"""Pull mode: `pilot run --url` against the embedded dispatcher on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from pilot.comm.panda import PandaClient, PandaUpstream
from pilot.comm.spool import Spool
from pilot.server.serve import EmbeddedServer
from tests.conftest import PYTHON, REPO, job_dict

BEHAVE = str(REPO / "tests" / "payloads" / "behave.py")


def jd(**kw):
    """A job definition for the server to number."""
    d = job_dict(**kw)
    d.pop("PandaID")
    return d


@pytest.fixture
def server(tmp_path: Path):
    with EmbeddedServer(tmp_path / "panda.db") as srv:
        yield srv


def pilot(
    server: EmbeddedServer, workdir: Path, *extra: str, timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "pilot.cli", "run", "--url", server.url, "--queue", "TEST_QUEUE", "--workdir", str(workdir),
         "--kill-grace", "2", "--token-file", str(server.token_file), *extra],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_three_jobs_to_their_final_states(server: EmbeddedServer, tmp_path: Path) -> None:
    ids = server.load_jobs(
        [
            jd(
                jobpars=f"{BEHAVE} write out.dat 1000",
                outFiles="out.dat,log.tgz",
                scopeOut="s",
                logFile="log.tgz",
            ),
            jd(jobpars=f"{BEHAVE} exit 7 broken", logFile="log2.tgz"),
            jd(jobpars=f"{BEHAVE} segv", logFile="log3.tgz"),
        ]
    )
    proc = pilot(server, tmp_path / "w")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # two of three failed
    assert "1 finished, 2 failed" in proc.stdout
    by_id = {int(r["panda_id"]): r["fields"] for r in server.final_records()}
    assert len(by_id) == 3
    ok, bad, segv = (by_id[i] for i in ids)
    assert ok["state"] == "finished" and int(ok["pilotErrorCode"]) == 0
    xml = json.loads(ok["xml"])
    assert xml["out.dat"]["fsize"] == 1000
    assert (
        bad["state"] == "failed"
        and int(bad["pilotErrorCode"]) == 1305
        and int(bad["transExitCode"]) == 7
    )
    assert segv["state"] == "failed" and int(segv["pilotErrorCode"]) == 1328
    # the server kept every heartbeat too: starting, running, then the final state
    states = [u["state"] for u in server.store.updates(ids[0])]
    assert states[0] == "starting" and states[-1] == "finished"


def test_server_kill_command(server: EmbeddedServer, tmp_path: Path) -> None:
    (panda_id,) = server.load_jobs([jd(jobpars=f"{BEHAVE} sleep 120")])
    done = threading.Event()

    def cancel_when_running() -> None:
        for _ in range(600):
            if any(u["state"] == "running" for u in server.store.updates(panda_id)):
                server.store.cancel_job(panda_id)
                return
            if done.wait(0.1):
                return

    t = threading.Thread(target=cancel_when_running, daemon=True)
    t.start()
    proc = pilot(server, tmp_path / "w", "--heartbeat", "1")
    done.set()
    t.join(5)
    (record,) = server.final_records(panda_id)
    final = record["fields"]
    assert final["state"] == "failed" and int(final["pilotErrorCode"]) == 1144, (
        proc.stdout + proc.stderr
    )


def test_no_server_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "run", "--url", "http://127.0.0.1:9", "--queue", "Q", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "1318" in proc.stderr or "1116" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_event_service_job_outputs_stored_before_reported(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    task = {
        "nRanges": 120,
        "nEventsPerRange": 2,
        "LFN": "EVNT.toy",
        "job": {"transformation": PYTHON, "jobPars": "-m pilot.payloads.toysim", "scopeLog": "toy",
                "logFile": "toy.log.tgz", "computingSite": "TEST_QUEUE"},
    }  # fmt: skip
    (panda_id,) = server.load_task(task)["PandaIDs"]
    proc = pilot(server, tmp_path / "w")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = server.store.query("SELECT status, COUNT(*) AS n FROM ranges GROUP BY status")
    assert {r["status"]: r["n"] for r in rows} == {"finished": 120}
    stored = sorted((tmp_path / "w" / "storage" / "toy").glob("toysim.*"))
    assert len(stored) == 120
    (record,) = server.final_records(panda_id)
    assert record["fields"]["state"] == "finished" and int(record["fields"]["nEvents"]) == 240


def test_token_and_api_options(server: EmbeddedServer, tmp_path: Path) -> None:
    (panda_id,) = server.load_jobs([jd(jobpars=f"{BEHAVE} exit 0", logFile="l.tgz")])
    bare = [PYTHON, "-m", "pilot.cli", "run", "--url", server.url, "--queue", "TEST_QUEUE",
            "--workdir", str(tmp_path / "w")]  # fmt: skip
    # without the token the server answers 403 and hands nothing out
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OIDC_", "PANDA_AUTH"))}
    proc = subprocess.run(bare, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 1 and "1318" in proc.stderr and "Traceback" not in proc.stderr
    assert server.store.job(panda_id)["status"] == "activated"
    empty = tmp_path / "empty.token"
    empty.write_text("")
    proc = subprocess.run([*bare, "--token-file", str(empty)], capture_output=True, text=True)
    assert proc.returncode == 1 and "1163" in proc.stderr
    # an option that cannot apply is refused
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "run", "--job-file", "x.json", "--panda-api", "v1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "--panda-api applies only with --url" in proc.stderr
    # PanDA's token variables, and the legacy API on request
    env.update(OIDC_AUTH_TOKEN=server.token_file.name, OIDC_AUTH_DIR=str(server.token_file.parent))
    proc = subprocess.run(
        [*bare, "--panda-api", "legacy"], capture_output=True, text=True, timeout=240, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = server.final_records(panda_id)
    assert record["fields"]["state"] == "finished"
    assert "timestamp" in record["fields"]  # a legacy update: v1 has no such parameter


def test_event_service_server_down_and_500_quirk_every_range_once(tmp_path: Path) -> None:
    """The server goes away mid-job and comes back, and every update_event_ranges answer is
    panda-server 1.0.4's HTTP 500 after the write: each range is still recorded exactly once."""
    quirk = {"update_event_ranges_500"}
    db = tmp_path / "panda.db"
    server = EmbeddedServer(db, quirks=quirk).start()
    port, token = server.port, server.token
    task = {
        "nRanges": 80,
        "nEventsPerRange": 2,
        "LFN": "EVNT.toy",
        "job": {"transformation": PYTHON, "jobPars": "-m pilot.payloads.toysim --cpu-per-event 0.02",
                "scopeLog": "toy", "logFile": "toy.log.tgz", "computingSite": "TEST_QUEUE"},
    }  # fmt: skip
    (panda_id,) = server.load_task(task)["PandaIDs"]
    proc = subprocess.Popen(
        [PYTHON, "-m", "pilot.cli", "run", "--url", server.url, "--queue", "TEST_QUEUE",
         "--workdir", str(tmp_path / "w"), "--token-file", str(server.token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for _ in range(600):  # until a few ranges are recorded
            if sum(server.store.range_update_counts().values()) >= 5 or proc.poll() is not None:
                break
            threading.Event().wait(0.05)
        server.stop()  # the server is down while the payload goes on
        threading.Event().wait(2.0)
        server = EmbeddedServer(db, port=port, token=token, quirks=quirk).start()
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        counts = server.store.range_update_counts()
        assert len(counts) == 80 and set(counts.values()) == {1}, counts
        assert server.store.range_counts(panda_id) == {"finished": 80}
        # a final update the server missed waits in the spool for the next pilot, which
        # sends it first thing; either way it is recorded once
        client = PandaClient(server.url, token=token, retries=0)
        assert PandaUpstream(client, Spool(tmp_path / "w" / "spool")).flush()[1] == 0
        (record,) = server.final_records(panda_id)
        assert record["fields"]["state"] == "finished"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        server.stop()
