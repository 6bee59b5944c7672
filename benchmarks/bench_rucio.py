"""Stage-in/out through the rucio copytool against the copy copytool, on the same files.

Brings up the real Rucio server of the tests (tests/tools/rucio_server.py:
PyPI's rucio, SQLite, one gunicorn worker on 127.0.0.1, posix RSEs on this
disk), then moves the same files with both copytools through the pilot's
stage-in/out: large files for throughput, small ones for the per-file
overhead. The copy copytool writes to and reads from a directory on the same
disk as the RSE, so the difference is what Rucio adds: REST calls
(registration, replica lookup, dataset attachment), its checksum pass and
its protocol layer. Also timed: making the client (authentication) once,
and one trace POST to /traces/.

    python benchmarks/bench_rucio.py [--large N --large-mb M --small N --rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pilot.data.copytools import CopyTool  # noqa: E402
from pilot.data.rucio import RucioCopyTool, RucioSettings  # noqa: E402
from pilot.data.staging import stage_in, stage_out  # noqa: E402
from pilot.data.traces import Trace, TraceSender  # noqa: E402
from pilot.job import FileSpec, Job  # noqa: E402
from tests.tools.rucio_server import SCOPE, RucioServer, server_venv  # noqa: E402


def make_files(d: Path, n: int, size: int, tag: str) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    block = os.urandom(min(size, 1 << 20))
    out = []
    for i in range(n):
        p = d / f"{tag}.{i:04d}.dat"
        with open(p, "wb") as fh:
            left = size
            while left > 0:
                fh.write(block[: min(left, len(block))])
                left -= len(block)
            fh.write(i.to_bytes(4, "little"))  # every file distinct
        out.append(p)
    return out


def specs(files: list[Path], rse: str, dataset: str) -> list[FileSpec]:
    return [
        FileSpec(
            p.name,
            "output",
            guid=str(uuid.uuid4()),
            scope=SCOPE,
            ddm_endpoint=rse,
            destination_dblock=dataset,
        )
        for p in files
    ]


def input_job(out: list[FileSpec], rse: str) -> Job:
    job = Job(panda_id=1, transformation="x")
    job.in_files = [
        FileSpec(s.lfn, "input", guid=s.guid, scope=SCOPE, fsize=s.fsize, checksum=s.checksum,
                 ddm_endpoint=rse)
        for s in out
    ]  # fmt: skip
    return job


def one_round(tool, files: list[Path], work: Path, storage: str, tag: str) -> tuple[float, float]:
    """Seconds for stage-out of ``files`` then stage-in of them (fresh names each round)."""
    src = work / f"out-{tag}"
    src.mkdir(parents=True)
    renamed = []
    for p in files:
        q = src / f"{tag}.{p.name}"
        os.link(p, q)
        renamed.append(q)
    out = specs(renamed, "LOCAL_DISK", f"bench.{tag}")
    t0 = time.perf_counter()
    stage_out(out, src, tool, storage, attempts=1)
    t_out = time.perf_counter() - t0
    dest = work / f"in-{tag}"
    dest.mkdir()
    job = input_job(out, "LOCAL_DISK")
    t0 = time.perf_counter()
    stage_in(job, dest, tool, storage, attempts=1)
    t_in = time.perf_counter() - t0
    return t_out, t_in


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=6, help="large files per round")
    parser.add_argument("--large-mb", type=int, default=32)
    parser.add_argument("--small", type=int, default=40, help="small (1 kB) files per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    t0 = time.perf_counter()
    venv, _ = server_venv()
    with tempfile.TemporaryDirectory(prefix="bench_rucio") as tmp:
        base = Path(tmp)
        server = RucioServer.start(base / "rucio", venv)
        bringup = time.perf_counter() - t0
        os.environ["RUCIO_CONFIG"] = str(server.client_config)
        try:
            t1 = time.perf_counter()
            settings = RucioSettings.from_environ()
            rucio = RucioCopyTool(settings, client=settings.client())
            connect = time.perf_counter() - t1
            copy = CopyTool()
            storage = str(base / "posix")
            sets = {
                "large": make_files(base / "src-large", args.large, args.large_mb << 20, "L"),
                "small": make_files(base / "src-small", args.small, 1024, "S"),
            }
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for r in range(args.rounds):
                for kind, files in sets.items():
                    for name, tool in (("copy", copy), ("rucio", rucio)):
                        tag = f"{name}{kind[0]}{r}"
                        got = one_round(tool, files, base / "work", storage, tag)
                        results.setdefault((kind, name), []).append(got)
            sender = TraceSender(settings.trace_url, 10)
            spec = FileSpec("t.dat", "input", scope=SCOPE)
            trace_times = []
            for _ in range(20):
                t2 = time.perf_counter()
                sender.send(Trace.for_file(None, spec, "get").done(1))
                trace_times.append(time.perf_counter() - t2)
        finally:
            server.stop()
    mb_large = args.large * args.large_mb
    print(
        f"Rucio server bring-up (venv cached): {bringup:.1f} s; client + token: {connect * 1e3:.0f} ms"
    )
    print(f"{'what':44} {'stage-out':>14} {'stage-in':>14}")
    for kind in ("large", "small"):
        for name in ("copy", "rucio"):
            rounds = results[(kind, name)]
            t_out = statistics.median(x[0] for x in rounds)
            t_in = statistics.median(x[1] for x in rounds)
            if kind == "large":
                what = f"{name}: {args.large} x {args.large_mb} MB, MB/s"
                print(f"{what:44} {mb_large / t_out:14.0f} {mb_large / t_in:14.0f}")
            else:
                what = f"{name}: {args.small} x 1 kB, ms per file"
                n = args.small
                print(f"{what:44} {t_out / n * 1e3:14.1f} {t_in / n * 1e3:14.1f}")
    so = statistics.median(x[0] for x in results[("small", "rucio")]) - statistics.median(
        x[0] for x in results[("small", "copy")]
    )
    si = statistics.median(x[1] for x in results[("small", "rucio")]) - statistics.median(
        x[1] for x in results[("small", "copy")]
    )
    print(
        f"{'rucio overhead over copy, ms per file':44} {so / args.small * 1e3:14.1f} "
        f"{si / args.small * 1e3:14.1f}"
    )
    print(
        f"{'one trace POST to /traces/, ms (median)':44} {statistics.median(trace_times) * 1e3:14.1f}"
    )
    print(f"(medians of {args.rounds} rounds; {os.cpu_count()} cores; same files, same disk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
