"""Plays Harvester with Harvester's own SharedFileMessenger, around one pilot process.

Run with the Python of Harvester's environment (see ``tests/real_harvester.py``),
never the pilot's: ``python harvester_drive.py SCENARIO.json RESULT.json``.

The scenario names the access point, the map type (OneToOne, ManyToOne), the
mode (push: the jobs are fed before the pilot starts, as Harvester's submitter
does; pull: fed when the pilot asks), the getJob dicts, the event ranges per
PandaID, and the pilot's command line. Each monitor cycle makes the calls of
Harvester's ``harvesterbody/monitor.py``, in its order: kill_requested,
is_alive, get_work_attributes, get_files_to_stage_out, events_to_update,
events_requested (answered with feed_events) and acknowledge_events_files.
The result is what Harvester would tell PanDA: per job the updateJob
attributes (``get_job_attributes_for_panda``), status, job report, output
files, and every event update it read, plus the ranges it handed out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from pandaharvester.harvestercore import core_utils
from pandaharvester.harvestercore.file_spec import FileSpec
from pandaharvester.harvestercore.job_spec import JobSpec
from pandaharvester.harvestercore.work_spec import WorkSpec
from pandaharvester.harvestermessenger.shared_file_messenger import SharedFileMessenger

MAP_TYPES = {"OneToOne": WorkSpec.MT_OneToOne, "ManyToOne": WorkSpec.MT_MultiJobs}


def job_specs(dicts: list[dict[str, Any]], staged: dict[str, dict[str, str]]) -> list[JobSpec]:
    """Harvester's JobSpecs, with the inputs its preparator staged (``{PandaID: {lfn: path}}``)."""
    out = []
    for d in dicts:
        js = JobSpec()
        js.convert_job_json({k: str(v) for k, v in d.items()})
        js.PandaID, js.taskID = int(js.PandaID), int(js.taskID)  # integer columns in its DB
        for lfn, path in staged.get(str(js.PandaID), {}).items():
            fs = FileSpec()
            fs.lfn, fs.path, fs.fileType, fs.status = lfn, path, "input", "ready"
            js.add_in_file(fs)
        out.append(js)
    return out


def pilot_env(extra: dict[str, str]) -> dict[str, str]:
    """The pilot's own environment: nothing of Harvester's (PYTHONPATH, PANDA_HOME)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PANDA_HOME")}
    env.update(extra)
    return env


def main(argv: list[str]) -> int:
    sc = json.loads(open(argv[0]).read())
    messenger = SharedFileMessenger(**sc.get("messenger", {}))
    map_type = MAP_TYPES[sc["map_type"]]
    ws = WorkSpec()
    ws.workerID = 1
    ws.accessPoint = sc["ap"]
    ws.mapType = map_type
    ws.isNew = True
    ws.nCore = int(sc.get("n_core", 1))
    ws.status = WorkSpec.ST_running
    jobs = job_specs(sc["jobs"], sc.get("staged", {}))
    pool = {int(k): list(v) for k, v in sc.get("ranges", {}).items()}
    dispatched: dict[int, list[str]] = {js.PandaID: [] for js in jobs}
    requests: list[list[int]] = []
    files: dict[int, dict[str, list]] = {}
    events: dict[int, list[dict]] = {}
    alive: list[Any] = []
    fed = False

    def feed() -> None:
        nonlocal fed
        ws.set_jobspec_list(jobs)
        ws.pandaid_list = [js.PandaID for js in jobs]
        ws.hasJob = 1
        messenger.setup_access_points([ws])
        ws.isNew = False
        assert messenger.feed_jobs(ws, jobs)
        fed = True

    if sc["mode"] == "push":
        feed()
    else:
        ws.pandaid_list = []
        messenger.setup_access_points([ws])
        ws.isNew = False
    out = open(sc["pilot_log"], "wb")
    proc = subprocess.Popen(
        sc["pilot"], stdout=out, stderr=subprocess.STDOUT, env=pilot_env(sc.get("env", {}))
    )
    deadline = time.monotonic() + float(sc.get("timeout", 240))
    cycle = float(sc.get("cycle", 0.3))
    signal_at = sc.get("signal_after_events")
    signalled = False
    done_cycles = 0
    for _ in range(100_000):  # bounded by the deadline too
        if not fed and messenger.job_requested(ws):
            feed()
        killed = messenger.kill_requested(ws)
        if proc.poll() is None:  # while the worker runs: after its end the file ages
            alive.append(messenger.is_alive(ws, float(sc.get("heartbeat_minutes", 1.0))))
        if fed:
            ws.set_work_attributes(messenger.get_work_attributes(ws))
            for pid, lfns in messenger.get_files_to_stage_out(ws).items():
                for lfn, entries in lfns.items():
                    files.setdefault(pid, {}).setdefault(lfn, []).extend(entries)
            for pid, updates in messenger.events_to_update(ws).items():
                events.setdefault(pid, []).extend(updates)
            asked = messenger.events_requested(ws)
            if asked:
                answer = {}
                for key, request in asked.items():
                    pid, n = int(key), int(request["nRanges"])
                    requests.append([pid, n])
                    give, pool[pid] = pool.get(pid, [])[:n], pool.get(pid, [])[n:]
                    dispatched.setdefault(pid, []).extend(r["eventRangeID"] for r in give)
                    answer[pid] = give
                messenger.feed_events(ws, answer)
            messenger.acknowledge_events_files(ws)
        n_events = sum(len(v) for v in events.values())
        if signal_at is not None and not signalled and n_events >= signal_at:
            proc.send_signal(int(sc.get("signal", 15)))
            signalled = True
        if proc.poll() is not None and (killed or time.monotonic() > deadline):
            done_cycles += 1
            if done_cycles >= 2:  # one more full cycle after the end takes the last files
                break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            break
        time.sleep(cycle)
    ws.status = WorkSpec.ST_finished
    report: dict[str, Any] = {
        "pilot_rc": proc.returncode,
        "killed": messenger.kill_requested(ws),
        "alive": alive,
        "requests": requests,
        "dispatched": {str(k): v for k, v in dispatched.items()},
        "events": {str(k): v for k, v in events.items()},
        "jobs": {},
    }
    for js in jobs:
        core_utils.update_job_attributes_with_workers(
            map_type, [js], [ws], {ws.workerID: files}, [events]
        )
        report["jobs"][str(js.PandaID)] = {
            "attributes": js.get_job_attributes_for_panda(),
            "jobStatus": (js.jobAttributes or {}).get("jobStatus"),
            "status": js.status,
            "metaData": js.metaData,
            "outFiles": sorted([f.lfn, f.fileType, f.fsize, f.chksum, f.path] for f in js.outFiles),
            "post_processing": messenger.post_processing(ws, [js], map_type),
            "access_point": messenger.get_access_point(ws, js.PandaID),
        }
    with open(argv[1], "w") as fh:
        json.dump(report, fh, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
