"""Event-service payloads in a container still see the yampl socket under /tmp."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pilot.eventservice.executor import EventExecutor
from pilot.eventservice.model import RangeStatus
from pilot.job import EventRange, Job
from pilot.payload.container import ContainerSpec
from tests.conftest import REPO


def toysim_job() -> Job:
    return Job.from_panda(
        {"PandaID": 7, "taskID": 3, "jobsetID": 2, "transformation": sys.executable,
         "jobPars": "-m pilot.payloads.toysim", "eventService": "True"}
    )  # fmt: skip


def run(ex: EventExecutor, n: int) -> dict:
    ex.start()
    ex.add_ranges([EventRange(f"3-7-1-{i}-0", i + 1, i + 2, "EVNT.root", "g") for i in range(n)])
    ex.no_more_ranges()
    results: list = []
    for _ in range(240):
        results += ex.poll(0.5)
        if ex.finished or ex.error is not None:
            break
    return {r.event_range_id: r for r in results}


# image "/" is the host's root read-only with a private, empty /tmp: only the
# socket the pilot binds in makes the channel reachable
@pytest.mark.parametrize("image", ["", "/"])
def test_toysim_in_bubblewrap_reaches_the_channel(bwrap, tmp_path: Path, image: str):
    # a Python or a checkout that lives under /tmp must stay visible over the private /tmp
    keep = {str(REPO), sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parent)}
    spec = ContainerSpec(
        "bwrap", image=image, ro_binds=tuple(p for p in keep if p.startswith("/tmp"))
    )
    ex = EventExecutor(toysim_job(), tmp_path / "w", container=spec)
    results = run(ex, 5)
    assert ex.finished and ex.error is None, (tmp_path / "w" / "payload.stderr").read_text()
    assert len(results) == 5 and all(r.status is RangeStatus.FINISHED for r in results.values())


def test_apptainer_gets_the_socket_bound(tmp_path: Path, monkeypatch):
    seen: dict = {}

    def fake_wrap(command, workdir, spec, **kw):
        seen["spec"] = spec
        return ["/bin/sh", "-c", command]

    monkeypatch.setattr("pilot.eventservice.executor.wrap", fake_wrap)
    spec = ContainerSpec("apptainer", image="docker://alpine:3")
    ex = EventExecutor(toysim_job(), tmp_path / "w", container=spec)
    try:
        ex.start()
        assert seen["spec"].binds == (f"/tmp/zmq_{ex.channel_name}",)
        assert seen["spec"].image == "docker://alpine:3"
    finally:
        ex.stop(0.5)
