"""The pilot's cost per PanDA call over /api/v1 and over the legacy API, in the same run.

``pilot serve`` runs in its own process (its CPU is read from /proc with
psutil, apart from the pilot's). The pilot's own client does, for each API
in turn and on fresh jobs of the same shape, what a pull-mode pilot of an
event-service job does: getJob, updateJob running, getEventRanges and
updateEventRanges in batches of ``--batch``, the final updateJob. Printed
per call kind: wall time per call, the pilot's CPU per call (this process:
building, encoding, decoding) and the server's CPU per call. The baseline,
measured in the same run: a bare HTTP round trip to ``/healthz`` with the
same session, which no API can go below.

Usage: ``python benchmarks/bench_api.py [--jobs 100] [--batch 100] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil
import requests
from bench_dispatcher import server_cpu as cpu
from bench_dispatcher import start_server

from pilot.comm.panda import PandaClient

TOKEN = "bench"  # the token bench_dispatcher's server is started with


def load(url: str, jobs: int, ranges: int) -> None:
    task = {"nJobs": jobs, "nRanges": ranges, "job": {"transformation": "x", "computingSite": "B"}}
    r = requests.post(
        f"{url}/admin/tasks", json=task, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300
    )
    r.raise_for_status()


def run(url: str, api: str, jobs: int, batch: int, server: psutil.Process) -> dict[str, list]:
    """Per call kind: [calls, wall s, pilot CPU s, server CPU s]."""
    client = PandaClient(url, token=TOKEN, retries=0, api=api)
    out: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])

    def timed(kind: str, fn, *args):
        w, c, s = time.perf_counter(), time.process_time(), cpu(server)
        value = fn(*args)
        row = out[kind]
        row[0] += 1
        row[1] += time.perf_counter() - w
        row[2] += time.process_time() - c
        row[3] += cpu(server) - s
        return value

    for _ in range(jobs):
        job = timed("getJob", client.get_job, "B")
        pid = int(job["PandaID"])
        fields = {"jobId": pid, "state": "running", "attemptNr": 1, "siteName": "B",
                  "node": "wn", "coreCount": 1, "cpuConsumptionUnit": "s"}  # fmt: skip
        timed("updateJob", client.update_job, fields)
        got = timed("getEventRanges", client.get_event_ranges, pid, 0, 0, batch)
        entries = [{"eventRangeID": r["eventRangeID"], "eventStatus": "finished"} for r in got]
        assert all(timed("updateEventRanges", client.update_event_ranges, entries))
        final = {**fields, "state": "finished", "pilotErrorCode": 0, "transExitCode": 0,
                 "startTime": "2026-01-01 00:00:00", "endTime": "2026-01-01 00:01:00",
                 "xml": "{}", "pilotTiming": "1|0|1|0|0|0"}  # fmt: skip
        timed("updateJob final", client.update_job, final)
    assert client.api_in_use.value == api
    return out


def baseline(url: str, n: int, server: psutil.Process) -> list:
    session = requests.Session()
    w, c, s = time.perf_counter(), time.process_time(), cpu(server)
    for _ in range(n):
        session.get(f"{url}/healthz", timeout=30).raise_for_status()
    return [n, time.perf_counter() - w, time.process_time() - c, cpu(server) - s]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs per API and round")
    parser.add_argument("--batch", type=int, default=100, help="ranges per job (one batch)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per API")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp), Path(tmp) / "s.db")
        try:
            server = psutil.Process(proc.pid)
            load(url, args.jobs * 2 * args.rounds, args.batch)
            totals: dict[str, dict[str, list]] = {}
            for _ in range(args.rounds):  # alternate, so that neither API gets a warmer server
                for api in ("legacy", "v1"):
                    for kind, row in run(url, api, args.jobs, args.batch, server).items():
                        acc = totals.setdefault(api, {}).setdefault(kind, [0, 0.0, 0.0, 0.0])
                        for i, v in enumerate(row):
                            acc[i] += v
            base = baseline(url, args.jobs * 5, server)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{args.jobs * args.rounds} jobs per API, {args.batch} ranges per batch; ms per call")
    print(f"{'call':<20}{'api':>7}{'calls':>7}{'wall':>9}{'pilot CPU':>11}{'server CPU':>12}")

    def line(kind: str, api: str, row: list) -> None:
        n = row[0]
        print(
            f"{kind:<20}{api:>7}{n:>7}{1e3 * row[1] / n:>9.2f}"
            f"{1e3 * row[2] / n:>11.2f}{1e3 * row[3] / n:>12.2f}"
        )

    for kind in totals["legacy"]:
        for api in ("legacy", "v1"):
            line(kind, api, totals[api][kind])
    line("HTTP /healthz", "-", base)
    for api in ("legacy", "v1"):
        rows = totals[api].values()
        n = sum(r[0] for r in rows)
        print(
            f"all calls {api:>7}: pilot CPU {1e3 * sum(r[2] for r in rows) / n:.2f} ms/call,"
            f" wall {1e3 * sum(r[1] for r in rows) / n:.2f} ms/call"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
