"""User containers: bubblewrap for real, apptainer by its exact command line."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from pilot.comm.base import LocalUpstream
from pilot.config import PilotConfig
from pilot.errors import ErrorCode, PilotError
from pilot.job import Job
from pilot.payload.container import ContainerSpec, wrap
from pilot.workflow import run_job
from tests.conftest import PYTHON, job_dict


def test_queue_container_type() -> None:
    spec = ContainerSpec.from_queue(
        {"container_type": "apptainer:pilot", "container_options": "--cleanenv"}
    )
    assert spec is not None and spec.runtime == "apptainer" and spec.options == ("--cleanenv",)
    assert ContainerSpec.from_queue({"container_type": ""}) is None
    assert ContainerSpec.from_queue({"container_type": "docker:wrapper"}) is None


def test_apptainer_command_is_exact(tmp_path: Path) -> None:
    spec = ContainerSpec(
        "apptainer", image="docker://alpine:3", options=("--cleanenv",), network=False
    )
    argv = wrap("echo 'a b'", tmp_path, spec, runtime_path="/usr/bin/apptainer")
    w = str(tmp_path.resolve())
    assert argv == [
        "/usr/bin/apptainer", "exec", "--pwd", w, "-B", w, "--net", "--network", "none",
        "--cleanenv", "docker://alpine:3", "/bin/sh", "-c", "echo 'a b'",
    ]  # fmt: skip


def test_missing_runtime_and_image(tmp_path: Path) -> None:
    with pytest.raises(PilotError) as info:
        wrap("true", tmp_path, ContainerSpec("apptainer"), runtime_path="/x/apptainer")
    assert info.value.code == ErrorCode.IMAGENOTFOUND
    with pytest.raises(PilotError) as info:
        wrap(
            "true",
            tmp_path,
            ContainerSpec("bwrap", image=str(tmp_path / "nope")),
            runtime_path="/usr/bin/bwrap",
        )
    assert info.value.code == ErrorCode.IMAGENOTFOUND


def test_payload_runs_in_bubblewrap(bwrap: None, config: PilotConfig) -> None:
    cfg = replace(config, container=ContainerSpec("bwrap"))
    script = "import os; open('pid.txt','w').write(str(os.getpid())); print('in container')"
    job = Job.from_panda(job_dict(jobpars=f'-c "{script}"'))
    result = run_job(job, cfg, LocalUpstream(cfg.job_workdir(job.panda_id)))
    assert result.state == "finished", result.pilot_error_diag
    # a new PID namespace: the payload sees itself as one of the first processes
    assert int((cfg.job_workdir(job.panda_id) / "pid.txt").read_text()) < 10
    rec = json.loads((cfg.job_workdir(job.panda_id) / "final_update.json").read_text())
    assert "in container" in rec["pilotLog"]


def test_no_network_container_cannot_connect(bwrap: None, config: PilotConfig) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        cfg = replace(config, container=ContainerSpec("bwrap", network=False))
        script = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)"
        job = Job.from_panda(job_dict(jobpars=f'-c "{script}"', transformation=PYTHON))
        result = run_job(job, cfg, LocalUpstream(cfg.job_workdir(job.panda_id)))
        assert result.state == "failed"
        assert (
            "ConnectionRefusedError"
            in (cfg.job_workdir(job.panda_id) / "payload.stderr").read_text()
        )
    finally:
        server.close()
