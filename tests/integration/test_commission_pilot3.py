"""Acceptance: this pilot and the PanDA pilot 3.7.0.36 through the shipped suite, at once.

``pilot commission --pilot-b pilot3`` with no wrapper: the shipped profile
runs the PanDA pilot from its sdist (found as test_server_realpilot finds
it; skipped, saying why, where it cannot be had), one process per job, on
its own clone, while this pilot runs on the other. The report must show
every field and the two known differences, judged: 1346 against 1149 for a
missing transform and 1328 against 1305 for a segfault, this pilot right.
The PanDA pilot waits 115 s before a failed job's final update (its
``wait_for_aborted_job_stageout``), which the dispatcher's times show; with
all its processes at once the run takes about 2.5 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import PYTHON
from tests.integration.test_server_realpilot import _find_sdist

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("state", "pilotErrorCode", "exeErrorCode", "transExitCode")


@pytest.fixture
def sdist() -> Path:
    found = _find_sdist()
    if found is None or not found.exists():
        reason = "panda-pilot 3.7.0.36 sdist not found (PANDA_PILOT_SDIST or ~/.cache/pilot-tests)"
        print(reason)
        pytest.skip(reason)
    if shutil.which("curl") is None:
        print("the PanDA pilot needs curl, which is not installed")
        pytest.skip("the PanDA pilot needs curl")
    return found


def _left_behind(workdir: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if str(workdir) in " ".join(p.info["cmdline"] or []) + (p.info["cwd"] or ""):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.mark.slow
def test_pilot3_against_this_pilot_shipped_suite(tmp_path: Path, sdist: Path) -> None:
    work, out, svg = tmp_path / "w", tmp_path / "report.json", tmp_path / "svg"
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "commission", "--pilot-b", "pilot3", "--pilot3-dir", str(sdist),
         "--workdir", str(work), "--json", str(out), "--svg-dir", str(svg), "--timeout", "400"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # they differ
    report = json.loads(out.read_text())
    assert report["names"] == {"A": "this", "B": "pilot3"}
    assert report["clones"] == {"A": "COMMISSION_A", "B": "COMMISSION_B"}
    assert report["pilots"]["B"]["version"] == "3.7.0.36"
    assert report["pilots"]["B"]["jobs_per_process"] == 1
    assert report["jobs_per_template"] == 3
    assert report["drives"]["B"]["started"] >= 15 and not report["drives"]["B"]["timed_out"]
    rows = {r["template"]: r for r in report["templates"]}
    assert set(rows) == {"success", "exit-code", "segfault", "not-found", "missing-output"}

    for r in rows.values():
        for side in ("A", "B"):
            s = r[side]
            assert s["n"] == 3 and len(s["jobs"]) == 3
            for job in s["jobs"]:
                assert job["state"] in ("finished", "failed"), (r["template"], side, job)
                for key in (*FIELDS, "pilotErrorDiag", "exeErrorDiag", "files", "updates"):
                    assert key in job
                assert job["updates"][0] == "starting" and job["updates"][-1] == job["state"]
                assert 0 <= job["first_update"] <= job["final_update"]
                assert job["handed_out"] is not None
            assert set(s["distributions"]) == set(FIELDS)
            assert any(f["lfn"].endswith(".log.tgz") for f in s["files"])
        pilot_ids = {j["pilot_id"] for j in r["B"]["jobs"]}
        assert all(p.endswith("3.7.0.36") for p in pilot_ids), pilot_ids

    # the known differences, flagged and judged
    nf = {d["field"]: d for d in rows["not-found"]["differences"]}
    assert (nf["pilotErrorCode"]["a"], nf["pilotErrorCode"]["b"]) == (1346, 1149)
    assert nf["pilotErrorCode"]["right"] == "A"
    sv = {d["field"]: d for d in rows["segfault"]["differences"]}
    assert (sv["pilotErrorCode"]["a"], sv["pilotErrorCode"]["b"]) == (1328, 1305)
    assert sv["pilotErrorCode"]["right"] == "A"
    assert sv["transExitCode"]["a"] == 139 and sv["transExitCode"]["right"] == "A"
    assert (
        "SIGSEGV: Invalid memory reference or a segmentation fault: payload killed"
        in (rows["segfault"]["A"]["pilotErrorDiag"])
    )
    assert rows["segfault"]["A"]["pilotErrorDiag"].count("Invalid memory reference") == 1
    assert not rows["not-found"]["agree"] and not rows["segfault"]["agree"]
    ex = {d["field"]: d for d in rows["exit-code"]["differences"]}
    assert (ex["exeErrorCode"]["a"], ex["exeErrorCode"]["b"], ex["exeErrorCode"]["right"]) == (
        7,
        0,
        "",
    )
    odd_b, n_odd_b = [], 0
    for name in ("success", "exit-code", "missing-output"):
        for key in ("state", "pilotErrorCode"):
            assert rows[name]["A"]["typical"][key] == rows[name]["B"]["typical"][key], name
        assert rows[name]["A"]["success_rate"] == 1.0, rows[name]["A"]["jobs"]
        n_odd_b += rows[name]["B"]["n"] - rows[name]["B"]["as_expected"]
        odd_b += [j for j in rows[name]["B"]["jobs"] if not _as_typical(j, rows[name]["B"])]
    # The PanDA pilot is not ours to make reliable: on a loaded machine one of its 9 jobs
    # here has now and then ended otherwise. One is tolerated, and shown; more is a fault
    # of the clones, the profile or the dispatcher.
    assert n_odd_b <= 1, [_describe(j, work / "b") for j in odd_b]
    for job in odd_b:
        print("the PanDA pilot's odd job:", _describe(job, work / "b"))
    result = {f["lfn"]: f for f in rows["success"]["B"]["files"]}["result.dat"]
    assert result == {f["lfn"]: f for f in rows["success"]["A"]["files"]}["result.dat"]
    assert result["fsize"] == 13 * 4096 and len(result["adler32"]) == 8

    # the dispatcher's clock: both at once, and the PanDA pilot's wait before a failed final
    a_end = max(
        j["handed_out_at"] + j["final_update"] for r in rows.values() for j in r["A"]["jobs"]
    )
    b_start = min(j["handed_out_at"] for r in rows.values() for j in r["B"]["jobs"])
    assert b_start < a_end
    # (the PanDA pilot usually waits about 115 s before a failed job's final update; not
    # always, so the test asks only that the dispatcher saw it later than this pilot's)
    seg = rows["segfault"]
    assert seg["B"]["times"]["final_update"]["max"] > seg["A"]["times"]["final_update"]["max"]

    table = proc.stdout
    assert "pilotErrorCode 1346 vs 1149: this right" in table
    assert "pilotErrorCode 1328 vs 1305: this right" in table
    assert "2/5 templates agree; 3 jobs per template" in table
    for suite in ("short", "failure"):
        picture = (svg / f"{suite}.svg").read_text()
        assert picture.startswith("<svg") and "pilot3" in picture
    assert "segfault *" in (svg / "failure.svg").read_text()
    assert not _left_behind(work)


def test_pilot3_profile_refuses_without_its_source(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PANDA_PILOT_SDIST"}
    env["HOME"] = str(tmp_path)  # no cache there
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "commission", "--pilot-b", "pilot3", "--workdir",
         str(tmp_path / "w")],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "PanDA pilot 3 source not found" in proc.stderr and "--pilot3-dir" in proc.stderr
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "commission", "--pilot-b", "pilot3", "--pilot3-dir",
         str(tmp_path / "nowhere.tar.gz"), "--workdir", str(tmp_path / "w2")],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 2 and "nowhere.tar.gz not found" in proc.stderr


@pytest.mark.slow
def test_stopping_a_run_mid_way_leaves_no_panda_pilot(tmp_path: Path, sdist: Path) -> None:
    work = tmp_path / "w"
    proc = subprocess.Popen(
        [PYTHON, "-m", "pilot.cli", "commission", "--pilot-b", "pilot3", "--pilot3-dir", str(sdist),
         "--only", "segfault", "--jobs", "2", "--workdir", str(work)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        # mid-way: both PanDA pilots have their job and are in its 115 s wait, or near it
        for _ in range(240):
            logs = list((work / "b").glob("pilot-*.out"))
            if len(logs) == 2 and all("payload execution command" in p.read_text() for p in logs):
                break
            time.sleep(0.5)
        pilots = [p for p in _left_behind(work) if "pilot.py" in " ".join(p.cmdline())]
        assert len(pilots) >= 2
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out.decode()[-2000:]
    left = [p for p in _left_behind(work) if p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]
    assert all(not p.is_running() for p in pilots)


def _as_typical(job: dict, side: dict) -> bool:
    return all(job[k] == side["typical"][k] for k in FIELDS)


WORRIES = ("| WARNING", "| ERROR", "| CRITICAL")


def _describe(job: dict, pilot_dir: Path) -> dict:
    """The job's record and the errors its pilot logged (the log that received it)."""
    found = []
    for log in sorted(pilot_dir.glob("pilot-*.out")):
        text = log.read_text(errors="replace")
        if f"received job: {job['panda_id']} " in text:
            found += [ln for ln in text.splitlines() if any(w in ln for w in WORRIES)]
    return {
        **{k: job[k] for k in (*FIELDS, "pilotErrorDiag", "panda_id")},
        "log": found[-20:],
    }
