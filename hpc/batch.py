"""Render and submit the batch job that runs ``pilot hpc`` on an allocation.

``pilot hpc submit`` turns a few numbers (nodes, ranks per node, cores per
rank, walltime) into a batch script for Slurm, PBS (Pro or Torque), LSF or
Flux and hands it to ``sbatch``, ``qsub``, ``bsub`` or ``flux batch``. The
script's body is the same everywhere: set the environment, find the
allocation's end (``python3 -m hpc.resources --end-time``, else start +
requested walltime; passed to ``pilot hpc --walltime-end`` so that Yoda
drains in time), make and go to the work directory (the access point in
Harvester mode, as Harvester's own templates do), and run the MPI launcher
in the background with TERM/INT/USR1/USR2 passed on to the ranks, so that
``scancel --signal=TERM`` (or ``qsig``/``bkill -s``) reaches them while the
shell waits for them to drain. (``scancel --signal=TERM`` without
``--batch``/``--full`` signals only job steps, and ``mpiexec``'s ranks on
the first node live in the batch step: under Slurm a small relay step
passes such signals on to the batch shell.) The launcher starts Yoda as one
extra rank on the first node, so each rank slot asked for is a droid.

Sites that already have a Harvester batch template use it as is
(``--template``): its placeholders (``{nNode}``, ``{nCorePerNode}``,
``{requestWalltime}``, ``{accessPoint}``, ...) are filled the way Harvester's
submitters fill them, ``{{``/``}}`` are literal braces (Python format
rules, as in Harvester), and ``{pilotCommand}`` stands for the whole body
above. An unknown placeholder is an error, never a silently broken script.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hpc.dialects import (  # noqa: F401 - BatchRequest is part of this module's API
    DIALECTS,
    FORWARDED_SIGNALS,
    LAUNCHERS,
    SCHEDULERS,
    BatchRequest,
    Dialect,
)
from hpc.resources import CommandResult, parse_walltime, run_command
from pilot.errors import ErrorCode, PilotError

SubmitRunner = Callable[[Sequence[str], "str | None"], CommandResult]


def _default_submit_runner(argv: Sequence[str], stdin_text: str | None) -> CommandResult:
    return run_command(argv, timeout=120.0, input_text=stdin_text)


# --------------------------------------------------------------------------
# the body


def launcher_argv(req: BatchRequest) -> list[str]:
    """The MPI launcher's words, before the pilot command."""
    name = req.launcher_name
    if name == "srun":
        # cyclic from the first node: it gets the extra Yoda rank (rank 0), which
        # overcommits the allocation by one task
        argv = [
            "srun",
            "--mpi=pmi2",
            f"--nodes={req.nodes}",
            f"--ntasks={req.launched_ranks}",
            "--distribution=cyclic",
            f"--cpus-per-task={req.cores_per_rank}",
            "--overcommit",
            "--kill-on-bad-exit=0",
        ]
    elif name == "flux":
        argv = ["flux", "run", "-N", str(req.nodes), "-n", str(req.launched_ranks)]
        argv += ["-c", str(req.cores_per_rank)]
    else:
        # round robin over the nodes from the first: rank 0 (Yoda) and one droid per
        # rank slot there, one droid per rank slot elsewhere. Yoda's rank is one more
        # than the slots, hence --oversubscribe; unbound, the droids' payloads spread
        # over the node's cores as the kernel schedules them.
        argv = ["mpiexec"]
        if req.allow_run_as_root:
            argv.append("--allow-run-as-root")
        argv += ["-n", str(req.launched_ranks), "--map-by", "node", "--bind-to", "none"]
        argv.append("--oversubscribe")
        if req.ulfm:
            argv += ["--with-ft", "ulfm"]
    return argv + list(req.launcher_args)


def pilot_argv(req: BatchRequest) -> list[str]:
    """``pilot hpc ...`` for the ranks (the walltime end is added in shell)."""
    argv = shlex.split(req.pilot_command) + ["hpc"]
    if req.harvester:
        argv += ["--harvester", req.harvester]
    else:
        argv += ["--url", str(req.url), "--queue", str(req.queue)]
    if req.workdir:
        argv += ["--workdir", req.workdir]
    if req.resume:
        argv.append("--resume")
    slots = req.slots or req.cores_per_rank  # a range in flight per core of the rank
    if slots > 1:
        argv += ["--slots", str(slots)]
    if req.copytool:
        argv += ["--copytool", req.copytool]
    if req.output_url:
        argv += ["--output-url", req.output_url]
    if req.queuedata_url:
        argv += ["--queuedata-url", req.queuedata_url]
    if req.token_file:
        argv += ["--token-file", req.token_file]
    if req.panda_api:
        argv += ["--panda-api", req.panda_api]
    return argv


