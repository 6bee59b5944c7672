"""The commissioning suite through the real PanDA server: two queues, results read back.

Where ``../shared/tools/real-panda`` brings up panda-server 1.0.4 (the
session's one, shared with test_real_panda), two clones of its queue are
added as CRIC would list them, ``pilot commission --panda-url`` submits a
small suite to both through PanDA's own JobSpec (the server's interpreter
is ``--panda-python``), runs this pilot on each, and reads every job back
from ``/api/v1/job/get_description_incl_archive``. The server's Adder is
run meanwhile, as its daemon would, so that the files are registered with
their sizes and checksums.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import PYTHON
from tests.tools import realpanda

REPO = Path(__file__).resolve().parents[2]
# this pilot, told to use the queue's copy tool on local disk (the kit has no Rucio)
THIS = (
    "{python} -m pilot.cli run --url {url} --queue {queue} --workdir {workdir}"
    " --queuedata-url {queuedata_url} --max-jobs 8"
)


@pytest.mark.slow
def test_a_small_suite_through_the_real_server(
    real_104: realpanda.RealPanda, tmp_path: Path
) -> None:
    for name in ("CMS_A", "CMS_B"):
        real_104.add_queue(name, copytools={"copy": {"setup": ""}},
                           acopytools={"pr": ["copy"], "pw": ["copy"], "pl": ["copy"]})  # fmt: skip
    out = tmp_path / "report.json"
    stop = threading.Event()

    def adder() -> None:  # the server's Adder daemon, one pass every few seconds
        while not stop.wait(3.0):
            try:
                real_104.adder()
            except RuntimeError:
                continue

    thread = threading.Thread(target=adder, daemon=True)
    thread.start()
    try:
        proc = subprocess.run(
            [PYTHON, "-m", "pilot.cli", "commission", "--panda-url", real_104.url,
             "--panda-python", real_104.python, "--queue", "CMS",
             "--pilot-a", THIS, "--pilot-b", THIS, "--name-a", "old", "--name-b", "new",
             "--only", "success", "exit-code", "--jobs", "2", "--settle", "120",
             "--workdir", str(tmp_path / "w"), "--json", str(out), "--timeout", "300"],
            capture_output=True, text=True, timeout=600, cwd=REPO,
        )  # fmt: skip
    finally:
        stop.set()
        thread.join(30)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["server"] == real_104.url
    assert report["clones"] == {"A": "CMS_A", "B": "CMS_B"}
    rows = {r["template"]: r for r in report["templates"]}
    for side, queue in (("A", "CMS_A"), ("B", "CMS_B")):
        ok, bad = rows["success"][side], rows["exit-code"][side]
        assert ok["n"] == bad["n"] == 2
        assert ok["typical"]["state"] == "finished" and ok["as_expected"] == 2, ok
        assert bad["typical"]["state"] == "failed" and bad["typical"]["pilotErrorCode"] == 1305
        assert bad["typical"]["transExitCode"] == 7 and "exit code 7" in bad["pilotErrorDiag"]
        files = {f["lfn"]: f for f in ok["files"]}
        assert (
            files["result.dat"]["fsize"] == 13 * 4096 and len(files["result.dat"]["adler32"]) == 8
        )
        for job in ok["jobs"] + bad["jobs"]:
            assert job["handed_out"] is not None and job["final_update"] is not None
            assert (
                real_104.sql(
                    f"SELECT computingsite FROM doma_panda.jobsarchived4 WHERE pandaid={job['panda_id']}"
                    f" UNION SELECT computingsite FROM doma_panda.jobsactive4 WHERE pandaid={job['panda_id']}"
                )
                == queue
            )
    assert "2/2 templates agree; 2 jobs per template" in proc.stdout


def test_options_that_cannot_apply_to_a_real_server_are_refused(tmp_path: Path) -> None:
    base = [PYTHON, "-m", "pilot.cli", "commission", "--panda-url", "http://127.0.0.1:9",
            "--workdir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(base, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "needs --panda-python" in proc.stderr
    proc = subprocess.run(
        [*base, "--panda-python", PYTHON, "--queue-description", "q.json"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and "--queue-description does not apply" in proc.stderr
