"""The outbound-connection policy holds, and payloads cannot read the pilot's secrets.

Real payloads, real bubblewrap, real TCP servers on 127.0.0.1 and ::1. A
connection may be over in 10 ms: only the tracer sees it, and it must still
fail the job where the policy forbids it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pilot.comm.base import LocalUpstream
from pilot.config import PilotConfig
from pilot.job import Job
from pilot.monitor.watch import make_monitor
from pilot.payload.container import ContainerSpec
from pilot.workflow import run_job
from tests.conftest import PYTHON, job_dict, write_job


class Server:
    """A TCP server that counts the connections it accepts."""

    def __init__(self, family: int, host: str) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for _ in range(100_000):  # bounded: 0.1 s per turn
            if self._stop.is_set():
                return
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


FAMILIES = [pytest.param((socket.AF_INET, "127.0.0.1"), id="ipv4")]
if _has_ipv6():
    FAMILIES.append(pytest.param((socket.AF_INET6, "::1"), id="ipv6"))


@pytest.fixture(params=FAMILIES)
def server(request) -> Iterator[Server]:
    s = Server(*request.param)
    yield s
    s.close()


def connecting_job(server: Server, where: Path, hold: float = 0.01) -> Job:
    """A payload that opens one short connection (errors ignored) and then writes its output."""
    script = where / f"connect_{server.port}.py"
    script.write_text(
        "import socket, time\n"
        "try:\n"
        f"    s = socket.create_connection(({server.host!r}, {server.port}), timeout=2)\n"
        f"    time.sleep({hold}); s.close(); print('connected')\n"
        "except OSError as exc:\n"
        "    print('no connection:', exc)\n"
        "open('out.dat', 'w').write('x')\n"
    )
    return Job.from_panda(job_dict(3001, jobpars=str(script)))


def run(job: Job, config: PilotConfig) -> tuple[object, dict]:
    result = run_job(job, config, LocalUpstream(config.job_workdir(job.panda_id)),
                     monitor_factory=make_monitor)  # fmt: skip
    record = json.loads((config.job_workdir(job.panda_id) / "final_update.json").read_text())
    return result, record


def test_deny_all_in_bubblewrap_enforces_and_reports_the_attempt(bwrap, config, server, tmp_path):
    cfg = replace(config, container=ContainerSpec("bwrap"), connection_policy="deny-all")
    result, record = run(connecting_job(server, tmp_path), cfg)
    assert server.accepted == 0  # the namespace had no way out
    assert result.state == "finished", result.pilot_error_diag  # the policy held: no breach
    assert f"{server.endpoint}/tcp" in record["pilotLog"] and "blocked" in record["pilotLog"]
    assert "no network in the container" in record["pilotLog"]


def test_a_10ms_connection_without_container_fails_the_job(config, server, tmp_path):
    cfg = replace(config, connection_policy="deny-all")
    result, record = run(connecting_job(server, tmp_path), cfg)
    assert server.accepted == 1  # detection, not enforcement, without a container
    assert result.state == "failed" and result.pilot_error_code == 1008
    assert server.endpoint in record["pilotErrorDiag"] and "deny-all" in record["pilotErrorDiag"]
    assert f"{server.endpoint}/tcp" in record["pilotLog"] and "DENIED" in record["pilotLog"]
    assert "pid " in record["pilotLog"]


def test_allow_list_passes_the_allowed_and_fails_the_rest(config, server, tmp_path):
    net = "[::1/128]" if ":" in server.host else "127.0.0.0/8"
    ok = replace(config, connection_policy=f"allow:{net}:{server.port}")
    result, _ = run(connecting_job(server, tmp_path), ok)
    assert result.state == "finished", result.pilot_error_diag
    other = replace(
        config, connection_policy=f"allow:{net}:{server.port + 1 if server.port < 65535 else 1}"
    )
    result, record = run(
        connecting_job(server, tmp_path), replace(other, workdir=config.workdir / "b")
    )
    assert result.state == "failed" and result.pilot_error_code == 1008
    assert server.endpoint in record["pilotErrorDiag"]


SNOOP = r"""
import json, os, sys
names = [k for k in os.environ if any(w in k for w in ("TOKEN", "PROXY", "AUTH", "X509"))]
values = [v for v in os.environ.values() if "pilot-secret" in v]
readable = []
for path in sys.argv[1:] + ["/tmp/x509up_u%d" % os.getuid(), "/tmp/bt_u%d" % os.getuid()]:
    try:
        if "pilot-secret" in open(path).read():
            readable.append(path)
    except OSError:
        pass