def _forwarding(req: BatchRequest) -> list[str]:
    """Shell lines that pass the batch system's signals on to the ranks.

    srun and ``flux run`` forward signals to every task themselves. Open MPI's
    ``mpiexec`` (5.x, as in the PyPI wheel) does not for TERM and INT: under
    Slurm it exits on them and leaves the ranks on its own node orphaned. So
    TERM and INT go straight to the launcher's children (the ranks on this
    node, rank 0 among them, which drains the others over MPI); USR1 and
    USR2, which ``mpiexec`` forwards to all ranks everywhere, go to it.
    """
    direct = req.launcher_name == "mpiexec"
    lines = [
        "pilot_forward() {",
        '    echo "pilot batch job: SIG$1, forwarding"',
        '    [ -n "$PILOT_LAUNCHER" ] || return 0',
    ]
    if direct:
        lines += [
            '    local kids=""',
            '    if [ "$1" = TERM ] || [ "$1" = INT ]; then',
            '        kids=$(pgrep -P "$PILOT_LAUNCHER" 2>/dev/null ||'
            ' cat /proc/"$PILOT_LAUNCHER"/task/*/children 2>/dev/null)',
            "    fi",
            '    if [ -n "$kids" ]; then',
            '        kill -"$1" $kids 2>/dev/null',
            "    else",
            '        kill -"$1" "$PILOT_LAUNCHER" 2>/dev/null',
            "    fi",
        ]
    else:
        lines.append('    kill -"$1" "$PILOT_LAUNCHER" 2>/dev/null')
    lines += ["    return 0", "}"]
    lines += [f"trap 'pilot_forward {sig}' {sig}" for sig in FORWARDED_SIGNALS]
    return lines


def _relay(req: BatchRequest) -> list[str]:
    """Slurm: a job step that passes ``scancel --signal=SIG`` on to the batch shell.

    Without ``--batch``/``--full``, ``scancel --signal`` signals job steps only,
    and ``mpiexec``'s ranks on the first node are not in one (they are children
    of the batch shell). This step (``--overlap``: it takes no CPU from the
    ranks) sleeps; on TERM, INT, USR1 or USR2 it sends the same signal to the
    batch shell, whose traps pass it on as for a ``--batch`` signal. With the
    srun launcher the ranks are a step themselves and get the signal directly.
    """
    if req.scheduler != "slurm" or req.launcher_name == "srun":
        return []
    traps = "; ".join(
        f'trap "kill -{sig} $PILOT_SHELL 2>/dev/null; exit 0" {sig}' for sig in FORWARDED_SIGNALS
    )
    inner = f"{traps}; sleep 2147483647 & wait"
    return [
        "# scancel --signal without --batch reaches job steps only: relay it to this shell",
        "PILOT_RELAY=''",
        "if command -v srun >/dev/null 2>&1; then",
        f"    PILOT_SHELL=$$ srun --overlap --nodes=1 --ntasks=1 --cpus-per-task=1 --quiet"
        f" --job-name=pilot-signal-relay --export=ALL bash -c {shlex.quote(inner)} &",
        "    PILOT_RELAY=$!",
        "fi",
    ]


