"""`pilot serve`, `pilot submit` and `pilot status` as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from pilot.comm.panda import PandaClient
from pilot.comm.spool import Spool
from pilot.server.submit import status_main, submit_main

SERVE = "import sys; from pilot.server.serve import serve_main; sys.exit(serve_main())"


def _serve(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    url_file = tmp_path / "url"
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, "--db", str(tmp_path / "s.db"), "--port", "0",
         "--url-file", str(url_file), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    delay = 0.02
    for _ in range(60):
        if url_file.is_file() and url_file.read_text().strip():
            return proc, url_file.read_text().strip()
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    proc.kill()
    raise AssertionError("pilot serve did not start")


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()
    return out.decode()


def test_serve_submit_status_flush(tmp_path: Path, capsys) -> None:
    proc, url = _serve(tmp_path)
    try:
        token_file = tmp_path / "s.db.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        job = tmp_path / "job.json"
        job.write_text(json.dumps({"transformation": "/bin/true", "computingSite": "Q"}))
        task = tmp_path / "task.json"
        task.write_text(json.dumps({"job": {"transformation": "x"}, "nRanges": 4, "nJobs": 2}))
        common = ["--url", url, "--token-file", str(token_file)]
        assert submit_main([str(job), str(task), *common]) == 0
        out = capsys.readouterr().out
        assert '"PandaIDs": [1001]' in out and '"nRanges": 8' in out
        assert submit_main([str(job), "--url", url, "--token", "wrong"]) == 1
        bad = tmp_path / "bad.json"
        bad.write_text("{oops")
        assert submit_main([str(bad), *common]) == 1
        capsys.readouterr()

        assert status_main([*common, "--json"]) == 0
        jobs = json.loads(capsys.readouterr().out)
        assert [j["ranges"] for j in jobs] == [{}, {"ready": 4}, {"ready": 4}]

        # --flush sends what a pilot spooled
        spool = Spool(tmp_path / "spool")
        client = PandaClient(url, token=token_file.read_text().strip(), retries=0)
        pid = int(client.get_job("Q")["PandaID"])
        spool.put("updateJob", {"jobId": pid, "state": "finished", "transExitCode": 0})
        assert status_main(["--flush", "--spool", str(spool.directory), *common]) == 0
        assert "sent 1, left 0" in capsys.readouterr().out
        assert status_main([*common]) == 0
        table = capsys.readouterr().out
        assert f"{pid:>10}" in table and "finished" in table and "ready=4" in table
    finally:
        out = _stop(proc)
    assert "listening on" in out
    # the database outlives the server: status and submit work on the file too
    db = str(tmp_path / "s.db")
    assert submit_main([str(job), "--db", db]) == 0
    capsys.readouterr()
    assert status_main(["--db", db, "--json"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    assert [j["status"] for j in jobs] == ["finished", "activated", "activated", "activated"]


def test_serve_refuses_a_busy_port(tmp_path: Path) -> None:
    proc, url = _serve(tmp_path)
    try:
        port = url.rsplit(":", 1)[1]
        other = subprocess.run(
            [sys.executable, "-c", SERVE, "--db", str(tmp_path / "o.db"), "--port", port],
            capture_output=True,
            timeout=30,
        )
        assert other.returncode == 1 and b"cannot listen" in other.stderr
    finally:
        _stop(proc)


def test_status_without_database(tmp_path: Path) -> None:
    assert status_main(["--db", str(tmp_path / "none.db")]) == 1
    assert status_main(["--flush"]) == 2


def test_submit_queue_and_storages(tmp_path: Path, capsys) -> None:
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps({"MYQ": {"nickname": "MYQ", "panda_resource": "MYQ"}}))
    storages = tmp_path / "s.json"
    storages.write_text(json.dumps({"D": {"is_deterministic": True, "arprotocols": {}}}))
    db = str(tmp_path / "x.db")
    assert submit_main(["--queue", str(queue), "--storages", str(storages), "--db", db]) == 0
    out = capsys.readouterr().out
    assert '"queues": "MYQ"' in out and '"storages": ["D"]' in out
    offline = tmp_path / "off.json"
    offline.write_text(json.dumps({"nickname": "Z", "panda_resource": "Z", "state": "OFFLINE"}))
    assert submit_main(["--queue", str(offline), "--db", db]) == 1
    assert "not ACTIVE" in capsys.readouterr().err
