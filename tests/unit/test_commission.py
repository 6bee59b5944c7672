"""Commissioning pieces on their own: queue descriptions, profiles, process trees, pictures."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from pilot.commission.panda import outcome_from_description
from pilot.commission.picture import suite_svg
from pilot.commission.procs import PilotProcess
from pilot.commission.profiles import (
    KNOWN_TRF_BASE,
    PandaPilot3,
    RunContext,
    _patched_config,
    resolve,
    url_transform,
)
from pilot.commission.queues import make_clone, pick_queue, pick_storages
from pilot.commission.report import JobOutcome, compare_template
from pilot.commission.templates import load_templates
from pilot.errors import PilotError

Q = {"nickname": "PQ", "copytools": {"rucio": {}}, "astorages": {"pw": ["PQ_DISK"]}}


def test_a_queue_is_found_in_every_form_cric_and_panda_give() -> None:
    assert pick_queue(Q)["nickname"] == "PQ"
    assert pick_queue({"PQ": {"copytools": {}}})["nickname"] == "PQ"
    assert pick_queue([Q, {"nickname": "OTHER"}], "OTHER")["nickname"] == "OTHER"
    with pytest.raises(PilotError, match="2 queues"):
        pick_queue([Q, {"nickname": "OTHER"}])
    with pytest.raises(PilotError, match="not in the description"):
        pick_queue(Q, "NOPE")
    assert set(pick_storages([{"name": "PQ_DISK", "type": "DATADISK"}])) == {"PQ_DISK"}
    with pytest.raises(PilotError):
        pick_storages("nonsense")


def test_a_clone_keeps_the_queue_and_renames_it(tmp_path: Path) -> None:
    c = make_clone(Q, {}, "PQ_2", storage_root=tmp_path)
    assert c.queue["nickname"] == c.queue["panda_resource"] == "PQ_2"
    assert c.queue["params"]["commission_clone_of"] == "PQ"
    assert set(c.storages) == {"PQ_DISK"} and (tmp_path / "PQ_DISK").is_dir()
    assert Q["nickname"] == "PQ" and Q["copytools"] == {"rucio": {}}  # the original untouched
    bare = make_clone({"nickname": "X"}, {}, "X_A", storage_root=tmp_path)
    assert set(bare.storages) == {"X_A_LOCALDISK"} and bare.queue["astorages"]["pl"] == [
        "X_A_LOCALDISK"
    ]


def test_the_generic_plugin_gets_a_transform_it_can_fetch(tmp_path: Path) -> None:
    assert url_transform("python3", tmp_path) == f"{KNOWN_TRF_BASE}/python3"
    script = (tmp_path / "python3").read_text()
    assert script.startswith("#!/bin/sh\nexec ") and os.access(tmp_path / "python3", os.X_OK)
    assert url_transform("no-such-trf-xyz", tmp_path) == f"{KNOWN_TRF_BASE}/no-such-trf-xyz"
    assert not (tmp_path / "no-such-trf-xyz").exists()
    assert url_transform("https://x.org/trf/run.sh", tmp_path) == "https://x.org/trf/run.sh"


def test_pilot3_settings_and_its_command(tmp_path: Path) -> None:
    text = "[Pilot]\n# heartbeat: comment\nheartbeat: 1800\ndebug_heartbeat: 60\nother: 1\n"
    out = _patched_config(text, {"heartbeat": "20", "debug_heartbeat": "20"})
    assert "heartbeat: 20\n" in out and "debug_heartbeat: 20" in out and "other: 1" in out
    assert "# heartbeat: comment" in out
    p3 = PandaPilot3(source=tmp_path)
    ctx = RunContext("http://127.0.0.1:8080", "127.0.0.1", 8080, "PQ_B", tmp_path / "b",
                     tmp_path / "tok")  # fmt: skip
    argv = p3.argv(ctx, 1)
    assert argv[:4] == ["/bin/sh", "-c", '"$@"; exit $?', "sh"]  # sh leads the session
    assert argv[argv.index("-q") + 1] == "PQ_B" and argv[argv.index("-p") + 1] == "8080"
    assert "--use-https" in argv and "-t" in argv
    env = p3.environment(ctx)
    assert env["PILOT_NOKILL"] == "1" and env["HARVESTER_WORKDIR"] == str(ctx.trf_dir)
    assert env["LOCAL_AGIS_SCHEDCONF"].endswith("/cache/schedconfig/PQ_B.json")
    with pytest.raises(PilotError, match="holds no pilot.py"):
        p3.prepare(ctx)


def test_a_profile_file(tmp_path: Path) -> None:
    f = tmp_path / "old.json"
    f.write_text(json.dumps({"command": "old-pilot {url}", "jobs_per_process": 1, "slots": 4}))
    p = resolve(str(f))
    assert (p.name, p.jobs_per_process, p.slots) == ("old", 1, 4)
    f.write_text(json.dumps({"command": "x", "transform": "zip"}))
    with pytest.raises(PilotError, match="transform"):
        resolve(str(f))
    assert resolve("some-pilot --go").command == "some-pilot --go"


def test_ending_a_pilot_ends_its_tree_even_what_left_its_session(tmp_path: Path) -> None:
    cmd = "trap '' TERM; sleep 300 & setsid sleep 301 & wait"
    proc = PilotProcess(["/bin/sh", "-c", cmd], cwd=tmp_path, env=dict(os.environ),
                        log=tmp_path / "log")  # fmt: skip
    for _ in range(100):
        if len(proc.members()) >= 3:
            break
        time.sleep(0.1)
    members = proc.members()
    assert len(members) >= 3
    assert any(os.getsid(p.pid) != proc.sid for p in members)  # the one in a session of its own
    proc.end(grace=1.0)
    gone = [p for p in members if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE]
    assert len(gone) == len(members)


def test_the_picture_has_a_bar_per_pilot_and_template() -> None:
    t = load_templates(names=["segfault"])[0]
    a = [JobOutcome(1, "failed", 1328, 139, 139, final_update=0.2)]
    b = [JobOutcome(2, "failed", 1305, 0, 244, final_update=118.4)]
    row = compare_template(t, {"A": a, "B": b}, {"A": "this", "B": "pilot3"})
    svg = suite_svg({"names": {"A": "this", "B": "pilot3"}, "templates": [row],
                     "jobs_per_template": 1}, "failure")  # fmt: skip
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("<rect") == 3  # background and two bars
    assert "pilot3: failed/1305 0/1 118 s" in svg and "segfault *" in svg
    assert "#3a9d3a" in svg and "#c83a3a" in svg  # as expected, not as expected


def test_a_real_server_description_becomes_an_outcome() -> None:
    d = {"PandaID": 7, "jobStatus": "failed", "pilotErrorCode": 1305, "exeErrorCode": 7,
         "transExitCode": "7", "pilotErrorDiag": "Failed", "pilotID": "x|3.7",
         "creationTime": {"__datetime__": "2026-01-01T00:00:00"},
         "startTime": {"__datetime__": "2026-01-01T00:00:02.5"},
         "endTime": {"__datetime__": "2026-01-01T00:00:10.5"},
         "Files": [{"lfn": "a.log.tgz", "type": "log", "fsize": 10, "checksum": "ad:0000abcd"},
                   {"lfn": "in.dat", "type": "input", "fsize": 1}]}  # fmt: skip
    o = outcome_from_description(7, d)
    assert (o.state, o.pilotErrorCode, o.transExitCode) == ("failed", 1305, 7)
    assert (o.handed_out, o.final_update) == (2.5, 8.0)
    assert o.files == [{"lfn": "a.log.tgz", "fsize": 10, "adler32": "0000abcd"}]
    assert outcome_from_description(7, {**d, "jobStatus": "running"}).state == "missing"