def render_body(req: BatchRequest) -> str:
    """The scheduler-independent part of the script (``{pilotCommand}``)."""
    quote = shlex.quote
    launch = " ".join(quote(word) for word in launcher_argv(req) + pilot_argv(req))
    lines = [
        "set -u",
        "PILOT_START=$(date +%s)",
        f"export PILOT_BATCH_SCHEDULER={req.scheduler}",
        f"export OMP_NUM_THREADS={req.cores_per_rank}",
    ]
    if req.path_prepend:
        lines.append(f'export PATH={quote(req.path_prepend)}:"$PATH"')
    lines += [f"export {key}={quote(value)}" for key, value in req.env]
    fallback = f"$((PILOT_START + {req.walltime}))" if req.walltime else "''"
    lines += [
        "# The allocation's end as the batch system tells it, else start + walltime",
        "# (none known: the ranks run until the batch system stops them).",
        "PILOT_WALLTIME_END=$(python3 -m hpc.resources --end-time 2>/dev/null)",
        'case "$PILOT_WALLTIME_END" in',
        f"    '' | *[!0-9]*) PILOT_WALLTIME_END={fallback} ;;",
        "esac",
    ]
    if req.workdir:
        lines.append(f"mkdir -p {quote(req.workdir)} || exit 1")
    lines += [
        f"cd {quote(req.run_dir)} || exit 1",
        'echo "pilot batch job started on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ),'
        ' walltime end $PILOT_WALLTIME_END"',
        "# The launcher runs in the background so that signals reach it while",
        "# the shell waits: the ranks drain and exit on their own.",
        'PILOT_LAUNCHER=""',
        *_forwarding(req),
    ]
    relay = _relay(req)
    end = '--walltime-end "$PILOT_WALLTIME_END"'
    if not req.walltime:
        end = '${PILOT_WALLTIME_END:+--walltime-end "$PILOT_WALLTIME_END"}'
    lines += [
        *relay,
        f"{launch} {end} &",
        "PILOT_LAUNCHER=$!",
        "# wait returns early (>128) when a trapped signal arrives: wait again;",
        "# the last wait collects the launcher's own exit status.",
        'while kill -0 "$PILOT_LAUNCHER" 2>/dev/null; do wait "$PILOT_LAUNCHER"; done',
        'wait "$PILOT_LAUNCHER"',
        "PILOT_RC=$?",
    ]
    if relay:
        lines += [
            "trap '' TERM  # the relay's last word (it is stopped now) is not for the ranks",
            'kill "$PILOT_RELAY" 2>/dev/null; wait "$PILOT_RELAY" 2>/dev/null',
        ]
    lines += [
        'echo "pilot batch job finished at $(date -u +%Y-%m-%dT%H:%M:%SZ), exit code $PILOT_RC"',
        'exit "$PILOT_RC"',
    ]
    return "\n".join(lines) + "\n"


def render_script(req: BatchRequest) -> str:
    """The whole batch script for ``req.scheduler``."""
    header = [
        "#!/bin/bash",
        *DIALECTS[req.scheduler].directives(req),
        f"# PanDA pilot batch job ({req.scheduler}: {req.nodes} nodes x"
        f" {req.ranks_per_node} ranks x {req.cores_per_rank} cores),"
        " rendered by `pilot hpc submit`",
    ]
    return "\n".join(header) + "\n" + render_body(req)


# --------------------------------------------------------------------------
# Harvester templates

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|[{}]")


def template_values(req: BatchRequest) -> dict[str, str]:
    """Harvester's placeholder names, filled from the request."""
    values = {
        "nNode": req.nodes,
        "nCorePerNode": req.cores_per_node,
        "nCoreTotal": req.total_cores,
        "nRankPerNode": req.ranks_per_node,
        "nRankTotal": req.total_ranks,
        "nCorePerRank": req.cores_per_rank,
        "requestWalltime": req.walltime,
        "requestWalltimeMinute": math.ceil(req.walltime / 60),
        "requestRam": 0,
        "requestRamPerCore": 0,
        "requestDisk": 0,
        "accessPoint": req.run_dir,
        "workerID": "",
        "harvesterID": "",
        "computingSite": req.queue or "",
        "pandaQueueName": req.queue or "",
        "localQueueName": req.batch_queue or "",
        "jobType": "",
        "logDir": req.log_dir,
        "jobName": req.job_name,
        "pilotCommand": render_body(req).rstrip("\n"),
    }
    values.update(dict(req.harvester_values))
    return {key: str(value) for key, value in values.items()}


