"""The real PanDA pilot (PyPI ``panda-pilot`` 3.7) takes a job from ``pilot serve``.

The PanDA pilot's package is also called ``pilot``, so it is never installed
next to this project: its source distribution is unpacked and run as
``python pilot.py`` from its own directory. The test looks for it in
``$PANDA_PILOT_SDIST`` (a .tar.gz or an unpacked directory) or in
``~/.cache/pilot-tests/panda-pilot-*.tar.gz``, put there with
``pip download --no-deps --no-binary :all: panda-pilot==3.7.0.36 -d ~/.cache/pilot-tests``;
without it the test is skipped, saying so. When neither is there, the test fetches the sdist from PyPI into that
cache (``pip download``, never installed).

How the PanDA pilot is kept on 127.0.0.1 and harmless:

- ``PILOT_NOKILL=1`` and a new session: at the end of a job it otherwise
  kills every process group of the user whose parent is PID 1;
- every description comes from ``pilot serve``: the queue
  (``--queuedata-url`` .../<queue>.all.json), the full CRIC form
  (``$LOCAL_AGIS_SCHEDCONF`` .../<queue>.json) and the storage endpoints
  (``--storagedata-url`` .../ddmendpoints.json): one local ``file://``
  endpoint for its ``mv`` copytool;
- its ``generic`` plugin runs a transformation given as a URL on a known
  host, and copies it from ``$HARVESTER_WORKDIR`` instead of fetching it
  when that is set: the script is put there, nothing is downloaded;
- ``-t`` (no proxy check), ``--use-https False``, ``--use-rucio-traces False``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import psutil
import pytest

from pilot.server.serve import EmbeddedServer

QUEUE = "TESTQ"
KNOWN_TRF_BASE = "http://pandaserver-doma.cern.ch:25080/trf/user"


PANDA_PILOT = "panda-pilot==3.7.0.36"
CACHE = Path.home() / ".cache" / "pilot-tests"


def _find_sdist() -> Path | None:
    given = os.environ.get("PANDA_PILOT_SDIST")
    if given:
        return Path(given)
    found = sorted(CACHE.glob("panda-pilot-*.tar.gz"))
    if not found:
        _download_sdist()
        found = sorted(CACHE.glob("panda-pilot-*.tar.gz"))
    return found[-1] if found else None


def _download_sdist() -> None:
    """Fetch the PanDA pilot's source distribution from PyPI into the cache, once.

    Only the sdist, never installed: its package is also called ``pilot``.
    Without package access the test skips, saying why.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    try:
        subprocess.run(
            [*cmd, PANDA_PILOT, "-d", str(CACHE)], capture_output=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        pass


def _unpack(sdist: Path, into: Path) -> Path:
    if sdist.is_dir():
        return sdist
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)
    (top,) = [p for p in into.iterdir() if p.is_dir()]
    return top


def _kill_session(sid: int) -> None:
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                proc.kill()
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue


@pytest.fixture
def panda_pilot(tmp_path: Path) -> Path:
    sdist = _find_sdist()
    if sdist is None or not sdist.exists():
        reason = (
            "panda-pilot source not found: run `pip download --no-deps --no-binary :all: "
            "panda-pilot==3.7.0.36 -d ~/.cache/pilot-tests` or set PANDA_PILOT_SDIST"
        )
        print(reason)
        pytest.skip(reason)
    if shutil.which("curl") is None:
        print("the PanDA pilot needs curl, which is not installed")
        pytest.skip("the PanDA pilot needs curl")
    top = _unpack(sdist, tmp_path / "panda-pilot")
    if not (top / "pilot.py").is_file():
        pytest.skip(f"{sdist} holds no pilot.py")
    return top


def _site(storage: Path) -> tuple[dict, dict]:
    """The queue and its one storage endpoint, as CRIC describes them."""
    endpoint = [{"endpoint": "file://localhost", "path": str(storage), "flavour": "POSIX"}]
    queue = {
        "nickname": QUEUE,
        "panda_resource": QUEUE,
        "name": QUEUE,
        "site": "TESTSITE",
        "state": "ACTIVE",
        "status": "online",
        "type": "production",
        "maxrss": 2000,
        "maxwdir": 14336,
        "maxtime": 3600,
        "corecount": 1,
        "copytools": {"mv": {"setup": ""}},
        "acopytools": {"pr": ["mv"], "pw": ["mv"], "pl": ["mv"]},
        "astorages": {"pr": ["LOCAL_DISK"], "pw": ["LOCAL_DISK"], "pl": ["LOCAL_DISK"]},
        "container_type": "",
        "is_cvmfs": False,
        "maxinputsize": 14336,
        "params": {},
    }
    storages = {
        "LOCAL_DISK": {
            "name": "LOCAL_DISK",
            "site": "TESTSITE",
            "type": "DATADISK",
            "is_deterministic": True,
            "state": "ACTIVE",
            "is_tape": False,
            "arprotocols": {
                k: endpoint for k in ("read_lan", "read_wan", "write_lan", "write_wan")
            },
            "rprotocols": {},
        }
    }
    return queue, storages


