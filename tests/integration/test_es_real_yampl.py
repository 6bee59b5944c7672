"""The pilot driven by a payload on the real yampl library (its own Python binding).

The payload is what AthenaMP's side of the channel is: a yampl ClientSocket
in the LOCAL context, which finds the pilot at ipc:///tmp/zmq_<channel> by
the name the pilot wrote into its --preExec. It asks for ranges, reports
them (with yampl's trailing NUL), and stops at "No more events".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pilot.eventservice.executor import EventExecutor
from pilot.eventservice.model import RangeStatus
from pilot.job import EventRange, Job
from tests.tools.yampl import yampl_env

CLIENT = r"""
import json, os, re, sys, yampl
assert "pilot-tests-yampl" in os.path.dirname(yampl.__file__), yampl.__file__
name = re.search(r'EventRangeChannel="([^"]+)"', " ".join(sys.argv)).group(1)
sock = yampl.ClientSocket(name, "local")
done = 0
while True:
    sock.send_raw("Ready for events")
    size, raw = sock.recv_raw()
    text = raw.decode() if isinstance(raw, bytes) else raw
    if text == "No more events":
        break
    assert text.startswith("[{") and text.endswith("}]"), repr(text)
    r = json.loads(text)[0]
    out = os.path.abspath("out.%s.pool.root" % r["eventRangeID"])
    with open(out, "w") as fh:
        fh.write("events %s-%s of %s" % (r["startEvent"], r["lastEvent"], r["PFN"]))
    if r["startEvent"] == 3:
        sock.send_raw("ERR_ATHENAMP_PROCESS %s: Seek failed" % r["eventRangeID"])
    else:
        sock.send_raw("%s,ID:%s,CPU:0.5,WALL:0.7" % (out, r["eventRangeID"]))
    done += 1
print("real yampl client handled", done, "ranges")
"""


@pytest.fixture(scope="module")
def env():
    found, why = yampl_env()
    if found is None:
        print(f"SKIP real yampl: {why}")
        pytest.skip(why)
    return found


def test_real_yampl_client_runs_every_range_once(env, tmp_path: Path):
    script = tmp_path / "athena_like.py"
    script.write_text(CLIENT)
    job = Job.from_panda(
        {"PandaID": 7, "taskID": 3, "jobsetID": 2, "transformation": sys.executable,
         "jobPars": str(script), "eventService": "True"}
    )  # fmt: skip
    ranges = [EventRange(f"3-7-1-{i}-0", i + 1, i + 1, "EVNT.root", "guid") for i in range(6)]
    ex = EventExecutor(job, tmp_path / "w", env=env, mode="protocol")
    ex.start()
    ex.add_ranges(ranges)
    ex.no_more_ranges()
    results = []
    for _ in range(200):
        results += ex.poll(0.5)
        if ex.finished or ex.error is not None:
            break
    assert ex.finished and ex.error is None, (
        ex.error,
        (tmp_path / "w" / "payload.stderr").read_text(),
    )
    by_id = {r.event_range_id: r for r in results}
    assert len(by_id) == len(results) == 6
    failed = by_id.pop("3-7-1-2-0")
    assert failed.status is RangeStatus.FAILED and "Seek failed" in failed.error_diag
    assert all(r.status is RangeStatus.FINISHED and r.cpu == 0.5 for r in by_id.values())
    assert ex.bad_messages == 0
    assert "handled 6 ranges" in (tmp_path / "w" / "payload.stdout").read_text()
