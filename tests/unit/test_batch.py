"""Batch scripts for Slurm, PBS, LSF and Flux: directives, launcher lines,
Harvester templates and submission with canned tool output."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from hpc.batch import (
    BatchRequest,
    launcher_argv,
    render_script,
    render_template,
    submit_main,
    submit_script,
)
from hpc.resources import CommandResult
from pilot.errors import PilotError


def req(scheduler: str = "slurm", **kw: object) -> BatchRequest:
    base: dict[str, object] = {
        "scheduler": scheduler,
        "nodes": 2,
        "walltime": 5400,
        "url": "https://panda.example:25443",
        "queue": "CERN_HPC",
        "ranks_per_node": 4,
        "cores_per_rank": 2,
        "log_dir": "/scratch/logs",
        "allow_run_as_root": False,
    }
    base.update(kw)
    return BatchRequest(**base)  # type: ignore[arg-type]


def directives(script: str, prefix: str) -> list[str]:
    return [line[len(prefix) :].strip() for line in script.splitlines() if line.startswith(prefix)]


def launch_line(script: str) -> list[str]:
    line = next(x for x in script.splitlines() if "--walltime-end" in x)
    return shlex.split(line.rstrip(" &").replace('"$PILOT_WALLTIME_END"', "END"))


def bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(script, encoding="utf-8")
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# -- directives per scheduler ------------------------------------------------------


def test_slurm_script(tmp_path: Path) -> None:
    script = render_script(req(batch_queue="debug", account="atlas", env=(("A", "x y"),)))
    assert script.startswith("#!/bin/bash\n")
    assert directives(script, "#SBATCH") == [
        "--job-name=panda-pilot",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--cpus-per-task=2",
        "--time=0-01:30:00",
        "--output=/scratch/logs/panda-pilot-%j.out",
        "--error=/scratch/logs/panda-pilot-%j.err",
        "--partition=debug",
        "--account=atlas",
    ]
    # Yoda is one extra rank on the first node: 8 droids for the 8 rank slots
    assert launch_line(script) == [
        "mpiexec", "-n", "9", "--map-by", "node", "--bind-to", "none", "--oversubscribe",
        "pilot", "hpc", "--url", "https://panda.example:25443", "--queue", "CERN_HPC",
        "--slots", "2", "--walltime-end", "END",
    ]  # fmt: skip
    assert "PILOT_WALLTIME_END=$((PILOT_START + 5400))" in script
    assert "python3 -m hpc.resources --end-time" in script
    assert "export OMP_NUM_THREADS=2" in script
    assert "export A='x y'" in script
    assert "cd /scratch/logs || exit 1" in script
    assert "trap 'pilot_forward TERM' TERM" in script
    bash_syntax_ok(script, tmp_path)


def test_slurm_srun_launcher_and_long_walltime() -> None:
    script = render_script(req(launcher="srun", walltime=2 * 86400 + 61, oversubscribe=True))
    assert "#SBATCH --time=2-00:01:01" in script
    assert launch_line(script)[:8] == [
        "srun", "--mpi=pmi2", "--nodes=2", "--ntasks=9", "--distribution=cyclic",
        "--cpus-per-task=2", "--overcommit", "--kill-on-bad-exit=0",
    ]  # fmt: skip
    # srun forwards signals to its tasks itself: no per-child forwarding, no relay.
    assert "pgrep" not in script and "pilot-signal-relay" not in script


def test_pbs_pro_script(tmp_path: Path) -> None:
    script = render_script(req("pbs", batch_queue="prod", account="HEP", walltime=30 * 3600))
    assert directives(script, "#PBS") == [
        "-N panda-pilot",
        "-l select=2:ncpus=8:mpiprocs=4:ompthreads=2",
        "-l walltime=30:00:00",
        "-o /scratch/logs/",
        "-e /scratch/logs/",
        "-q prod",
        "-A HEP",
    ]
    assert launch_line(script)[:5] == ["mpiexec", "-n", "9", "--map-by", "node"]
    assert "pilot-signal-relay" not in script  # qsig reaches the batch shell itself
    bash_syntax_ok(script, tmp_path)


def test_torque_script() -> None:
    script = render_script(req("pbs", pbs_flavor="torque"))
    assert "#PBS -l nodes=2:ppn=8" in script
    assert "select=" not in script


def test_lsf_script(tmp_path: Path) -> None:
    script = render_script(req("lsf", walltime=5401, batch_queue="batch", account="CSC1"))
    assert directives(script, "#BSUB") == [
        "-J panda-pilot",
        "-n 8",
        '-R "span[ptile=4]"',
        '-R "affinity[core(2)]"',
        "-W 1:31",
        "-o /scratch/logs/panda-pilot-%J.out",
        "-e /scratch/logs/panda-pilot-%J.err",
        "-q batch",
        "-P CSC1",
    ]
    assert launch_line(script)[0] == "mpiexec"
    bash_syntax_ok(script, tmp_path)


def test_flux_script(tmp_path: Path) -> None:
    script = render_script(req("flux", harvester="/ap", url=None, queue=None, batch_queue="pbatch"))
    assert directives(script, "# flux:") == [
        "--job-name=panda-pilot",
        "-N 2",
        "-n 8",
        "-c 2",
        "-t 90m",
        "--output=/scratch/logs/panda-pilot-{{id}}.out",
        "--error=/scratch/logs/panda-pilot-{{id}}.err",
        "--queue=pbatch",
    ]
    assert launch_line(script) == [
        "flux", "run", "-N", "2", "-n", "8", "-c", "2",
        "pilot", "hpc", "--harvester", "/ap", "--slots", "2", "--walltime-end", "END",
    ]  # fmt: skip
    assert "cd /ap || exit 1" in script
    bash_syntax_ok(script, tmp_path)


def test_mpiexec_options() -> None:
    argv = launcher_argv(
        req(cores_per_rank=1, allow_run_as_root=True, oversubscribe=True, ulfm=True)
    )
    assert argv == [
        "mpiexec", "--allow-run-as-root", "-n", "9", "--map-by", "node", "--bind-to", "none",
        "--oversubscribe", "--with-ft", "ulfm",
    ]  # fmt: skip


def test_slots_and_output_storage_pass_through() -> None:
    words = launch_line(render_script(req(cores_per_rank=1)))
    assert "--slots" not in words  # pilot hpc's own default: one
    words = launch_line(
        render_script(
            req(
                slots=16,
                copytool="http",
                output_url="https://se.example/es",
                queuedata_url="/sw/q.json",
            )
        )
    )
    at = words.index("--slots")
    assert words[at : at + 8] == [
        "--slots", "16", "--copytool", "http", "--output-url", "https://se.example/es",
        "--queuedata-url", "/sw/q.json",
    ]  # fmt: skip


def test_pilot_options_pass_through() -> None:
    script = render_script(
        req(
            harvester="/ap dir",
            url=None,
            queue=None,
            workdir="/w",
            resume=True,
            pilot_command="python -m pilot.cli",
        )
    )
    words = launch_line(script)
    assert words[words.index("python") :] == [
        "python", "-m", "pilot.cli", "hpc", "--harvester", "/ap dir",
        "--workdir", "/w", "--resume", "--slots", "2", "--walltime-end", "END",
    ]  # fmt: skip
    assert "cd '/ap dir' || exit 1" in script


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"scheduler": "sge"}, "unknown scheduler"),
        ({"nodes": 0}, "nodes must be at least 1"),
        ({"slots": -1}, "slots must be at least 1"),
        ({"queue": None}, "--url needs --queue"),
        ({"harvester": "/ap"}, "exactly one upstream"),
        ({"url": None, "queue": None}, "exactly one upstream"),
        ({"scheduler": "pbs", "launcher": "srun"}, "srun needs --scheduler slurm"),
        ({"launcher": "flux"}, "flux needs --scheduler flux"),
        ({"launcher": "aprun"}, "unknown launcher"),
        ({"env": (("BAD-NAME", "1"),)}, "bad environment variable name"),
        ({"job_name": "a b"}, "bad job name"),
    ],
)
def test_bad_requests_are_rejected(kw: dict[str, object], message: str) -> None:
    with pytest.raises(PilotError) as err:
        req(**kw)
    assert message in err.value.detail


# -- Harvester templates --------------------------------------------------------------

HARVESTER_TEMPLATE = """\
#!/bin/bash
#SBATCH --nodes={nNode}
#SBATCH --ntasks-per-node={nCorePerNode}
#SBATCH --time={requestWalltimeMinute}
#SBATCH --output={logDir}/worker-{workerID}.out
#SBATCH --partition={localQueueName}
# site {computingSite} queue {pandaQueueName} harvester {harvesterID} total {nCoreTotal}
export HARVESTER_WORKER_ID={workerID}
if [ -n "${{SLURM_JOB_ID:-}}" ]; then echo in {{slurm}}; fi
cd {accessPoint}
{pilotCommand}
"""


def test_harvester_template_is_filled(tmp_path: Path) -> None:
    r = req(
        harvester="/ap/42",
        url=None,
        queue=None,
        batch_queue="regular",
        harvester_values=(("workerID", "42"), ("harvesterID", "h1"), ("computingSite", "NERSC")),
    )
    script = render_template(HARVESTER_TEMPLATE, r)
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=8\n#SBATCH --time=90\n" in script
    assert "#SBATCH --output=/scratch/logs/worker-42.out" in script
    assert "#SBATCH --partition=regular" in script
    assert "# site NERSC queue  harvester h1 total 16" in script
    assert 'if [ -n "${SLURM_JOB_ID:-}" ]; then echo in {slurm}; fi' in script
    assert "cd /ap/42\n" in script
    assert launch_line(script)[-6:] == [
        "--harvester", "/ap/42", "--slots", "2", "--walltime-end", "END",
    ]  # fmt: skip
    bash_syntax_ok(script, tmp_path)


@pytest.mark.parametrize(
    ("template", "message"),
    [("{nNode} {nodeCount}", "unknown placeholders ['nodeCount']"), ("x ${HOME}", "HOME")],
)
def test_bad_templates_are_clear_errors(template: str, message: str) -> None:
    with pytest.raises(PilotError) as err:
        render_template(template, req())
    assert message in err.value.detail
    assert "{{" in err.value.detail


def test_lone_brace_is_an_error() -> None:
    with pytest.raises(PilotError, match="lone braces"):
        render_template("awk '{ print }'", req())


# -- submission -----------------------------------------------------------------------


class FakeSubmit:
    def __init__(self, result: CommandResult) -> None:
        self.result = result
        self.calls: list[tuple[tuple[str, ...], str | None]] = []

    def __call__(self, argv: Sequence[str], stdin_text: str | None) -> CommandResult:
        self.calls.append((tuple(argv), stdin_text))
        return self.result


@pytest.mark.parametrize(
    ("scheduler", "stdout", "job_id", "command"),
    [
        ("slurm", "1234;cluster\n", "1234", ("sbatch", "--parsable")),
        ("slurm", "77\n", "77", ("sbatch", "--parsable")),
        ("pbs", "4567.pbs01.example\n", "4567.pbs01.example", ("qsub",)),
        ("lsf", "Job <89> is submitted to queue <normal>.\n", "89", ("bsub",)),
        ("flux", "\u0192Abc12\n", "\u0192Abc12", ("flux", "batch")),
    ],
)
def test_submit_parses_the_job_id(
    tmp_path: Path, scheduler: str, stdout: str, job_id: str, command: tuple[str, ...]
) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    fake = FakeSubmit(CommandResult(0, stdout, ""))
    sub = submit_script(scheduler, script, fake)
    assert sub.job_id == job_id
    argv, stdin_text = fake.calls[0]
    assert argv[: len(command)] == command
    if scheduler == "lsf":  # bsub reads the #BSUB lines from its stdin only
        assert argv == ("bsub",) and stdin_text == script.read_text()
    else:
        assert argv[-1] == str(script) and stdin_text is None


@pytest.mark.parametrize(
    "result",
    [
        CommandResult(1, "", "sbatch: error: invalid partition"),
        CommandResult(0, "Submitted?\n", ""),
    ],
)
def test_submit_failures_are_pilot_errors(tmp_path: Path, result: CommandResult) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n")
    with pytest.raises(PilotError):
        submit_script("slurm", script, FakeSubmit(result))


CLI = ["--nodes", "1", "--walltime", "10", "--harvester", "/ap"]


def test_submit_main_writes_and_submits(tmp_path: Path, capsys) -> None:
    fake = FakeSubmit(CommandResult(0, "Job <5> is submitted to queue <q>.\n", ""))
    cli = ["--nodes", "1", "--walltime", "10", "--harvester", str(tmp_path)]
    code = submit_main(["--scheduler", "lsf", *cli, "--log-dir", str(tmp_path)], run=fake)
    assert code == 0
    assert capsys.readouterr().out.strip() == "5"
    written = list(tmp_path.glob("panda-pilot-*.sh"))
    assert len(written) == 1 and "#BSUB -n 1" in written[0].read_text()


def test_submit_main_dry_run_submits_nothing(tmp_path: Path, capsys) -> None:
    fake = FakeSubmit(CommandResult(0, "1\n", ""))
    out = tmp_path / "s.sh"
    code = submit_main(
        ["--scheduler", "pbs", *CLI, "--dry-run", "--script-out", str(out)], run=fake
    )
    assert code == 0 and fake.calls == []
    assert "#PBS -l select=1:ncpus=1:mpiprocs=1:ompthreads=1" in capsys.readouterr().out
    assert out.read_text().startswith("#!/bin/bash")


def test_submit_main_template_and_values(tmp_path: Path, capsys) -> None:
    template = tmp_path / "t.sh"
    template.write_text("#SBATCH -N {nNode}\n# worker {workerID}\n{pilotCommand}\n")
    code = submit_main(
        [
            "--scheduler",
            "slurm",
            *CLI,
            "--template",
            str(template),
            "--set",
            "workerID=9",
            "--dry-run",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("#SBATCH -N 1\n# worker 9\nset -u\n")


@pytest.mark.parametrize(
    "argv",
    [
        ["--scheduler", "slurm", "--nodes", "1", "--walltime", "10", "--url", "http://x"],
        ["--scheduler", "slurm", "--nodes", "1", "--walltime", "never", "--harvester", "/ap"],
        ["--scheduler", "pbs", *CLI, "--launcher", "srun"],
        ["--scheduler", "slurm", *CLI, "--env", "NOVALUE"],
        ["--scheduler", "slurm", *CLI, "--template", "/no/such/template"],
    ],
)
def test_submit_main_usage_errors(argv: list[str], capsys) -> None:
    assert submit_main([*argv, "--dry-run"]) == 2
    assert "pilot hpc submit:" in capsys.readouterr().err


def test_submit_main_reports_a_failed_submit(tmp_path: Path, capsys) -> None:
    fake = FakeSubmit(CommandResult(1, "", "sbatch: error: Batch job submission failed"))
    cli = ["--nodes", "1", "--walltime", "10", "--harvester", str(tmp_path)]
    code = submit_main(["--scheduler", "slurm", *cli, "--log-dir", str(tmp_path)], run=fake)
    assert code == 1
    assert "submission failed" in capsys.readouterr().err


def test_both_upstreams_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        submit_main(["--scheduler", "slurm", *CLI, "--url", "http://x", "--queue", "Q"])
    assert exc.value.code == 2


# -- a new user's first try --------------------------------------------------------


def test_defaults_give_yoda_and_a_droid_on_one_node(tmp_path: Path) -> None:
    """``--nodes 1`` and nothing else: no walltime (the queue's limit), Yoda plus one
    droid, the work directory made by the script, a relay for scancel --signal."""
    r = BatchRequest(scheduler="slurm", nodes=1, url="http://x", queue="Q", workdir="/w/new")
    script = render_script(r)
    assert not any(d.startswith("--time") for d in directives(script, "#SBATCH"))
    assert "#SBATCH --ntasks-per-node=1" in script
    launch = next(x for x in script.splitlines() if x.startswith("mpiexec"))
    assert launch.startswith("mpiexec -n 2 ")
    assert launch.endswith('${PILOT_WALLTIME_END:+--walltime-end "$PILOT_WALLTIME_END"} &')
    assert "PILOT_WALLTIME_END='' ;;" in script
    assert script.index("mkdir -p /w/new || exit 1") < script.index("cd /w/new || exit 1")
    assert "srun --overlap" in script and "pilot-signal-relay" in script
    assert script.index("trap '' TERM") > script.index("PILOT_RC=$?")
    bash_syntax_ok(script, tmp_path)


def test_flux_cannot_add_a_rank_and_says_so() -> None:
    with pytest.raises(PilotError) as err:
        req("flux", nodes=1, ranks_per_node=1, url="http://x")
    assert "pilot hpc needs two" in err.value.detail


def test_submit_time_errors_for_what_cannot_work(tmp_path: Path, capsys) -> None:
    fake = FakeSubmit(CommandResult(0, "1\n", ""))
    base = ["--scheduler", "slurm", "--nodes", "1", "--log-dir", str(tmp_path)]
    missing = tmp_path / "no-such-ap"
    assert submit_main([*base, "--harvester", str(missing)], run=fake) == 2
    assert "is not a directory" in capsys.readouterr().err
    work = tmp_path / "new" / "work"
    url = ["--url", "http://x", "--queue", "Q", "--workdir", str(work)]
    assert submit_main([*base, *url, "--resume"], run=fake) == 2
    assert "no yoda.journal" in capsys.readouterr().err
    assert work.is_dir()  # made at submit time
    (work / "yoda.journal").write_bytes(b"")
    assert submit_main([*base, *url], run=fake) == 2
    assert "--resume to go on" in capsys.readouterr().err
    assert fake.calls == []
    assert submit_main([*base, *url, "--resume"], run=fake) == 0
    assert len(fake.calls) == 1


def test_the_token_file_and_api_go_to_the_ranks(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    words = launch_line(render_script(req(token_file=str(token), panda_api="legacy")))
    at = words.index("--token-file")
    assert words[at : at + 4] == ["--token-file", str(token), "--panda-api", "legacy"]
    assert "secret" not in render_script(req(token_file=str(token)))  # the path, not the token


def test_token_options_that_cannot_apply_are_refused(tmp_path) -> None:
    with pytest.raises(PilotError, match="go with --url"):
        req(harvester="/ap", url=None, queue=None, panda_api="v1")
    with pytest.raises(PilotError, match="no such file"):
        req(token_file=str(tmp_path / "none"))
