"""The rucio copytool against a real Rucio server: every outcome and its PanDA code."""

from __future__ import annotations

import configparser
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from pilot.data.checksum import adler32_file
from pilot.data.rucio import RucioCopyTool, RucioSettings
from pilot.data.staging import stage_in, stage_out
from pilot.errors import ErrorCode, PilotError
from pilot.job import FileSpec, Job
from tests.conftest import adler32_of, job_dict
from tests.rucio.conftest import seed
from tests.tools.rucio_server import SCOPE, RucioServer


def input_job(name: str, data: bytes, rse: str = "") -> Job:
    return Job.from_panda(
        job_dict(
            jobpars="-c pass",
            inFiles=name,
            scopeIn=SCOPE,
            fsize=str(len(data)),
            checksum=f"ad:{adler32_of(data)}",
            ddmEndPointIn=rse,
            GUID=str(uuid.uuid4()),
        )
    )


def output_spec(name: str, rse: str = "LOCAL_DISK2", dataset: str = "") -> FileSpec:
    return FileSpec(
        name,
        "output",
        guid=str(uuid.uuid4()),
        scope=SCOPE,
        ddm_endpoint=rse,
        destination_dblock=dataset,
    )


def fails(fn, *args, **kwargs) -> PilotError:
    with pytest.raises(PilotError) as err:
        fn(*args, **kwargs)
    return err.value


def test_stage_in_by_did_with_checksums(rucio_server, rucio_client, tmp_path, unique) -> None:
    data = os.urandom(20000)
    seed(rucio_server, rucio_client, f"in_{unique}.dat", data, tmp=tmp_path / "seed")
    job = input_job(f"in_{unique}.dat", data, rse="LOCAL_DISK")
    work = tmp_path / "work"
    work.mkdir()
    events = []
    stage_in(job, work, RucioCopyTool(), "", sink=events.append)
    assert (work / f"in_{unique}.dat").read_bytes() == data
    assert job.in_files[0].status == "transferred"
    assert [(e.state, e.remote_site) for e in events] == [("DONE", "LOCAL_DISK")]
    assert events[0].url.startswith("file://localhost/") and not list(work.glob(".*part"))


def test_a_missing_did_is_missinginputfile(rucio_server, tmp_path, unique) -> None:
    job = input_job(f"never_{unique}.dat", b"x")
    err = fails(stage_in, job, tmp_path, RucioCopyTool(), "")
    assert err.code == ErrorCode.MISSINGINPUTFILE and f"tests:never_{unique}.dat" in err.diag


def test_no_replica_on_ddm_endpoint_in_is_noreplicas(rucio_server, rucio_client, tmp_path, unique):
    data = b"on disk one only"
    seed(rucio_server, rucio_client, f"one_{unique}.dat", data, tmp=tmp_path / "seed")
    err = fails(
        stage_in, input_job(f"one_{unique}.dat", data, "LOCAL_DISK2"), tmp_path, RucioCopyTool(), ""
    )
    assert err.code == ErrorCode.NOREPLICAS and "LOCAL_DISK2" in err.diag


def test_a_corrupted_replica_is_getadmismatch(rucio_server, rucio_client, tmp_path, unique) -> None:
    data = os.urandom(5000)
    name = f"bad_{unique}.dat"
    seed(rucio_server, rucio_client, name, data, tmp=tmp_path / "seed")
    (replica,) = [p for p in rucio_server.rse_dir("LOCAL_DISK").rglob(name)]
    replica.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size, other bytes
    work = tmp_path / "work"
    work.mkdir()
    events = []
    err = fails(stage_in, input_job(name, data), work, RucioCopyTool(), "", sink=events.append)
    assert err.code == ErrorCode.GETADMISMATCH, err.diag
    assert not (work / name).exists() and all(e.state == "STAGEIN_ATTEMPT_FAILED" for e in events)


