"""The Rucio server tooling says why when the server cannot be installed (the tests skip)."""

from __future__ import annotations

import pytest

from tests.tools.rucio_server import Unavailable, server_venv


def test_no_package_index_is_unavailable_with_the_reason(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PILOT_TEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as on a machine without PyPI: nothing to fetch
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    with pytest.raises(Unavailable) as err:
        server_venv("41.5.1")
    assert "cannot install the Rucio server 41.5.1" in str(err.value)
    assert not (tmp_path / "cache" / "rucio-server-41.5.1" / ".complete").exists()