def render_template(template: str, req: BatchRequest) -> str:
    """Fill a Harvester batch template; unknown placeholders are an error."""
    values = template_values(req)
    unknown: list[str] = []
    stray: list[int] = []

    def fill(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        if name is None:
            stray.append(match.start())
            return token
        if name not in values:
            unknown.append(name)
            return token
        return values[name]

    text = _PLACEHOLDER.sub(fill, template)
    if unknown or stray:
        detail = []
        if unknown:
            detail.append(f"unknown placeholders {sorted(set(unknown))}")
        if stray:
            detail.append(f"lone braces at offsets {stray[:5]}")
        raise PilotError(
            ErrorCode.GENERALERROR,
            "batch template: " + "; ".join(detail) + " (write literal braces as {{ and }})",
        )
    return text


# --------------------------------------------------------------------------
# submission


@dataclass(frozen=True)
class Submission:
    job_id: str
    script_path: Path
    command: tuple[str, ...]


def submit_script(scheduler: str, script_path: Path, run: SubmitRunner | None = None) -> Submission:
    """Hand a rendered script to the batch system; its job id or PilotError."""
    dialect = DIALECTS[scheduler]
    argv, via_stdin = dialect.submit_argv(script_path)
    stdin_text = script_path.read_text(encoding="utf-8") if via_stdin else None
    result = (run or _default_submit_runner)(argv, stdin_text)
    if not result.ok:
        raise PilotError(
            ErrorCode.GENERALERROR,
            f"{argv[0]} failed (exit {result.returncode}): {(result.stderr or result.stdout)[-300:]}",
        )
    return Submission(dialect.parse_job_id(result.stdout), script_path, tuple(argv))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pilot hpc submit",
        description="Render a batch script that runs `pilot hpc` under MPI, and submit it.",
    )
    parser.add_argument("--scheduler", required=True, choices=SCHEDULERS)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument(
        "--walltime",
        default="",
        help="minutes, H:M:S, D-H:M:S, or 90s/30m/2h (as sbatch -t); default: the batch"
        " system's limit for the queue",
    )
    upstream = parser.add_mutually_exclusive_group(required=True)
    upstream.add_argument("--url", help="PanDA server URL (with --queue)")
    upstream.add_argument("--harvester", help="Harvester access point directory")
    parser.add_argument("--queue", help="PanDA queue name")
    parser.add_argument("--ranks-per-node", type=int, default=1)
    parser.add_argument("--cores-per-rank", type=int, default=1)
    parser.add_argument("--launcher", choices=LAUNCHERS, help="default: mpiexec (flux: flux run)")
    parser.add_argument("--launcher-arg", action="append", default=[], help="extra launcher word")
    parser.add_argument("--oversubscribe", action="store_true", help="more ranks than cores")
    parser.add_argument("--ulfm", action="store_true", help="mpiexec --with-ft ulfm (Open MPI 5)")
    parser.add_argument("--batch-queue", "--partition", dest="batch_queue")
    parser.add_argument("--account")
    parser.add_argument("--job-name", default="panda-pilot")
    parser.add_argument("--log-dir", default=".", help="batch stdout/stderr and the script")
    parser.add_argument("--workdir", help="the pilot's work directory (pilot hpc --workdir)")
    parser.add_argument("--resume", action="store_true", help="pilot hpc --resume")
    parser.add_argument(
        "--slots", type=int, default=0, help="pilot hpc --slots (default: --cores-per-rank)"
    )
    parser.add_argument("--copytool", default="", help="pilot hpc --copytool")
    parser.add_argument("--output-url", default="", help="pilot hpc --output-url")
    parser.add_argument(
        "--queuedata-url", default="", help="pilot hpc --queuedata-url (the payloads' limits)"
    )
    parser.add_argument(
        "--token-file",
        default="",
        help="pilot hpc --token-file: the bearer token for --url, read by rank 0 in the job",
    )
    parser.add_argument(
        "--panda-api", choices=("v1", "legacy", "auto"), default="", help="pilot hpc --panda-api"
    )
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--pilot-command",
        default=shlex.join([sys.executable, "-m", "pilot.cli"]),
        help="how ranks start the pilot (default: this pilot, with the Python that runs it:"
        " a launcher may put another Python first on PATH)",
    )
    parser.add_argument(
        "--path-prepend",
        default=os.path.dirname(sys.executable),
        help="put this before PATH in the job (default: this Python's bin directory; '' for none)",
    )
    parser.add_argument("--pbs-flavor", choices=("pro", "torque"), default="pro")
    parser.add_argument("--directive", action="append", default=[], help="extra directive")
    parser.add_argument("--template", help="a Harvester batch template to fill instead")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a template value (workerID=7, harvesterID=..., requestRam=...)",
    )
    parser.add_argument("--script-out", help="write the script here (default: in --log-dir)")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    return parser


