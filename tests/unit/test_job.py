from __future__ import annotations

from pathlib import Path

import pytest

from pilot.errors import ErrorCode, PilotError
from pilot.job import EventRange, Job, load_job_file, parse_job_text

GOOD = {
    "PandaID": "5001",
    "jobsetID": "5000",
    "taskID": "12",
    "transformation": "Sim_tf.py",
    "jobPars": "--maxEvents 10",
    "inFiles": "EVNT.01,EVNT.02",
    "GUID": "g1,g2",
    "fsize": "100,200",
    "checksum": "ad:0000abcd,md5:" + "a" * 32,
    "scopeIn": "mc23",
    "outFiles": "HITS.01,log.01.tgz",
    "scopeOut": "mc23",
    "realDatasets": "ds.HITS,ds.log",
    "destinationDblock": "ds.HITS_sub,ds.log_sub",
    "logFile": "log.01.tgz",
    "logGUID": "lg",
    "scopeLog": "mc23",
    "coreCount": "8",
    "maxWalltime": "NULL",
    "eventService": "False",
}


def test_good_definition() -> None:
    job = Job.from_panda(GOOD)
    assert job.panda_id == 5001 and job.core_count == 8 and job.max_walltime == 0
    assert [f.lfn for f in job.in_files] == ["EVNT.01", "EVNT.02"]
    assert job.in_files[1].checksum_parts() == ("md5", "a" * 32)
    assert [f.lfn for f in job.out_files] == ["HITS.01"]
    assert (
        job.log_file is not None
        and job.log_file.lfn == "log.01.tgz"
        and job.log_file.dataset == "ds.log"
    )
    assert job.in_files[0].scope == "mc23"


def _bad(**changes: object) -> dict:
    d = dict(GOOD)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    ("definition", "code", "words"),
    [
        (_bad(PandaID=None), ErrorCode.NOTDEFINED, "PandaID"),
        (_bad(transformation=None), ErrorCode.NOTDEFINED, "transformation"),
        (_bad(GUID="g1"), ErrorCode.NOTSAMELENGTH, "GUID"),
        (_bad(fsize="100,200,300"), ErrorCode.NOTSAMELENGTH, "fsize"),
        (_bad(coreCount="eight"), ErrorCode.CONVERSIONFAILURE, "coreCount"),
        (_bad(PandaID="-3"), ErrorCode.CONVERSIONFAILURE, "PandaID"),
        (_bad(fsize="100,big"), ErrorCode.CONVERSIONFAILURE, "fsize"),
        (_bad(inFiles="../../etc/passwd,EVNT.02"), ErrorCode.BADOUTPUTFILENAME, "passwd"),
        (_bad(outFiles="sub/HITS.01,log.01.tgz"), ErrorCode.BADOUTPUTFILENAME, "HITS"),
        (_bad(logFile=".."), ErrorCode.BADOUTPUTFILENAME, "log"),
        (_bad(checksum="crc:1,ad:0000abcd"), ErrorCode.UNKNOWNCHECKSUMTYPE, "crc"),
        (_bad(eventService="maybe"), ErrorCode.CONVERSIONFAILURE, "eventService"),
        (_bad(inFiles="EVNT.01,EVNT.01"), ErrorCode.FILEEXISTS, "EVNT.01"),
        (["not", "a", "dict"], ErrorCode.CONVERSIONFAILURE, "object"),
        (_bad(inFiles="x" * 300 + ",EVNT.02"), ErrorCode.LFNTOOLONG, "longer"),
    ],
)
def test_malformed_definitions(definition: object, code: int, words: str) -> None:
    with pytest.raises(PilotError) as info:
        Job.from_panda(definition)
    assert info.value.code == code
    assert words in info.value.diag


def test_non_json_and_truncated(tmp_path: Path) -> None:
    with pytest.raises(PilotError) as info:
        parse_job_text('{"PandaID": "1", "transformation": "x"')
    assert info.value.code == ErrorCode.CONVERSIONFAILURE and "not valid JSON" in info.value.diag
    with pytest.raises(PilotError) as info:
        load_job_file(tmp_path / "missing.json")
    assert info.value.code == ErrorCode.NOSUCHFILE


def test_harvester_style_wrapped_definition() -> None:
    job = parse_job_text('{"5001": {"PandaID": 5001, "transformation": "echo"}}')
    assert job.panda_id == 5001


def test_event_range_validation() -> None:
    r = EventRange.from_panda(
        {
            "eventRangeID": "12-5001-3-7-1",
            "startEvent": 1,
            "lastEvent": 10,
            "LFN": "EVNT.01",
            "GUID": "g",
            "scope": "s",
        }
    )
    assert r.panda_id == 5001 and r.n_events == 10
    assert EventRange.from_panda(r.to_panda()) == r
    for bad in (
        {"eventRangeID": "x", "startEvent": 1, "lastEvent": 2, "LFN": "a"},
        {"eventRangeID": "1-2-3-4-5", "startEvent": 5, "lastEvent": 2, "LFN": "a"},
        {"eventRangeID": "1-2-3-4-5", "startEvent": 1, "lastEvent": 2, "LFN": "../a"},
        "garbage",
    ):
        with pytest.raises(PilotError):
            EventRange.from_panda(bad)
