"""Whole jobs through ``pilot run`` with the rucio copytool and a real Rucio server."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from pilot.data.checksum import adler32_file
from tests.conftest import PYTHON, REPO, adler32_of, job_dict
from tests.rucio.conftest import seed, wait_for_traces
from tests.tools.rucio_server import SCOPE, RucioServer

COPY = "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])\n"


def rucio_job(tmp: Path, panda_id: int, name_in: str, data: bytes, name_out: str, dataset: str):
    script = tmp / "copy.py"
    script.write_text(COPY)
    return job_dict(
        panda_id,
        jobpars=f"{script} {name_in} {name_out}",
        inFiles=name_in,
        scopeIn=SCOPE,
        GUID=str(uuid.uuid4()),
        fsize=str(len(data)),
        checksum=f"ad:{adler32_of(data)}",
        ddmEndPointIn="LOCAL_DISK",
        outFiles=f"{name_out},log.{panda_id}.tgz",
        scopeOut=SCOPE,
        scopeLog=SCOPE,
        logGUID=str(uuid.uuid4()),
        ddmEndPointOut="LOCAL_DISK2,LOCAL_DISK2",
        destinationDblock=f"{dataset},{dataset}",
        realDatasets=f"{dataset},{dataset}",
    )


def pilot_run(
    server: RucioServer, tmp: Path, job: dict[str, Any], *extra: str, env: dict | None = None
):
    job_file = tmp / f"job{job['PandaID']}.json"
    job_file.write_text(json.dumps(job))
    run_env = {**os.environ, "RUCIO_CONFIG": str(server.client_config), **(env or {})}
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "run", "--job-file", str(job_file)]
        + ["--workdir", str(tmp / "work"), "--copytool", "rucio", *extra],
        cwd=REPO,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    final = tmp / "work" / f"PandaJob_{job['PandaID']}" / "final_update.json"
    return proc, json.loads(final.read_text())


def test_a_job_with_a_did_input_runs_and_its_output_is_registered(
    rucio_server, rucio_client, tmp_path, unique
) -> None:
    data = os.urandom(50000)
    name_in, name_out, dataset = f"EVNT.{unique}.root", f"HITS.{unique}.root", f"ds.{unique}_sub0"
    seed(rucio_server, rucio_client, name_in, data, tmp=tmp_path / "seed")
    job = rucio_job(tmp_path, 7001, name_in, data, name_out, dataset)
    proc, record = pilot_run(rucio_server, tmp_path, job)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert record["state"] == "finished" and record["pilotErrorCode"] == 0
    work = tmp_path / "work" / "PandaJob_7001"
    produced = work / name_out
    (rep,) = rucio_client.list_replicas([{"scope": SCOPE, "name": name_out}])
    assert list(rep["rses"]) == ["LOCAL_DISK2"] and rep["adler32"] == adler32_file(produced)
    content = sorted(c["name"] for c in rucio_client.list_content(SCOPE, dataset))
    assert content == sorted([name_out, "log.7001.tgz"])
    files = json.loads(record["xml"])
    assert files[name_out]["adler32"] == adler32_file(produced)
    assert rucio_client.get_metadata(SCOPE, name_out)["guid"] == files[name_out]["guid"].replace(
        "-", ""
    )
    assert rucio_client.get_metadata(SCOPE, "log.7001.tgz")["guid"] == job["logGUID"].replace(
        "-", ""
    )
    # one trace per transfer, the pilot's own (Rucio's format), none from the client
    names = {name_in, name_out, "log.7001.tgz"}
    traces = wait_for_traces(
        rucio_server,
        lambda ts: {t.get("filename") for t in ts if t.get("appid") == "7001"} >= names,
    )
    ours = [t for t in traces if t.get("filename") in names]
    assert sorted((t["eventType"], t["filename"], t["clientState"]) for t in ours) == sorted(
        [
            ("get_sm", name_in, "DONE"),
            ("put_sm", name_out, "DONE"),
            ("put_sm", "log.7001.tgz", "DONE"),
        ]
    )
    assert all(t["eventVersion"].startswith("pandapilot") and t["scope"] == SCOPE for t in ours)
    by_name = {t["filename"]: t for t in ours}
    assert by_name[name_in]["remoteSite"] == "LOCAL_DISK"
    assert by_name[name_out]["remoteSite"] == "LOCAL_DISK2"
    assert by_name[name_out]["dataset"] == dataset and by_name[name_out]["url"].startswith(
        "file://"
    )
    problems = [
        line
        for line in rucio_server.trace_file.read_text().splitlines()
        if not line.startswith("{") and any(n in line for n in names)
    ]
    assert not problems  # the server's schema check took them


def test_a_job_with_a_missing_did_fails_with_missinginputfile(
    rucio_server, tmp_path, unique
) -> None:
    job = rucio_job(tmp_path, 7002, f"gone.{unique}", b"x", f"out.{unique}", f"ds.{unique}")
    proc, record = pilot_run(rucio_server, tmp_path, job)
    assert proc.returncode == 1
    assert record["state"] == "failed" and record["pilotErrorCode"] == 1331, record