def test_stage_out_registers_with_guid_in_the_dataset(rucio_server, rucio_client, tmp_path, unique):
    work = tmp_path / "work"
    work.mkdir()
    out = work / f"out_{unique}.root"
    out.write_bytes(os.urandom(30000))
    spec = output_spec(out.name, "LOCAL_DISK2", f"ds_{unique}_sub01")
    stage_out([spec], work, RucioCopyTool(), "")
    meta = rucio_client.get_metadata(SCOPE, out.name)
    assert meta["adler32"] == adler32_file(out) and meta["bytes"] == out.stat().st_size
    assert meta["guid"] == spec.guid.replace("-", "")
    (rep,) = rucio_client.list_replicas([{"scope": SCOPE, "name": out.name}])
    assert list(rep["rses"]) == ["LOCAL_DISK2"] and rep["adler32"] == adler32_file(out)
    content = [c["name"] for c in rucio_client.list_content(SCOPE, f"ds_{unique}_sub01")]
    assert content == [out.name]
    assert spec.checksum == f"ad:{adler32_file(out)}" and spec.surl == rep["rses"]["LOCAL_DISK2"][0]
    # the same file again (a retry after a lost answer) is fine; other bytes are not
    stage_out(
        [output_spec(out.name, "LOCAL_DISK2", f"ds_{unique}_sub01")], work, RucioCopyTool(), ""
    )
    out.write_bytes(os.urandom(30000))
    err = fails(stage_out, [output_spec(out.name)], work, RucioCopyTool(), "")
    assert err.code == ErrorCode.FILEEXISTS and "adler32" in err.diag


def test_an_rse_blocked_for_writes(rucio_server, rucio_client, tmp_path, unique) -> None:
    (tmp_path / f"b_{unique}.dat").write_bytes(b"blocked")
    rucio_client.update_rse("LOCAL_DISK2", {"availability_write": False})
    try:
        err = fails(stage_out, [output_spec(f"b_{unique}.dat")], tmp_path, RucioCopyTool(), "")
    finally:
        rucio_client.update_rse("LOCAL_DISK2", {"availability_write": True})
    assert err.code == ErrorCode.SERVICENOTAVAILABLE and "LOCAL_DISK2" in err.diag
    assert not list(rucio_server.rse_dir("LOCAL_DISK2").rglob(f"b_{unique}.dat"))


def test_an_unknown_rse_is_nostorage(rucio_server, tmp_path, unique) -> None:
    (tmp_path / f"n_{unique}.dat").write_bytes(b"x")
    err = fails(
        stage_out, [output_spec(f"n_{unique}.dat", "NO_SUCH_RSE")], tmp_path, RucioCopyTool(), ""
    )
    assert err.code == ErrorCode.NOSTORAGE


def _config_variant(server: RucioServer, tmp: Path, **client: str) -> Path:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(server.client_config)
    for k, v in client.items():
        parser["client"][k] = v
    parser["client"]["auth_token_file_path"] = str(tmp / "tokens" / "token")
    path = tmp / "variant.cfg"
    with open(path, "w") as fh:
        parser.write(fh)
    return path


@pytest.fixture
def variant(rucio_server, tmp_path, monkeypatch) -> Any:
    """Settings from a changed copy of the client configuration (own token directory)."""
    from rucio.common.config import clean_cached_config

    def make(**client: str) -> RucioSettings:
        return RucioSettings.from_environ(
            {"RUCIO_CONFIG": str(_config_variant(rucio_server, tmp_path, **client))}
        )

    monkeypatch.setenv("RUCIO_CONFIG", str(rucio_server.client_config))
    yield make
    clean_cached_config()


def test_auth_failures(rucio_server, variant, tmp_path, unique) -> None:
    job = input_job("whatever.dat", b"x")
    err = fails(stage_in, job, tmp_path, RucioCopyTool(variant(password="wrong")), "")
    assert err.code == ErrorCode.STAGEINAUTHENTICATIONFAILURE, err.diag
    (tmp_path / f"a_{unique}.dat").write_bytes(b"x")
    err = fails(
        stage_out,
        [output_spec(f"a_{unique}.dat")],
        tmp_path,
        RucioCopyTool(variant(password="wrong")),
        "",
    )
    assert err.code == ErrorCode.NOPROXY, err.diag


