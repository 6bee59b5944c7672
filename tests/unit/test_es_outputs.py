"""Outputs of a range: checked, moved into place, checksummed."""

from __future__ import annotations

import zipfile
import zlib

import pytest

from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.outputs import collect_output


def test_single_output_is_moved_and_checksummed(tmp_path):
    (tmp_path / "o.dat").write_bytes(b"hello world")
    out = collect_output(["o.dat"], "1-2-3-4-5", tmp_path, tmp_path / "outs")
    assert out.path == tmp_path / "outs" / "o.dat"
    assert not (tmp_path / "o.dat").exists()
    assert out.fsize == 11
    assert out.adler32 == f"{zlib.adler32(b'hello world'):08x}"


def test_several_outputs_are_zipped(tmp_path):
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"BB")
    out = collect_output([str(tmp_path / "a"), "b"], "1-2-3-4-5", tmp_path, tmp_path / "outs")
    assert out.path.name == "1-2-3-4-5.zip"
    with zipfile.ZipFile(out.path) as zf:
        assert sorted(zf.namelist()) == ["a", "b"]


@pytest.mark.parametrize(
    "name,code",
    [
        ("/etc/hostname", ErrorCode.BADOUTPUTFILENAME),
        ("../escape", ErrorCode.BADOUTPUTFILENAME),
        ("missing", ErrorCode.MISSINGOUTPUTFILE),
        ("empty", ErrorCode.EMPTYOUTPUTFILE),
    ],
)
def test_unusable_outputs(tmp_path, name, code):
    work = tmp_path / "work"
    work.mkdir()
    (work / "empty").write_bytes(b"")
    (tmp_path / "escape").write_bytes(b"x")
    with pytest.raises(PilotError) as err:
        collect_output([name], "1-2-3-4-5", work, work / "outs")
    assert err.value.code == code
