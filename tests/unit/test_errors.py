from __future__ import annotations

import signal

import pytest

from pilot.errors import (
    MAX_DIAG,
    ErrorCode,
    PilotError,
    diag_detail,
    diagnose_payload,
    error_diag,
    signal_code,
)


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("GENERALERROR", 1008),
        ("NOLOCALSPACE", 1098),
        ("STAGEINFAILED", 1099),
        ("STAGEOUTFAILED", 1137),
        ("PANDAKILL", 1144),
        ("LOOPINGJOB", 1150),
        ("KILLSIGNAL", 1200),
        ("SIGTERM", 1201),
        ("PAYLOADOUTOFMEMORY", 1212),
        ("REACHEDMAXTIME", 1213),
        ("ESRECOVERABLE", 1224),
        ("ESFATAL", 1228),
        ("PAYLOADEXCEEDMAXMEM", 1235),
        ("FAILEDBYSERVER", 1236),
        ("ESNOEVENTS", 1238),
        ("PAYLOADEXECUTIONFAILURE", 1305),
        ("COMMUNICATIONFAILURE", 1318),
        ("PAYLOADSIGSEGV", 1328),
        ("MISSINGINPUTFILE", 1331),
        ("LOGCREATIONTIMEOUT", 1376),
    ],
)
def test_codes_are_pandas(name: str, number: int) -> None:
    assert ErrorCode[name] == number


def test_table_has_no_duplicates_and_is_complete() -> None:
    assert len({int(c) for c in ErrorCode}) == len(ErrorCode)
    assert len(ErrorCode) >= 130


def test_diag_is_capped_and_keeps_the_tail() -> None:
    detail = "start " + "x" * 500 + " the real cause"
    diag = error_diag(ErrorCode.STAGEINFAILED, detail)
    assert len(diag) <= MAX_DIAG
    assert diag.startswith("Failed to stage-in file")
    assert diag.endswith("the real cause")


def test_pilot_error_carries_code() -> None:
    err = PilotError(ErrorCode.MISSINGINPUTFILE, "EVNT.01 not found")
    assert err.code == 1331 and err.acronym == "MISSINGINPUTFILE"
    assert "EVNT.01" in err.diag


@pytest.mark.parametrize(
    ("rc", "stderr", "pilot_code", "exe_code"),
    [
        (0, "ERROR: something recovered", 0, 0),
        (-signal.SIGSEGV, "", 1328, 128 + signal.SIGSEGV),
        (-signal.SIGKILL, "", 1200, 128 + signal.SIGKILL),
        (-signal.SIGTERM, "", 1201, 128 + signal.SIGTERM),
        (-signal.SIGBUS, "", 1206, 128 + signal.SIGBUS),
        (127, "sh: 1: athena.py: not found", 1346, 127),
        (1, "terminate called after throwing an instance of 'std::bad_alloc'", 1223, 1),
        (1, "Segmentation violation caught in Geant4", 1328, 1),
        (2, "error: unrecognized arguments: --foo", 1349, 2),
        (7, "some unknown trouble", 1305, 7),
        (251, "", 1315, 251),
        (1, "FATAL: Failed to mount image /cvmfs/x.sif", 1309, 1),
    ],
)
def test_diagnose_payload(rc: int, stderr: str, pilot_code: int, exe_code: int) -> None:
    d = diagnose_payload(rc, stderr)
    assert d.pilot_error_code == pilot_code
    assert d.exe_error_code == exe_code
    assert len(d.pilot_error_diag) <= MAX_DIAG


def test_signal_codes() -> None:
    assert signal_code(signal.SIGTERM) == 1201
    assert signal_code(signal.SIGQUIT) == 1202
    assert signal_code(signal.SIGXCPU) == 1204
    assert signal_code(signal.SIGUSR1) == 1207
    assert signal_code(signal.SIGHUP) == 1200


def test_a_diagnostic_made_twice_keeps_one_standard_text() -> None:
    """The standard text of 1328 holds ': ', which must not be taken for the detail's start."""
    first = diagnose_payload(-signal.SIGSEGV).pilot_error_diag
    again = error_diag(1328, diag_detail(1328, first))
    assert (
        again
        == first
        == ("SIGSEGV: Invalid memory reference or a segmentation fault: payload killed by SIGSEGV")
    )
    assert diag_detail(1328, error_diag(1328)) == ""