def test_a_bearer_token_found_by_wlcg_discovery(
    rucio_server, rucio_client, variant, tmp_path, unique, monkeypatch
) -> None:
    """auth_type oidc with no password: the client takes the token from BEARER_TOKEN_FILE
    (here a token the server issued to root, as an identity provider's would be)."""
    token_file = tmp_path / "bt"
    token_file.write_text(rucio_client.auth_token)
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(token_file))
    monkeypatch.delenv("BEARER_TOKEN", raising=False)
    settings = variant(auth_type="oidc", password="")
    assert settings.auth_type == "oidc"
    data = b"by token"
    seed(rucio_server, rucio_client, f"tok_{unique}.dat", data, tmp=tmp_path / "seed")
    work = tmp_path / "work"
    work.mkdir()
    stage_in(input_job(f"tok_{unique}.dat", data), work, RucioCopyTool(settings), "")
    assert (work / f"tok_{unique}.dat").read_bytes() == data
    token_file.write_text("not-a-token")
    err = fails(
        stage_in,
        input_job(f"tok_{unique}.dat", data),
        tmp_path / "x",
        RucioCopyTool(variant(auth_type="oidc", password="")),
        "",
    )
    assert err.code == ErrorCode.STAGEINAUTHENTICATIONFAILURE, err.diag


def test_a_server_that_does_not_answer_is_a_timeout(rucio_server, variant, tmp_path) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings = variant(rucio_host=url, auth_host=url)
        err = fails(
            stage_in,
            input_job("t.dat", b"x"),
            tmp_path,
            RucioCopyTool(settings),
            "",
            attempts=1,
            timeout=2,
        )
        assert err.code == ErrorCode.STAGEINTIMEOUT, err.diag
        (tmp_path / "t_out.dat").write_bytes(b"x")
        err = fails(
            stage_out,
            [output_spec("t_out.dat")],
            tmp_path,
            RucioCopyTool(settings),
            "",
            attempts=1,
            timeout=2,
        )
    assert err.code == ErrorCode.STAGEOUTTIMEOUT, err.diag


def test_an_rse_unavailable_for_reads(rucio_server, rucio_client, tmp_path, unique) -> None:
    data = b"unreadable for now"
    seed(rucio_server, rucio_client, f"r_{unique}.dat", data, tmp=tmp_path / "seed")
    rucio_client.update_rse("LOCAL_DISK", {"availability_read": False})
    try:
        job = input_job(f"r_{unique}.dat", data, "LOCAL_DISK")
        err = fails(stage_in, job, tmp_path, RucioCopyTool(), "")
    finally:
        rucio_client.update_rse("LOCAL_DISK", {"availability_read": True})
    assert err.code == ErrorCode.SERVICENOTAVAILABLE and "LOCAL_DISK" in err.diag


def test_a_server_that_went_down_then_came_back(
    rucio_server, variant, tmp_path, unique, caplog
) -> None:
    """A second real server: a transfer works; the server stops and the next transfers get
    1316 once the retries are spent; a restart on the same port within the retries'
    backoff and the upload goes through."""
    other = RucioServer.start(tmp_path / "other", rucio_server.venv)
    try:
        settings = variant(rucio_host=other.url, auth_host=other.url)
        (tmp_path / f"d_{unique}.dat").write_bytes(b"before")
        stage_out(
            [output_spec(f"d_{unique}.dat", "LOCAL_DISK")], tmp_path, RucioCopyTool(settings), ""
        )
        other.stop()
        quick = RucioCopyTool(settings, retries=1, backoff=0.2)
        (tmp_path / f"e_{unique}.dat").write_bytes(b"after")
        err = fails(stage_out, [output_spec(f"e_{unique}.dat", "LOCAL_DISK")], tmp_path, quick, "")
        assert err.code == ErrorCode.RUCIOSERVICEUNAVAILABLE, err.diag
        job = input_job(f"d_{unique}.dat", b"before")
        err = fails(stage_in, job, tmp_path / "in", RucioCopyTool(settings, retries=0), "")
        assert err.code == ErrorCode.RUCIOSERVICEUNAVAILABLE, err.diag
        # the server comes back while the copytool waits between its tries
        patient = RucioCopyTool(settings, retries=6, backoff=0.5)
        back = threading.Timer(1.0, other.restart)
        back.start()
        try:
            stage_out(
                [output_spec(f"e_{unique}.dat", "LOCAL_DISK")], tmp_path, patient, "", attempts=1
            )
        finally:
            back.join(60)
        assert any("again in" in r.getMessage() for r in caplog.records)  # it did wait
        client = settings.client()
        assert client.get_metadata(SCOPE, f"e_{unique}.dat")["adler32"] == adler32_of(b"after")
    finally:
        other.stop()
