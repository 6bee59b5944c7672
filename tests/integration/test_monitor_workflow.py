"""The monitor inside the real job loop: breaches reach the final update with their codes."""

from __future__ import annotations

import dataclasses
import json
import socket

from pilot.comm.base import LocalUpstream
from pilot.config import PilotConfig
from pilot.job import Job
from pilot.monitor.watch import make_monitor
from pilot.workflow import run_job
from tests.conftest import job_dict


def run(config: PilotConfig, d: dict) -> dict:
    job = Job.from_panda(d)
    run_job(
        job, config, LocalUpstream(config.job_workdir(job.panda_id)), monitor_factory=make_monitor
    )
    return json.loads((config.job_workdir(job.panda_id) / "final_update.json").read_text())


def test_memory_breach_fails_the_job_with_1235_and_metrics(config: PilotConfig) -> None:
    config = dataclasses.replace(config, monitor_interval=0.2, queue={"maxrss": "60"})
    hog = "import time; x = b'1' * (120 * 1024 * 1024); time.sleep(30)"
    final = run(config, job_dict(jobpars=f'-c "{hog}"'))
    assert final["state"] == "failed"
    assert int(final["pilotErrorCode"]) == 1235
    assert int(final["maxPSS"]) > 60 * 1024
    workdir = config.job_workdir(1001)
    assert "1235 PAYLOADEXCEEDMAXMEM" in (workdir / "monitor_evidence.txt").read_text()
    assert (workdir / "memory_monitor_output.txt").read_text().startswith("Time\tpss\trss")


def test_looping_job_is_1150(config: PilotConfig) -> None:
    config = dataclasses.replace(config, monitor_interval=0.2, queue={"looping_limit": "1"})
    final = run(config, job_dict(jobpars='-c "import time; time.sleep(30)"'))
    assert int(final["pilotErrorCode"]) == 1150


def test_connection_report_reaches_the_final_update(config: PilotConfig) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    try:
        config = dataclasses.replace(
            config, monitor_interval=0.2, queue={"connection_policy": "deny-all"}
        )
        code = f"import socket, time; s = socket.create_connection(('127.0.0.1', {port})); time.sleep(30)"
        final = run(config, job_dict(jobpars=f'-c "{code}"'))
    finally:
        server.close()
    assert int(final["pilotErrorCode"]) == 1008
    assert f"127.0.0.1:{port}" in final["pilotErrorDiag"]
    assert "outbound connections: 1 endpoint(s)" in final["pilotLog"]
