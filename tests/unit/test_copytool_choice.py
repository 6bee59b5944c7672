"""The copytool per activity comes from the queue's acopytools, unless --copytool says."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pilot.config import PilotConfig
from pilot.data.choice import copytool_for, copytool_names, uses_rucio
from pilot.data.rucio import RucioSettings
from pilot.errors import ErrorCode, PilotError
from pilot.queue import QueueConfig
from tests.conftest import PYTHON, REPO, job_dict

CRIC = {
    "nickname": "SITE_Q",
    "panda_resource": "SITE_Q",
    "copytools": {"rucio": {"setup": ""}, "copy": {"setup": ""}, "http": {}},
    "acopytools": {"pr": ["copy"], "pw": ["rucio"], "pl": ["http"], "default": ["copy"]},
}


def config(queue: dict | None = None, copytool: str = "") -> PilotConfig:
    q = QueueConfig.from_dict(queue).to_dict() if queue else {}
    return PilotConfig(queue=q, copytool=copytool)


def test_activities_take_their_own_lists_with_panda_fallbacks() -> None:
    c = config(CRIC)
    assert copytool_names(c, "pr") == ["copy"]
    assert copytool_names(c, "pw") == ["rucio"]
    assert copytool_names(c, "pl") == ["http"]
    assert copytool_names(c, "es_events") == ["rucio"]  # falls back to pw
    no_log = {**CRIC, "acopytools": {"pr": ["copy"], "pw": ["rucio"]}}
    assert copytool_names(config(no_log), "pl") == ["rucio"]
    only_default = {**CRIC, "acopytools": {"default": ["http"]}}
    assert copytool_names(config(only_default), "pr") == ["http"]
    assert copytool_names(config({**CRIC, "acopytools": {}}), "pr") == ["rucio", "copy", "http"]
    assert copytool_names(config(), "pr") == ["copy"]
    assert uses_rucio(config(CRIC)) and not uses_rucio(config())


def test_copytool_option_overrides_every_activity() -> None:
    c = config(CRIC, copytool="copy")
    assert {a: copytool_names(c, a) for a in ("pr", "pw", "pl")} == {
        "pr": ["copy"],
        "pw": ["copy"],
        "pl": ["copy"],
    }
    assert not uses_rucio(c)


def test_one_instance_per_name_and_unknown_names_skipped() -> None:
    made: dict = {}
    c = config({**CRIC, "acopytools": {"pr": ["nosuch", "copy"], "pw": ["copy"]}})
    assert copytool_for(c, "pr", made) is copytool_for(c, "pw", made)
    with pytest.raises(PilotError) as err:
        copytool_for(config({**CRIC, "acopytools": {"pr": ["nosuch"]}}), "pr")
    assert err.value.code == ErrorCode.UNKNOWNCOPYTOOL
    assert copytool_for(config(CRIC), "pw").name == "rucio"


def test_rucio_settings_from_the_usual_client_configuration(tmp_path: Path) -> None:
    cfg = tmp_path / "rucio.cfg"
    cfg.write_text(
        "[client]\nrucio_host = https://rucio.example:443/\nauth_host = https://auth.example\n"
        "auth_type = x509_proxy\naccount = pilot\nca_cert = /etc/grid-security/certificates\n"
    )
    s = RucioSettings.from_environ({"RUCIO_CONFIG": str(cfg), "X509_USER_PROXY": "/tmp/x509up"})
    assert (s.host, s.auth_host, s.account, s.auth_type) == (
        "https://rucio.example:443",
        "https://auth.example",
        "pilot",
        "x509_proxy",
    )
    assert s.creds() == {"client_proxy": "/tmp/x509up"} and s.trace_url.endswith("/traces/")
    env = {"RUCIO_CONFIG": str(cfg), "RUCIO_ACCOUNT": "prod", "RUCIO_AUTH_TYPE": "oidc"}
    env["BEARER_TOKEN"] = "eyJ.a.b"
    s = RucioSettings.from_environ(env)
    assert (s.account, s.auth_type, s.creds()) == ("prod", "oidc", {})
    home = tmp_path / "home"
    (home / "etc").mkdir(parents=True)
    (home / "etc" / "rucio.cfg").write_text(cfg.read_text())
    assert RucioSettings.from_environ({"RUCIO_HOME": str(home)}).account == "pilot"
    with pytest.raises(PilotError) as err:
        RucioSettings.from_environ({"RUCIO_CONFIG": str(tmp_path / "none.cfg")})
    assert err.value.code == ErrorCode.MIDDLEWAREIMPORTFAILURE and "RUCIO_CONFIG" in err.value.diag


def test_pilot_run_takes_the_copytool_from_the_queue_file(tmp_path: Path) -> None:
    """A queue whose pr is a copytool that does not exist fails stage-in with 1323;
    --copytool copy on the same queue runs the job."""
    queue = tmp_path / "queue.json"
    queue.write_text(json.dumps({**CRIC, "acopytools": {"pr": ["nosuch"], "pw": ["copy"]}}))
    (tmp_path / "in.dat").write_bytes(b"x")
    job = tmp_path / "job.json"
    job.write_text(json.dumps(job_dict(jobpars="-c pass", inFiles="in.dat")))

    def run(*extra: str) -> dict:
        subprocess.run(
            [PYTHON, "-m", "pilot.cli", "run", "--job-file", str(job), "--site", "SITE_Q"]
            + ["--queuedata-url", str(queue), "--workdir", str(tmp_path / "w"), *extra],
            cwd=REPO,
            capture_output=True,
            timeout=120,
            check=False,
        )
        return json.loads((tmp_path / "w" / "PandaJob_1001" / "final_update.json").read_text())

    assert run()["pilotErrorCode"] == ErrorCode.UNKNOWNCOPYTOOL
    assert run("--copytool", "copy")["state"] == "finished"