json.dump({"names": names, "values": values, "readable": readable}, open("snoop.json", "w"))
"""


@pytest.fixture
def secrets(tmp_path: Path, monkeypatch) -> list[str]:
    """The pilot's own credentials, in the pilot's environment, as a site would set them."""
    d = tmp_path / "creds"
    (d / "tokens").mkdir(parents=True)
    (d / "tokens" / "panda_token").write_text("pilot-secret-token")
    proxy = d / "x509_pilot"
    proxy.write_text("pilot-secret-proxy")
    monkeypatch.setenv("OIDC_AUTH_DIR", str(d / "tokens"))
    monkeypatch.setenv("OIDC_AUTH_TOKEN", "panda_token")
    monkeypatch.setenv("X509_USER_PROXY", str(proxy))
    monkeypatch.setenv("BEARER_TOKEN", "pilot-secret-bearer")
    return [str(d / "tokens" / "panda_token"), str(proxy)]


@pytest.mark.parametrize("contained", [False, True], ids=["host", "bubblewrap"])
def test_payload_finds_no_pilot_secret(request, config, tmp_path, secrets, contained):
    script = tmp_path / "snoop.py"
    script.write_text(SNOOP)
    looks = " ".join(secrets) if contained else ""  # in a container, even the paths lead nowhere
    job = Job.from_panda(job_dict(3002, jobpars=f"{script} {looks}"))
    cfg = config
    if contained:
        request.getfixturevalue("bwrap")
        served = tmp_path / "dispatcher.token"  # a --token-file: named in no variable
        served.write_text("pilot-secret-dispatcher")
        job = Job.from_panda(job_dict(3002, jobpars=f"{script} {looks} {served}"))
        cfg = replace(config, container=ContainerSpec("bwrap"), secret_files=(str(served),))
    result, record = run(job, cfg)
    assert result.state == "finished", result.pilot_error_diag
    seen = json.loads((cfg.job_workdir(3002) / "snoop.json").read_text())
    assert seen == {"names": [], "values": [], "readable": []}
    text = (cfg.job_workdir(3002) / "pilot.log").read_text() + json.dumps(record)
    assert "pilot-secret" not in text


def test_a_proxy_meant_for_payloads_is_given_to_them(config, tmp_path, secrets):
    mine = tmp_path / "payload_proxy"
    mine.write_text("for the payload")
    script = tmp_path / "show.py"
    script.write_text("import os; print(open(os.environ['X509_USER_PROXY']).read())")
    job = Job.from_panda(job_dict(3003, jobpars=str(script)))
    result, record = run(job, replace(config, payload_proxy=str(mine)))
    assert result.state == "finished" and "for the payload" in record["pilotLog"]
    copy = config.job_workdir(3003) / ".payload_x509_proxy"
    assert copy.stat().st_mode & 0o777 == 0o600


def test_job_file_with_a_queue_file_gets_its_container_and_limits(bwrap, tmp_path):
    queue = {"LOCAL": {"nickname": "LOCAL", "panda_resource": "LOCAL", "state": "ACTIVE",
                       "status": "online", "container_type": "bwrap:pilot",
                       "maxtime": 3, "catchall": ""}}  # fmt: skip
    qfile = tmp_path / "queue.json"
    qfile.write_text(json.dumps(queue))
    script = tmp_path / "sleep.py"
    script.write_text(
        "import os, time; open('pid.txt', 'w').write(str(os.getpid())); time.sleep(60)"
    )
    job = write_job(tmp_path / "job.json", job_dict(3004, jobpars=str(script)))
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "run", "--job-file", str(job), "--queuedata-url", str(qfile),
         "--workdir", str(tmp_path / "w"), "--kill-grace", "1", "--monitor-interval", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    workdir = tmp_path / "w" / "PandaJob_3004"
    record = json.loads((workdir / "final_update.json").read_text())
    assert int(record["pilotErrorCode"]) == 1213  # the queue's maxtime
    assert int((workdir / "pid.txt").read_text()) < 10  # a new PID namespace: bubblewrap


def test_options_that_cannot_apply_are_refused(tmp_path):
    job = write_job(tmp_path / "job.json", job_dict(3005, jobpars="-c pass"))
    for extra in (["--max-jobs", "3"], ["--pull", "2"], ["--url", "http://127.0.0.1:9"]):
        proc = subprocess.run(
            [PYTHON, "-m", "pilot.cli", "run", "--job-file", str(job), "--workdir",
             str(tmp_path / "w"), *extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2, (extra, proc.stderr)
        assert "pilot run: " in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()
    assert os.path.exists(job)


def test_user_secrets_reach_the_payload_only(config, tmp_path):
    script = tmp_path / "use.py"
    script.write_text(
        "import json, os\n"
        "s = json.load(open('panda_secrets.json'))\n"
        "print('got', sorted(s), oct(os.stat('panda_secrets.json').st_mode & 0o777))\n"
    )
    secret = {"MY_SECRET": "user-secret-value"}
    job = Job.from_panda(
        job_dict(3006, jobpars=str(script), secrets=json.dumps(secret), logFile="log.3006.tgz")
    )
    result, record = run(job, config)
    assert result.state == "finished", result.pilot_error_diag
    assert "got ['MY_SECRET'] 0o600" in record["pilotLog"]
    workdir = config.job_workdir(3006)
    assert not (workdir / "panda_secrets.json").exists()
    with tarfile.open(next(Path(config.output_url).rglob("log.3006.tgz"))) as tar:
        assert not [n for n in tar.getnames() if "panda_secrets" in n]
    everything = (workdir / "pilot.log").read_text() + json.dumps(record)
    assert "user-secret-value" not in everything


def test_an_event_service_payload_that_connects_fails_its_job(config, tmp_path):
    """Event-service payloads are watched too: toysim, with a connection made at start."""
    srv = Server(socket.AF_INET, "127.0.0.1")
    try:
        connect = (
            f"import socket; socket.create_connection(('127.0.0.1', {srv.port})).close(); "
            "import runpy, sys; sys.argv = ['toysim'] + sys.argv[1:]; "
            "runpy.run_module('pilot.payloads.toysim', run_name='__main__')"
        )
        script = tmp_path / "es_connect.py"
        script.write_text(connect)
        from pilot.onenode import make_es_runner

        class Source:
            def __init__(self) -> None:
                self.left = [
                    {"eventRangeID": f"7-3006-1-{i}-0", "startEvent": i, "lastEvent": i,
                     "LFN": "EVNT.root", "GUID": "g", "scope": "s"}
                    for i in range(1, 4)
                ]  # fmt: skip
                self.reported: list = []

            def get_event_ranges(self, panda_id, jobset_id, task_id, n_ranges):
                out, self.left = self.left[:n_ranges], self.left[n_ranges:]
                return out

            def update_event_ranges(self, entries, version=0):
                self.reported += entries
                return [True] * len(entries)

        source = Source()
        job = Job.from_panda(job_dict(3006, jobpars=str(script), eventService="True"))
        cfg = replace(config, connection_policy="deny-all")
        result = run_job(job, cfg, LocalUpstream(cfg.job_workdir(3006)),
                         es_runner=make_es_runner(source))  # fmt: skip
        record = json.loads((cfg.job_workdir(3006) / "final_update.json").read_text())
        assert result.state == "failed" and result.pilot_error_code == 1008
        assert srv.endpoint in record["pilotErrorDiag"]
        assert f"{srv.endpoint}/tcp" in record["pilotLog"]
    finally:
        srv.close()