def _pairs(items: list[str], what: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PilotError(ErrorCode.GENERALERROR, f"{what} needs NAME=VALUE, got {item!r}")
        pairs.append((key, value))
    return tuple(pairs)


def request_from_args(args: argparse.Namespace) -> BatchRequest:
    return BatchRequest(
        scheduler=args.scheduler,
        nodes=args.nodes,
        walltime=parse_walltime(args.walltime) if args.walltime else 0,
        url=args.url,
        queue=args.queue,
        harvester=os.path.abspath(args.harvester) if args.harvester else None,
        ranks_per_node=args.ranks_per_node,
        cores_per_rank=args.cores_per_rank,
        launcher=args.launcher,
        job_name=args.job_name,
        batch_queue=args.batch_queue,
        account=args.account,
        log_dir=os.path.abspath(args.log_dir),
        workdir=os.path.abspath(args.workdir) if args.workdir else None,
        env=_pairs(args.env, "--env"),
        pilot_command=args.pilot_command,
        path_prepend=args.path_prepend or None,
        resume=args.resume,
        slots=args.slots,
        copytool=args.copytool,
        output_url=args.output_url,
        queuedata_url=args.queuedata_url,
        token_file=os.path.abspath(args.token_file) if args.token_file else "",
        panda_api=args.panda_api,
        oversubscribe=args.oversubscribe,
        ulfm=args.ulfm,
        allow_run_as_root=hasattr(os, "geteuid") and os.geteuid() == 0,
        pbs_flavor=args.pbs_flavor,
        extra_directives=tuple(args.directive),
        launcher_args=tuple(args.launcher_arg),
        harvester_values=_pairs(args.set, "--set"),
    )


def preflight(req: BatchRequest) -> list[str]:
    """What cannot work, said at submit time rather than when the job starts hours later.

    The work directory is made now (the script makes it again, for a file
    system the login node does not see)."""
    problems = []
    if req.harvester and not os.path.isdir(req.harvester):
        problems.append(f"the Harvester access point {req.harvester} is not a directory")
    if req.workdir:
        try:
            os.makedirs(req.workdir, exist_ok=True)
        except OSError as exc:
            problems.append(f"cannot make the work directory {req.workdir}: {exc}")
        else:
            journal = os.path.join(req.workdir, "yoda.journal")
            if req.resume and not os.path.exists(journal):
                problems.append(f"--resume: {req.workdir} has no yoda.journal to resume from")
            elif not req.resume and os.path.exists(journal):
                problems.append(
                    f"{req.workdir} holds the journal of an earlier job: --resume to go on"
                    " with it, or another --workdir"
                )
    elif req.resume:
        problems.append("--resume needs the --workdir of the job to resume")
    return problems


def submit_main(argv: list[str] | None = None, run: SubmitRunner | None = None) -> int:
    """``pilot hpc submit``: 0 submitted (job id on stdout), 1 failed, 2 bad usage."""
    args = _build_parser().parse_args(argv)
    try:
        req = request_from_args(args)
        if args.template:
            try:
                template = Path(args.template).read_text(encoding="utf-8")
            except OSError as exc:
                raise PilotError(ErrorCode.GENERALERROR, f"batch template: {exc}") from exc
            script = render_template(template, req)
        else:
            script = render_script(req)
    except PilotError as exc:
        print(f"pilot hpc submit: {exc.detail}", file=sys.stderr)
        return 2
    if args.dry_run:
        if args.script_out:
            Path(args.script_out).write_text(script, encoding="utf-8")
        sys.stdout.write(script)
        return 0
    problems = preflight(req)
    if problems:
        for problem in problems:
            print(f"pilot hpc submit: {problem}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    path = Path(args.script_out or Path(req.log_dir) / f"{req.job_name}-{stamp}-{os.getpid()}.sh")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Path(req.log_dir).mkdir(parents=True, exist_ok=True)
        path.write_text(script, encoding="utf-8")
        path.chmod(0o755)
        submission = submit_script(req.scheduler, path, run)
    except OSError as exc:
        print(f"pilot hpc submit: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    except PilotError as exc:
        print(f"pilot hpc submit: {exc.detail}", file=sys.stderr)
        return 1
    print(submission.job_id)
    print(f"pilot hpc submit: script {path}", file=sys.stderr)
    return 0


main = submit_main

if __name__ == "__main__":
    sys.exit(submit_main())
