"""Queue configuration from PanDA schedconfig JSON (CRIC queue descriptions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pilot.errors import ErrorCode, PilotError
from pilot.queue import QueueConfig, load_queue, schedconfig_url

CRIC = {
    "nickname": "CERN-PROD_UCORE",
    "panda_resource": "CERN-PROD_UCORE",
    "state": "ACTIVE",
    "status": "online",
    "site": "CERN-PROD",
    "maxrss": 16000,
    "maxwdir": "32768",
    "maxtime": 172800,
    "corecount": 8,
    "timefloor": 120,
    "copytools": {"rucio": {"setup": ""}, "xrdcp": {"setup": ""}},
    "acopytools": {"pr": ["rucio"], "pw": ["rucio", "xrdcp"], "pl": "xrdcp"},
    "astorages": {"pw": ["CERN-PROD_DATADISK"], "default": ["CERN-PROD_SCRATCHDISK"]},
    "container_type": "singularity:pilot;docker:wrapper",
    "container_options": "-B /cvmfs",
    "catchall": "useRealTimeLogging pilot_args=-x",
    "extra_key": [1, 2],
}


def test_full_description() -> None:
    q = QueueConfig.from_dict(CRIC)
    assert (q.maxrss, q.maxwdir, q.maxtime, q.corecount, q.timefloor) == (
        16000,
        32768,
        172800,
        8,
        120,
    )
    assert q.copytools_for("pw") == ["rucio", "xrdcp"]
    assert q.copytools_for("pl") == ["xrdcp"]
    assert q.copytools_for("pls") == ["rucio", "xrdcp"]  # no activity, no default
    assert q.storages_for("pw") == ["CERN-PROD_DATADISK"]
    assert q.storages_for("pr") == ["CERN-PROD_SCRATCHDISK"]
    assert q.container_for("pilot") == "singularity" and q.container_for("wrapper") == "docker"
    assert q.catchall_flags() == {"useRealTimeLogging": "", "pilot_args": "-x"}
    assert q.to_dict()["extra_key"] == [1, 2]
    assert QueueConfig.from_dict(q.to_dict()) == q


def test_wrapped_form_and_defaults(tmp_path: Path) -> None:
    wrapped = {"CERN-PROD_UCORE": CRIC}
    assert QueueConfig.from_dict(wrapped).nickname == "CERN-PROD_UCORE"
    assert QueueConfig.from_dict(wrapped, "CERN-PROD_UCORE").corecount == 8
    minimal = QueueConfig.from_dict({"nickname": "Q", "panda_resource": "Q", "maxrss": None})
    assert (minimal.maxrss, minimal.maxwdir, minimal.copytools_for("pr")) == (2000, 14336, ["copy"])
    assert load_queue(None, "LOCAL").nickname == "LOCAL"
    path = tmp_path / "q.json"
    path.write_text(json.dumps(wrapped))
    assert load_queue(path, "CERN-PROD_UCORE").site == "CERN-PROD"
    assert load_queue(f"file://{path}").site == "CERN-PROD"
    assert schedconfig_url("http://h:1/", "Q") == "http://h:1/cache/schedconfig/Q.all.json"


@pytest.mark.parametrize(
    "change",
    [
        {"nickname": ""},
        {"panda_resource": None},
        {"state": "OFFLINE"},
        {"maxrss": "lots"},
        {"corecount": -1},
        {"copytools": 5},
        {"acopytools": ["rucio"]},
        {"nickname": {"a": 1}},
    ],
)
def test_invalid_descriptions(change: dict) -> None:
    with pytest.raises(PilotError) as err:
        QueueConfig.from_dict({**CRIC, **change})
    assert err.value.code == ErrorCode.QUEUEDATANOTOK


def test_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(PilotError) as err:
        load_queue(tmp_path / "absent.json")
    assert err.value.code == ErrorCode.QUEUEDATA
    bad = tmp_path / "bad.json"
    bad.write_text('{"nickname": ')
    with pytest.raises(PilotError) as err:
        load_queue(bad)
    assert err.value.code == ErrorCode.QUEUEDATANOTOK
    with pytest.raises(PilotError) as err:
        load_queue(None)
    assert err.value.code == ErrorCode.QUEUEDATA
    with pytest.raises(PilotError) as err:
        QueueConfig.from_dict({"A": CRIC, "B": CRIC})
    assert err.value.code == ErrorCode.QUEUEDATANOTOK
    with pytest.raises(PilotError):
        QueueConfig.from_dict([CRIC])


def test_resolve_queue_order(tmp_path: Path) -> None:
    from pilot.queue import resolve_queue

    path = tmp_path / "q.json"
    path.write_text(json.dumps({"CERN-PROD_UCORE": CRIC}))
    offline = tmp_path / "off.json"
    offline.write_text(json.dumps({**CRIC, "state": "OFFLINE"}))
    # explicit source first, then $LOCAL_AGIS_SCHEDCONF
    q = resolve_queue("CERN-PROD_UCORE", queuedata_url=str(path), environ={})
    assert q.corecount == 8
    q = resolve_queue("CERN-PROD_UCORE", environ={"LOCAL_AGIS_SCHEDCONF": str(path)})
    assert q.corecount == 8
    with pytest.raises(PilotError) as err:
        resolve_queue("X", queuedata_url=str(tmp_path / "absent.json"), environ={})
    assert err.value.code == ErrorCode.QUEUEDATA
    # a server that cannot tell: defaults (a port nobody listens on)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = resolve_queue("Q", server_url=f"http://127.0.0.1:{port}", environ={}, timeout=5)
    assert q == QueueConfig.default("Q")
    assert resolve_queue("Q", environ={}) == QueueConfig.default("Q")
    with pytest.raises(PilotError) as err:
        resolve_queue("CERN-PROD_UCORE", queuedata_url=str(offline), environ={})
    assert err.value.code == ErrorCode.QUEUEDATANOTOK
