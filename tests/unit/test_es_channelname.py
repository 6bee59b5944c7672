"""The channel name written into AthenaMP command lines, one test per configuration style."""

from __future__ import annotations

import shlex

import pytest

from pilot.errors import PilotError
from pilot.eventservice.channelname import with_channel

NAME = "EventService_EventRanges_4242_0a1b2c3d"
LEGACY = (
    "--preExec 'from AthenaMP.AthenaMPFlags import jobproperties as jps;"
    f'jps.AthenaMPFlags.EventRangeChannel="{NAME}"\''
)
CA = f"--preExec 'ConfigFlags.MP.EventRangeChannel=\"{NAME}\"'"
SIM = "Sim_tf.py --inputEVNTFile=EVNT.root --outputHITSFile=HITS.pool.root --maxEvents=-1"


def test_legacy_job_options_get_the_athenamp_flag():
    out = with_channel(SIM, NAME)
    assert out == f"{SIM} {LEGACY} "
    assert shlex.split(out)[-2:] == ["--preExec", shlex.split(LEGACY)[1]]


def test_ca_gets_the_config_flag():
    out = with_channel(f"{SIM} --CA", NAME)
    assert out == f"{SIM} --CA {CA} "


def test_ca_multithreaded_gets_mtes_inside_new_athenaopts():
    cmd = f"{SIM} --CA --multithreaded=True;"
    out = with_channel(cmd, NAME)
    assert (
        out == f"{SIM} --CA --multithreaded=True --athenaopts=' --mtes --mtes-channel=\"{NAME}\" ' "
    )
    opts = [w for w in shlex.split(out) if w.startswith("--athenaopts=")]
    assert shlex.split(opts[0].split("=", 1)[1]) == ["--mtes", f"--mtes-channel={NAME}"]


def test_ca_multithreaded_appends_to_existing_athenaopts():
    cmd = f"{SIM} --CA --multithreaded=true --athenaopts='--threads=8' --preExec 'x=1'"
    out = with_channel(cmd, NAME)
    assert f"--athenaopts='--threads=8 --mtes --mtes-channel=\"{NAME}\" '" in out
    assert out.endswith("--preExec 'x=1'"), "the preExec of an MTES job stays as it was"


def test_existing_legacy_preexec_gets_the_assignment_after_its_import():
    cmd = (
        f"{SIM} --preExec 'from AthenaMP.AthenaMPFlags import jobproperties as jps;"
        "jps.AthenaMPFlags.UseSharedReader=True'"
    )
    out = with_channel(cmd, NAME)
    assert out == (
        f"{SIM} --preExec 'from AthenaMP.AthenaMPFlags import jobproperties as jps;"
        f'jps.AthenaMPFlags.EventRangeChannel="{NAME}";jps.AthenaMPFlags.UseSharedReader=True\''
    )


@pytest.mark.parametrize("ca", [False, True])
def test_existing_preexec_becomes_a_second_value_of_the_same_option(ca):
    cmd = (
        f"{SIM}{' --CA' if ca else ''} --preExec 'all:from AthenaCommon import Foo' --postExec 'y'"
    )
    out = with_channel(cmd, NAME)
    words = shlex.split(out)
    i = words.index("--preExec")
    assert words.count("--preExec") == 1
    assert words[i + 1] == shlex.split(CA if ca else LEGACY)[1]
    assert words[i + 2] == "all:from AthenaCommon import Foo"
    assert words[i + 3 :] == ["--postExec", "y"]


def test_a_command_that_reads_the_environment_gets_the_variable_only():
    cmd = "runAthena.sh --channel=$PILOT_EVENTRANGECHANNEL --preExec 'x=1'"
    assert with_channel(cmd, NAME) == f'export PILOT_EVENTRANGECHANNEL="{NAME}"; {cmd}'


@pytest.mark.parametrize("bad", ["", "a b", "x;rm -rf /", "a'b", "n" * 120])
def test_names_that_could_break_the_command_or_the_path_are_refused(bad):
    with pytest.raises(PilotError):
        with_channel(SIM, bad)
