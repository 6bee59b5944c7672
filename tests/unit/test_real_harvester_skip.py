"""Where ``../shared/tools/real-harvester`` is absent (a user's clone), the tests that
drive the pilot with Harvester's own messenger skip and say why."""

from __future__ import annotations

from pathlib import Path

import pytest

import tests.real_harvester as real


def test_absent_tool_skips_with_the_reason(monkeypatch, capsys):
    monkeypatch.setattr(real, "TOOL", Path("/nonexistent/shared/tools/real-harvester"))
    with pytest.raises(pytest.skip.Exception) as exc:
        real.real_harvester()
    assert "/nonexistent/shared/tools/real-harvester is absent" in str(exc.value)
    assert "skipped" in capsys.readouterr().err
