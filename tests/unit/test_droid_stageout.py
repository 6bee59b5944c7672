"""Droids store a finished range's output before reporting it, as ``pilot run`` does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from droid.executors import PerRange
from hpc.payloadconfig import output_storage
from hpc.wire import FAILED, FINISHED
from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.ranks import build_parser
from yoda.ledger import Ledger


class Finishing:
    """A per-range executor whose every range finishes at once with an output file."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.done: list[RangeResult] = []
        self.finished = False

    def add_ranges(self, ranges):
        for r in ranges:
            out = self.outdir / f"{r.event_range_id}.out"
            out.write_text(r.event_range_id)
            self.done.append(
                RangeResult(r.event_range_id, RangeStatus.FINISHED, str(out), out.stat().st_size)
            )

    def poll(self, timeout):
        out, self.done = self.done, []
        return out


def work_of(n: int):
    led = Ledger()
    led.add_job(501, 9)
    from pilot.job import EventRange

    led.add_ranges([EventRange(f"9-501-77-{i + 1}-1", i, i, "E.root") for i in range(n)])
    return led.work_batch(np.arange(n))


def test_outputs_are_stored_before_results_leave_and_a_failed_store_fails_the_range(tmp_path):
    def store(r: RangeResult) -> RangeResult:
        if r.event_range_id.endswith("-2-1"):
            raise PilotError(ErrorCode.STAGEOUTFAILED, "storage full")
        dest = tmp_path / "storage" / Path(r.output_path).name
        dest.parent.mkdir(exist_ok=True)
        dest.write_bytes(Path(r.output_path).read_bytes())
        return RangeResult(r.event_range_id, r.status, str(dest), r.fsize)

    ex = PerRange(Finishing(tmp_path), stage_out=store)
    ex.add(work_of(3))
    got = ex.poll(0.0)
    assert got.cols["state"].tolist() == [FINISHED, FAILED, FINISHED]
    assert got.cols["error_code"].tolist()[1] == ErrorCode.STAGEOUTFAILED
    assert got.path[0] == str(tmp_path / "storage" / "9-501-77-1-1.out") and got.path[1] == ""


def test_pilot_hpc_stores_outputs_like_pilot_run():
    url = output_storage(build_parser().parse_args(["--url", "http://x", "--workdir", "/w"]))
    assert (url.copytool, url.output_url, url.workdir) == ("copy", "", "/w")
    harv = output_storage(build_parser().parse_args(["--harvester", "/ap"]))
    assert harv.copytool == "harvester"  # Harvester stages out from where outputs lie
    http = build_parser().parse_args(
        ["--url", "http://x", "--copytool", "http", "--output-url", "https://se/es"]
    )
    assert (output_storage(http).copytool, output_storage(http).output_url) == (
        "http",
        "https://se/es",
    )
