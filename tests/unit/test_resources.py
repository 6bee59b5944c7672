"""Batch-allocation detection with injected environments and tool output."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Sequence
from datetime import datetime

import pytest

from hpc import resources
from hpc.resources import (
    CommandResult,
    detect_resources,
    expand_hostlist,
    parse_hms,
    parse_walltime,
    run_command,
)
from pilot.errors import ErrorCode, PilotError

NOW = 1_800_000_000.0


class FakeTools:
    """Canned tool output by argv; anything else is 'command not found'."""

    def __init__(self, outputs: dict[tuple[str, ...], str | CommandResult] | None = None):
        self.outputs = outputs or {}
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(tuple(argv))
        out = self.outputs.get(tuple(argv))
        if out is None:
            return CommandResult(127, "", f"{argv[0]}: not found")
        return out if isinstance(out, CommandResult) else CommandResult(0, out, "")


# -- local -------------------------------------------------------------------


def test_no_batch_system_is_one_local_node() -> None:
    tools = FakeTools()
    res = detect_resources({"PWD": "/data"}, tools, now=NOW)
    assert res.scheduler == "local"
    assert res.job_id is None
    assert res.nodes == (socket.gethostname(),)
    assert res.cores_per_node == os.cpu_count()
    assert res.ranks_per_node == 1
    assert res.end_time is None and res.seconds_left(NOW) is None
    assert res.shared_dir == "/data" and res.scratch_dir == "/tmp"
    assert tools.calls == []


def test_walltime_override_sets_the_end_from_now() -> None:
    res = detect_resources({}, FakeTools(), walltime="30m", now=NOW)
    assert res.end_time == NOW + 1800
    assert res.seconds_left(NOW + 800) == 1000


def test_resources_are_frozen() -> None:
    res = detect_resources({}, FakeTools(), now=NOW)
    with pytest.raises(AttributeError):
        res.job_id = "x"  # type: ignore[misc]


# -- Slurm -------------------------------------------------------------------

SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "nid[001-002]",
    "SLURM_JOB_CPUS_PER_NODE": "36(x2)",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_SUBMIT_DIR": "/lustre/me",
    "TMPDIR": "/local/scratch",
}


def test_slurm_end_time_from_the_environment_needs_no_tools() -> None:
    tools = FakeTools()
    res = detect_resources({**SLURM_ENV, "SLURM_JOB_END_TIME": "1800003600"}, tools, now=NOW)
    assert res.scheduler == "slurm" and res.job_id == "4242"
    assert res.nodes == ("nid001", "nid002")
    assert (res.ranks_per_node, res.cores_per_node) == (4, 36)
    assert (res.total_ranks, res.total_cores) == (8, 72)
    assert res.end_time == 1800003600
    assert res.shared_dir == "/lustre/me" and res.scratch_dir == "/local/scratch"
    assert tools.calls == []


def test_slurm_end_time_from_squeue() -> None:
    tools = FakeTools({("squeue", "-h", "-j", "4242", "-o", "%e"): "2027-01-02T03:04:05\n"})
    res = detect_resources(SLURM_ENV, tools, now=NOW)
    assert res.end_time == datetime(2027, 1, 2, 3, 4, 5).timestamp()


def test_slurm_end_time_from_scontrol_when_squeue_fails() -> None:
    scontrol = (
        "JobId=4242 JobName=pilot\n   RunTime=00:00:05 TimeLimit=00:10:00\n"
        "   StartTime=2027-01-02T02:54:05 EndTime=2027-01-02T03:04:05 Deadline=N/A\n"
    )
    tools = FakeTools(
        {
            ("squeue", "-h", "-j", "4242", "-o", "%e"): CommandResult(1, "", "slurm_load_jobs"),
            ("scontrol", "show", "job", "4242"): scontrol,
        }
    )
    res = detect_resources(SLURM_ENV, tools, now=NOW)
    assert res.end_time == datetime(2027, 1, 2, 3, 4, 5).timestamp()


@pytest.mark.parametrize("garbage", ["N/A\n", "Unknown\n", "tomorrow-ish\n", ""])
def test_slurm_unknown_end_is_none_not_a_crash(garbage: str) -> None:
    tools = FakeTools(
        {
            ("squeue", "-h", "-j", "4242", "-o", "%e"): garbage,
            ("scontrol", "show", "job", "4242"): "JobId=4242 EndTime=Unknown\n",
        }
    )
    assert detect_resources(SLURM_ENV, tools, now=NOW).end_time is None


def test_slurm_ranks_from_ntasks_when_tasks_per_node_is_missing() -> None:
    env = {
        "SLURM_JOBID": "7",
        "SLURM_NODELIST": "a,b",
        "SLURM_NTASKS": "6",
        "SLURM_CPUS_ON_NODE": "3",
    }
    res = detect_resources(env, FakeTools(), now=NOW)
    assert res.job_id == "7" and res.nodes == ("a", "b")
    assert (res.ranks_per_node, res.cores_per_node) == (3, 3)


def test_slurm_walltime_override_wins() -> None:
    env = {**SLURM_ENV, "SLURM_JOB_END_TIME": "1800003600"}
    res = detect_resources(env, FakeTools(), walltime=60, now=NOW)
    assert res.end_time == NOW + 60


# -- PBS / Torque --------------------------------------------------------------


def test_pbs_pro_nodes_from_the_node_file_and_end_from_qstat(tmp_path) -> None:
    nodefile = tmp_path / "nodes"
    nodefile.write_text("h1\nh1\nh1\nh1\nh2\nh2\nh2\nh2\n")
    qstat = (
        "Job Id: 99.pbs01\n    Job_Name = pilot\n"
        "    resources_used.walltime = 00:10:00\n"
        "    Resource_List.walltime = 01:00:00\n"
        "    Resource_List.select = 2:ncpus=8:mpiprocs=4\n"
    )
    env = {
        "PBS_JOBID": "99.pbs01",
        "PBS_NODEFILE": str(nodefile),
        "NCPUS": "8",
        "PBS_O_WORKDIR": "/home/me/run",
        "TMPDIR": "/var/tmp/pbs.99",
    }
    res = detect_resources(env, FakeTools({("qstat", "-f", "99.pbs01"): qstat}), now=NOW)
    assert res.scheduler == "pbs" and res.job_id == "99.pbs01"
    assert res.nodes == ("h1", "h2")
    assert (res.ranks_per_node, res.cores_per_node) == (4, 8)
    assert res.end_time == NOW + 3000
    assert res.shared_dir == "/home/me/run" and res.scratch_dir == "/var/tmp/pbs.99"


def test_torque_end_from_pbs_walltime_without_qstat(tmp_path) -> None:
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n7\n" * 16)
    env = {"PBS_JOBID": "5.torque", "PBS_NODEFILE": str(nodefile), "PBS_NUM_PPN": "16"}
    env["PBS_WALLTIME"] = "3600"
    res = detect_resources(env, FakeTools(), now=NOW)
    assert res.nodes == ("n7",) and res.cores_per_node == 16 and res.ranks_per_node == 16
    assert res.end_time == NOW + 3600


def test_pbs_without_node_file_or_walltime() -> None:
    res = detect_resources({"PBS_JOBID": "1", "HOSTNAME": "mom1"}, FakeTools(), now=NOW)
    assert res.nodes == ("mom1",) and res.end_time is None and res.ranks_per_node == 1


# -- LSF -----------------------------------------------------------------------

BJOBS = ("bjobs", "-noheader", "-hms", "-o", "time_left", "314")
BJOBS_OLD = ("bjobs", "-noheader", "-o", "time_left", "314")


@pytest.mark.parametrize(("output", "left"), [("01:30:00 L\n", 5400), ("1:30 L\n", 5400)])
def test_lsf_hosts_slots_and_time_left(output: str, left: int) -> None:
    env = {"LSB_JOBID": "314", "LSB_MCPU_HOSTS": "h1 16 h2 16", "LS_SUBCWD": "/gpfs/me"}
    res = detect_resources(env, FakeTools({BJOBS: output}), now=NOW)
    assert res.scheduler == "lsf" and res.job_id == "314"
    assert res.nodes == ("h1", "h2")
    assert (res.ranks_per_node, res.cores_per_node) == (16, 16)
    assert res.end_time == NOW + left
    assert res.shared_dir == "/gpfs/me"


def test_lsf_without_hms_support() -> None:
    env = {"LSB_JOBID": "314", "LSB_MCPU_HOSTS": "h1 4"}
    tools = FakeTools({BJOBS: CommandResult(255, "", "-hms: Illegal option"), BJOBS_OLD: "0:05 L"})
    assert detect_resources(env, tools, now=NOW).end_time == NOW + 300


def test_lsf_hosts_fallback_and_no_bjobs() -> None:
    env = {"LSB_JOBID": "314", "LSB_HOSTS": "a a b b"}
    res = detect_resources(env, FakeTools({BJOBS: "-\n"}), now=NOW)
    assert res.nodes == ("a", "b") and res.ranks_per_node == 2
    assert res.end_time is None
    assert detect_resources(env, FakeTools(), now=NOW).end_time is None


# -- Flux ----------------------------------------------------------------------

FLUX_LIST = ("flux", "resource", "list", "-s", "all", "-no", "{nnodes} {ncores} {nodelist}")


def test_flux_resources_and_timeleft() -> None:
    tools = FakeTools({FLUX_LIST: "2 8 node[1-2]\n", ("flux", "job", "timeleft"): "600\n"})
    res = detect_resources({"FLUX_JOB_ID": "f2Ab"}, tools, now=NOW)
    assert res.scheduler == "flux" and res.job_id == "f2Ab"
    assert res.nodes == ("node1", "node2") and res.cores_per_node == 4
    assert res.end_time == NOW + 600


def test_flux_unlimited_is_none() -> None:
    tools = FakeTools({("flux", "job", "timeleft"): "infinity\n"})
    assert detect_resources({"FLUX_JOB_ID": "f1"}, tools, now=NOW).end_time is None


def test_flux_expiration_from_job_info_when_timeleft_is_missing() -> None:
    jobinfo = json.dumps({"version": 1, "execution": {"starttime": NOW, "expiration": NOW + 90}})
    tools = FakeTools({("flux", "job", "info", "f1", "R"): jobinfo})
    assert detect_resources({"FLUX_JOB_ID": "f1"}, tools, now=NOW).end_time == NOW + 90
    tools = FakeTools({("flux", "job", "info", "f1", "R"): "{not json"})
    assert detect_resources({"FLUX_JOB_ID": "f1"}, tools, now=NOW).end_time is None


def test_first_scheduler_wins_when_several_are_set() -> None:
    env = {**SLURM_ENV, "SLURM_JOB_END_TIME": "1800000100", "PBS_JOBID": "1", "LSB_JOBID": "2"}
    assert detect_resources(env, FakeTools(), now=NOW).scheduler == "slurm"


# -- parsers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nid[001-003]", ("nid001", "nid002", "nid003")),
        ("a1,b[1,3-4]x", ("a1", "b1x", "b3x", "b4x")),
        ("r[1-2]n[1-2]", ("r1n1", "r1n2", "r2n1", "r2n2")),
        ("vm", ("vm",)),
        ("a,a", ("a",)),
        ("", ()),
    ],
)
def test_expand_hostlist(text: str, expected: tuple[str, ...]) -> None:
    assert expand_hostlist(text) == expected


def test_expand_hostlist_rejects_garbage() -> None:
    with pytest.raises(PilotError) as err:
        expand_hostlist("n[a-b]")
    assert err.value.code == ErrorCode.GENERALERROR


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("1:30", 90),
        ("1:00:00", 3600),
        ("2-0", 172800),
        ("1-0:30", 88200),
        ("1-01:00:05", 90005),
        ("90s", 90),
        ("2h", 7200),
        ("1.5h", 5400),
        (45, 45),
        (2.5, 3),
    ],
)
def test_parse_walltime(text: str | int | float, seconds: int) -> None:
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "abc", "1:2:3:4", "-5", 0, -1, "5x"])
def test_parse_walltime_rejects(text: str | int) -> None:
    with pytest.raises(PilotError):
        parse_walltime(text)


def test_parse_hms() -> None:
    assert parse_hms("01:02:03") == 3723
    assert parse_hms("90") == 90
    assert parse_hms("junk") is None


# -- tools and command line ------------------------------------------------------


def test_run_command_reports_missing_and_hanging_tools() -> None:
    assert run_command(["no-such-tool-for-pilot"]).returncode == 127
    assert run_command([sys.executable, "-c", "print('ok')"]).stdout.strip() == "ok"
    slow = run_command([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert slow.returncode == 124
    fed = run_command([sys.executable, "-c", "import sys; print(sys.stdin.read())"], input_text="x")
    assert fed.stdout.strip() == "x"


@pytest.fixture
def no_batch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("SLURM_", "PBS_", "LSB_", "FLUX_")):
            monkeypatch.delenv(name)


def test_main_prints_json_and_end_time(no_batch_env, capsys) -> None:
    assert resources.main([]) == 0
    assert json.loads(capsys.readouterr().out)["scheduler"] == "local"
    assert resources.main(["--end-time"]) == 1
    assert "no known end time" in capsys.readouterr().err
    assert resources.main(["--end-time", "--walltime", "1h"]) == 0
    assert int(capsys.readouterr().out) > 0
    assert resources.main(["--walltime", "soon"]) == 2