@pytest.mark.slow
def test_real_panda_pilot_runs_a_job_from_pilot_serve(tmp_path: Path, panda_pilot: Path) -> None:
    storage, workdir, trf = tmp_path / "storage", tmp_path / "work", tmp_path / "trf"
    for d in (storage, workdir, trf):
        d.mkdir()
    (trf / "run.sh").write_text('#!/bin/sh\necho "payload says $*"\nexit 0\n')
    (trf / "run.sh").chmod(0o755)
    queue, storages = _site(storage)
    job = {
        "transformation": f"{KNOWN_TRF_BASE}/run.sh",
        "jobPars": "hello world",
        "computingSite": QUEUE,
        "prodSourceLabel": "ptest",
        "jobName": "realpilot.1",
        "logFile": "log.realpilot.tgz",
        "outFiles": "log.realpilot.tgz",
        "logGUID": "8a3d9e38-4d2c-4b8e-9b5e-3b2c1d0e9f11",
        "scopeLog": "test",
        "scopeOut": "test",
        "realDatasets": "test.log",
        "destinationDblock": "test.log",
        "ddmEndPointOut": "LOCAL_DISK",
        "fileDestinationSE": "LOCAL_DISK",
        "destinationSE": "LOCAL_DISK",
        "coreCount": "1",
        "maxWalltime": "600",
    }
    with EmbeddedServer(tmp_path / "server.db", token="tok") as server:
        (pid,) = server.load_jobs(job)
        server.store.put_queue(QUEUE, queue)
        server.store.put_storages(storages)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("X509", "PANDA", "OIDC"))}
        env.update(
            PILOT_NOKILL="1",
            # the full CRIC-style description, from the dispatcher too
            LOCAL_AGIS_SCHEDCONF=f"{server.url}/cache/schedconfig/{QUEUE}.json",
            HARVESTER_WORKDIR=str(trf),
            # the dispatcher's token, where the PanDA pilot looks for one (an absolute path
            # in $OIDC_AUTH_TOKEN wins over $OIDC_AUTH_DIR); it sends it with an Origin
            OIDC_AUTH_TOKEN=str(server.token_file),
            OIDC_AUTH_ORIGIN="atlas.pilot",
            PYTHONNOUSERSITE="1",
        )
        argv = [
            sys.executable, "pilot.py", "-q", QUEUE, "-r", QUEUE, "-s", QUEUE,
            "--pilot-user", "generic", "-w", "generic", "-j", "ptest",
            "--url", "http://127.0.0.1", "-p", str(server.port),
            "--queuedata-url", f"{server.url}/cache/schedconfig/{QUEUE}.all.json",
            "--storagedata-url", f"{server.url}/cache/ddmendpoints.json",
            "-a", str(workdir), "-d", "-t", "-v", "1",
            "--use-https", "False", "--use-rucio-traces", "False",
        ]  # fmt: skip
        log = tmp_path / "panda-pilot.out"
        # sh leads the new session, so the PanDA pilot may make its own process group
        command = " ".join(f"'{a}'" for a in argv) + f" > '{log}' 2>&1; rc=$?; exit $rc"
        proc = subprocess.Popen(
            ["sh", "-c", command], cwd=panda_pilot, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _kill_session(proc.pid)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        assert rc == 0, f"PanDA pilot exit {rc}:\n{tail}"
        (record,) = server.final_records(pid)
        fields = record["fields"]
        assert fields["state"] == "finished", tail
        assert (fields["pilotErrorCode"], fields["transExitCode"]) == ("0", "0")
        assert fields["pilotID"].endswith("3.7.0.36")
        outputs = json.loads(fields["xml"])
        assert set(outputs) == {"log.realpilot.tgz"}
        assert len(outputs["log.realpilot.tgz"]["adler32"]) == 8
        # its mv copytool (ARC style) leaves the file beside the job directory for the
        # CE to upload; the record names the storage path it was meant for
        assert outputs["log.realpilot.tgz"]["surl"].startswith(f"file://localhost{storage}/")
        states = [u["state"] for u in server.store.updates(pid)]
        assert states[0] == "starting" and states[-1] == "finished"
        assert server.store.job(pid)["status"] == "finished"
