"""Scopes and names are checked with Rucio's rules and the path rules before any path is built."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from pilot.data.copytools import CopyTool
from pilot.data.names import check_name, check_scope, did, storage_url
from pilot.data.staging import stage_in, stage_out
from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.eventservice.stageout import range_stage_out
from pilot.job import FileSpec, Job
from tests.conftest import PYTHON, REPO, job_dict

BAD_SCOPES = ["..", ".", "../../x", "a/b", "..hidden", "x" * 26, "sp ace", "a\\b", "semi;colon"]


@pytest.mark.parametrize("scope", ["tests", "user.jdoe", "mc23_13p6TeV", "data-1", "a.b_c-d"])
def test_rucio_scopes_pass(scope: str) -> None:
    assert check_scope(scope) == scope


@pytest.mark.parametrize("scope", BAD_SCOPES)
def test_bad_scopes_fail_with_the_output_code(scope: str) -> None:
    with pytest.raises(PilotError) as err:
        check_scope(scope, "scopeOut")
    assert err.value.code == ErrorCode.BADOUTPUTFILENAME and "scopeOut" in err.value.diag
    with pytest.raises(PilotError) as err:
        check_scope(scope, "scopeIn", "input")
    assert err.value.code == ErrorCode.STAGEINFAILED


@pytest.mark.parametrize("name", ["..", "a/b", ".hidden", "x" * 251, "sp ace", ""])
def test_bad_did_names(name: str) -> None:
    with pytest.raises(PilotError):
        check_name(name)
    with pytest.raises(PilotError):
        did("tests", name)


def test_did_and_url_of_good_names() -> None:
    assert did("tests", "EVNT.01._000001.pool.root.1") == "tests:EVNT.01._000001.pool.root.1"
    assert storage_url("/s/", "tests", "a.dat") == "/s/tests/a.dat"
    assert storage_url("/s", "", "a.dat") == "/s/a.dat"
    with pytest.raises(PilotError):
        storage_url("/s", "..", "a.dat")
    with pytest.raises(PilotError):
        storage_url("/s", "tests", "../a.dat")


@pytest.mark.parametrize(
    "key,value,code",
    [
        ("scopeOut", "../../x", ErrorCode.BADOUTPUTFILENAME),
        ("scopeOut", "..", ErrorCode.BADOUTPUTFILENAME),
        ("scopeLog", "../up", ErrorCode.BADOUTPUTFILENAME),
        ("scopeIn", "a/../../b", ErrorCode.STAGEINFAILED),
    ],
)
def test_a_job_with_a_bad_scope_does_not_validate(key: str, value: str, code: int) -> None:
    d = job_dict(jobpars="-c pass", inFiles="in.dat", outFiles="out.dat,log.1001.tgz")
    d[key] = value
    with pytest.raises(PilotError) as err:
        Job.from_panda(d)
    assert err.value.code == code and key in err.value.diag


def test_staging_refuses_a_bad_scope_of_a_filespec_and_writes_nothing(tmp_path: Path) -> None:
    """FileSpecs made by other code than Job.from_panda are checked where the URL is built."""
    storage, work = tmp_path / "a" / "b" / "storage", tmp_path / "work"
    storage.mkdir(parents=True)
    work.mkdir()
    (work / "out.dat").write_bytes(b"data")
    spec = FileSpec("out.dat", "output", scope="../..")
    with pytest.raises(PilotError) as err:
        stage_out([spec], work, CopyTool(), str(storage))
    assert err.value.code == ErrorCode.BADOUTPUTFILENAME
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["a", "b", "storage", "work", "out.dat"]
    )
    job = Job.from_panda(job_dict(jobpars="-c pass", inFiles="in.dat"))
    job.in_files[0].scope = ".."
    with pytest.raises(PilotError) as err:
        stage_in(job, work, CopyTool(), str(storage))
    assert err.value.code == ErrorCode.STAGEINFAILED


def test_droid_range_outputs_refuse_a_bad_scope(tmp_path: Path) -> None:
    job = Job.from_panda(job_dict(jobpars="-c pass", outFiles="out.dat", scopeOut="tests"))
    job.out_files[0].scope = "../../x"
    config = SimpleNamespace(
        copytool="copy",
        copytool_options={},
        output_url=str(tmp_path / "storage"),
        workdir=str(tmp_path),
        stageout_timeout=10.0,
    )
    with pytest.raises(PilotError) as err:
        range_stage_out(job, config)
    assert err.value.code == ErrorCode.BADOUTPUTFILENAME
    job.out_files[0].scope = "tests"
    put = range_stage_out(job, config)
    out = tmp_path / "1-2-3-4-5.out"
    out.write_bytes(b"x")
    from pilot.data.checksum import adler32_file

    res = RangeResult("1-2-3-4-5", RangeStatus.FINISHED, str(out), 1, adler32=adler32_file(out))
    assert put(res).output_path == str(tmp_path / "storage" / "tests" / "1-2-3-4-5.out")


def test_pilot_run_fails_a_job_with_scope_out_dotdot_and_writes_nothing_outside(
    tmp_path: Path,
) -> None:
    """The whole pilot: exit 1, a failed final update with the code, no file outside."""
    top = tmp_path / "site"
    storage, work = top / "deep" / "storage", top / "deep" / "work"
    storage.mkdir(parents=True)
    d = job_dict(
        4242,
        jobpars="-c \"open('out.dat','w').write('x')\"",
        outFiles="out.dat,log.4242.tgz",
        scopeOut="../../../escaped",
    )
    job_file = top / "job.json"
    job_file.write_text(json.dumps(d))
    before = {p for p in top.rglob("*")}
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "run", "--job-file", str(job_file), "--workdir", str(work)]
        + ["--output-url", str(storage)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1371" in proc.stderr and "scopeOut" in proc.stderr
    record = json.loads((work / "PandaJob_4242" / "final_update.json").read_text())
    assert record["state"] == "failed" and record["pilotErrorCode"] == 1371
    new = {p for p in top.rglob("*")} - before
    assert all(work in p.parents or p == work for p in new), new
    assert not list(tmp_path.rglob("escaped*")) and not list(storage.rglob("*"))
