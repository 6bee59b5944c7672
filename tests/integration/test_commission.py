"""Commissioning: a suite through two pilots at once, each on its clone of one queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from pilot.commission.queues import load_clones
from pilot.commission.report import JobOutcome, compare_template, render_table
from pilot.commission.templates import load_templates, template_from_job
from pilot.errors import PilotError
from tests.conftest import PYTHON

REPO = Path(__file__).resolve().parents[2]


def _commission(
    tmp_path: Path, *args: str, timeout: float = 600
) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "commission", "--workdir", str(tmp_path / "w"),
         "--json", str(out), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip
    report = json.loads(out.read_text()) if out.exists() else {}
    return proc, report


def test_two_runs_of_this_pilot_agree_and_meet_expectations(tmp_path: Path) -> None:
    proc, report = _commission(tmp_path, "--svg-dir", str(tmp_path / "svg"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = report["templates"]
    assert {r["template"] for r in rows} == {t.name for t in load_templates(suite="default")}
    assert report["clones"] == {"A": "COMMISSION_A", "B": "COMMISSION_B"}
    for r in rows:
        assert r["agree"] and not r["differences"], r["differences"]
        for side in ("A", "B"):
            assert r[side]["n"] == 3 and r[side]["as_expected"] == 3
            assert r[side]["updates"] == ["starting", "running", r["expect"]["state"]]
            times = r[side]["times"]
            assert times["final_update"]["min"] >= times["first_update"]["min"] >= 0
    (ok,) = [r for r in rows if r["template"] == "success"]
    (result,) = [f for f in ok["A"]["files"] if f["lfn"] == "result.dat"]
    assert result["fsize"] == 13 * 4096 and len(result["adler32"]) == 8
    assert "5/5 templates agree; 3 jobs per template" in proc.stdout
    for suite in ("short", "failure"):
        svg = (tmp_path / "svg" / f"{suite}.svg").read_text()
        assert svg.startswith("<svg") and "segfault" in svg or suite == "short"


def test_a_pilot_that_stops_early_disagrees(tmp_path: Path) -> None:
    lazy = "{python} -m pilot.cli run --url {url} --queue {queue} --workdir {workdir} --max-jobs 2"
    proc, report = _commission(tmp_path, "--pilot-b", lazy, "--name-b", "lazy", "--jobs", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    states = {r["template"]: r["B"]["typical"]["state"] for r in report["templates"]}
    assert list(states.values()).count("missing") == 3
    assert "2/5 templates agree" in proc.stdout and "state finished vs missing" in proc.stdout


def _outcome(pid: int, state: str, pec: int, exe: int, trf: int) -> JobOutcome:
    return JobOutcome(pid, state, pec, exe, trf, updates=["starting", "running", state],
                      files=[{"lfn": "commission.segv.log.tgz", "fsize": pid, "adler32": "x"}],
                      first_update=0.1, final_update=float(pid))  # fmt: skip


def test_differences_are_flagged_and_judged_by_the_template() -> None:
    (t,) = load_templates(names=["segfault"])
    ours = [_outcome(i, "failed", 1328, 139, 139) for i in (1, 2, 3)]
    theirs = [_outcome(i, "failed", 1305, 0, 244) for i in (4, 5)] + [
        _outcome(6, "failed", 1305, 0, 139)
    ]
    row = compare_template(t, {"A": ours, "B": theirs}, {"A": "ours", "B": "theirs"})
    diffs = {d["field"]: d for d in row["differences"]}
    assert not row["agree"] and set(diffs) == {"pilotErrorCode", "exeErrorCode", "transExitCode"}
    assert diffs["pilotErrorCode"]["right"] == "A" and "1328" in diffs["pilotErrorCode"]["reason"]
    assert diffs["transExitCode"]["right"] == "A"  # B's 244/139 mix is not the convention
    assert diffs["transExitCode"]["b"] == {"244": 2, "139": 1}
    assert diffs["exeErrorCode"]["right"] == ""  # no convention decides it
    assert row["A"]["success_rate"] == 1.0 and row["B"]["success_rate"] == 0.0
    report = {"names": {"A": "ours", "B": "theirs"}, "templates": [row], "jobs_per_template": 3}
    table = render_table(report)
    assert "pilotErrorCode 1328 vs 1305: ours right" in table
    assert "exeErrorCode 139 vs 0: undecided" in table
    assert "0/1 templates agree" in table


def test_bad_template_directory_and_suite(tmp_path: Path) -> None:
    with pytest.raises(PilotError):
        load_templates(tmp_path)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PilotError):
        load_templates(tmp_path)
    with pytest.raises(PilotError):
        load_templates(suite="nightly")
    assert {t.name for t in load_templates(suite="all")} >= {"long", "container", "event-service"}


def test_a_real_job_definition_becomes_a_template() -> None:
    job = {"PandaID": 4711, "jobsetID": 3, "attemptNr": 2, "transformation": "python3",
           "jobPars": "-c pass", "jobName": "prod.4711", "outFiles": "a.log.tgz"}  # fmt: skip
    t = template_from_job(job)
    assert t["name"] == "prod.4711" and "PandaID" not in t["job"] and t["job"]["attemptNr"] == "1"
    with pytest.raises(PilotError):
        template_from_job({"jobName": "x"})


# -- queue clones -------------------------------------------------------------------------------


PRODUCTION_QUEUE = {
    "CERN-PROD_UCORE": {
        "nickname": "CERN-PROD_UCORE", "panda_resource": "CERN-PROD_UCORE",
        "atlas_site": "CERN-PROD", "site": "CERN-PROD", "type": "unified", "status": "online",
        "maxrss": 16000, "maxwdir": 30000, "maxtime": 172800, "corecount": 8,
        "container_type": "apptainer:pilot;docker:wrapper", "container_options": "--cleanenv",
        "copytools": {"rucio": {"setup": ""}, "xrdcp": {}},
        "acopytools": {"pr": ["rucio"], "pw": ["rucio"], "pl": ["rucio"]},
        "astorages": {"pr": ["CERN-PROD_DATADISK"], "pw": ["CERN-PROD_DATADISK"],
                      "pl": ["CERN-PROD_DATADISK"]},
        "params": {"unified": True},
    }
}  # fmt: skip
ENDPOINTS = {
    "CERN-PROD_DATADISK": {
        "name": "CERN-PROD_DATADISK", "site": "CERN-PROD", "type": "DATADISK",
        "is_deterministic": True, "state": "ACTIVE",
        "arprotocols": {"read_lan": [{"endpoint": "root://eosatlas.cern.ch:1094",
                                      "path": "/eos/atlas/atlasdatadisk/rucio", "flavour": "XROOTD"}]},
    }
}  # fmt: skip


def _serve_files(root: Path) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            path = root / self.path.lstrip("/")
            body = path.read_bytes() if path.is_file() else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_production_queue_with_a_container_and_storage_is_cloned(tmp_path: Path) -> None:
    (tmp_path / "queue.json").write_text(json.dumps(PRODUCTION_QUEUE))
    (tmp_path / "ddm.json").write_text(json.dumps(ENDPOINTS))
    http = _serve_files(tmp_path)
    try:
        url = f"http://127.0.0.1:{http.server_address[1]}"
        original, (a, b) = load_clones(f"{url}/queue.json", f"{url}/ddm.json", ["{queue}_A", "PQ_2"],
                                       storage_root=tmp_path / "st")  # fmt: skip
    finally:
        http.shutdown()
    assert original == "CERN-PROD_UCORE" and (a.name, b.name) == ("CERN-PROD_UCORE_A", "PQ_2")
    assert a.queue["container_type"] == "apptainer:pilot;docker:wrapper"
    assert a.queue["corecount"] == 8 and a.queue["maxrss"] == 16000
    assert a.queue["acopytools"]["pw"] == ["mv"]
    assert set(a.storages) == {"CERN-PROD_DATADISK"}
    disk = a.storages["CERN-PROD_DATADISK"]
    assert disk["type"] == "DATADISK" and disk["is_deterministic"] is True
    assert disk["arprotocols"]["write_lan"][0]["path"] == str(
        tmp_path / "st/CERN-PROD_UCORE_A/CERN-PROD_DATADISK"
    )
    # unchanged storage: the endpoint as the queue has it
    _, (keep,) = load_clones(tmp_path / "queue.json", tmp_path / "ddm.json", ["X"])
    assert keep.queue["copytools"] == PRODUCTION_QUEUE["CERN-PROD_UCORE"]["copytools"]
    assert keep.storages["CERN-PROD_DATADISK"] == ENDPOINTS["CERN-PROD_DATADISK"]
    with pytest.raises(PilotError):
        load_clones(tmp_path / "queue.json", None, ["X"])  # names storage it cannot describe

    # both pilots see their clone: each reads what the dispatcher serves it, then runs
    look = (
        "curl -sf {queuedata_url} > seen-queue.json && curl -sf {storagedata_url} > seen-ddm.json"
        " && {python} -m pilot.cli run --url {url} --queue {queue} --workdir {workdir}"
    )
    proc, report = _commission(
        tmp_path, "--pilot-a", look, "--pilot-b", look, "--only", "success", "--jobs", "1",
        "--queue-description", str(tmp_path / "queue.json"),
        "--storage-endpoints", str(tmp_path / "ddm.json"), "--clone-b", "PQ_2",
    )  # fmt: skip
    assert report["clones"] == {"A": "CERN-PROD_UCORE_A", "B": "PQ_2"}, proc.stderr
    for side, name in report["clones"].items():
        seen = json.loads((tmp_path / "w" / side.lower() / "seen-queue.json").read_text())
        assert seen["nickname"] == name and seen["container_type"].startswith("apptainer")
        assert seen["astorages"]["pw"] == ["CERN-PROD_DATADISK"]
        ddm = json.loads((tmp_path / "w" / side.lower() / "seen-ddm.json").read_text())
        assert "CERN-PROD_DATADISK" in ddm


# -- stopping a run ---------------------------------------------------------------------------


def _marked(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []) or (
                (p.info["environ"] or {}).get("COMMISSION_MARK") == marker
            ):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_a_run_leaves_no_pilot_process(tmp_path: Path, signum: int) -> None:
    marker = f"commission-kill-{os.getpid()}-{signum}"
    # a "pilot" with a child, a grandchild, and one that leaves for a session of its own
    profile = tmp_path / "stubborn.json"
    profile.write_text(json.dumps({
        "command": "trap '' TERM; sleep 600 & setsid sleep 601 & (sleep 602 & wait) & wait",
        "env": {"COMMISSION_MARK": marker}, "jobs_per_process": 1, "slots": 2,
    }))  # fmt: skip
    cmd = [PYTHON, "-m", "pilot.cli", "commission", "--workdir", str(tmp_path / "w"),
           "--pilot-b", str(profile), "--only", "success", "--jobs", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            if len([p for p in _marked(marker) if p.name() == "sleep"]) >= 6:
                break
            time.sleep(0.5)
        assert len([p for p in _marked(marker) if p.name() == "sleep"]) >= 6
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, out.decode()
    assert b"stopped by signal" in out
    left = [p for p in _marked(marker) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:
        p.kill()
    assert not left, [p.cmdline() for p in left]
