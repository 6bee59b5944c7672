"""Commissioning: the shipped templates through two pilots, side by side."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pilot.commission.compare import Outcome, Row, compare, render
from pilot.commission.templates import load_templates
from pilot.errors import PilotError
from tests.conftest import PYTHON


def test_two_runs_of_this_pilot_agree_and_meet_expectations(tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "commission", "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert {r["template"] for r in rows} == {t.name for t in load_templates()}
    for r in rows:
        assert r["agree"]
        assert f"{r['a']['state']}/{r['a']['pilot_error_code']}" == r["expected"]
    assert "5/5 templates agree" in proc.stdout


def test_a_pilot_that_stops_early_disagrees(tmp_path: Path) -> None:
    lazy = "{python} -m pilot.cli run --url {url} --queue {queue} --workdir {workdir} --max-jobs 2"
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "commission", "--workdir", str(tmp_path), "--pilot-b", lazy, "--name-b", "lazy"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1
    assert (
        "missing/0" in proc.stdout and "NO" in proc.stdout and "2/5 templates agree" in proc.stdout
    )


def test_render_marks_unexpected_outcomes() -> None:
    (t,) = [x for x in load_templates() if x.name == "segfault"]
    rows = compare(
        [t], [Outcome("segfault", 1, "failed", 1328)], [Outcome("segfault", 2, "failed", 1305)]
    )
    assert isinstance(rows[0], Row) and not rows[0].agree
    table = render(rows, ("ours", "theirs"))
    assert (
        "failed/1328 (0.0s) ok" in table
        and "failed/1305 (0.0s) !!" in table
        and "0/1 templates agree" in table
    )


def test_bad_template_directory(tmp_path: Path) -> None:
    with pytest.raises(PilotError):
        load_templates(tmp_path)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PilotError):
        load_templates(tmp_path)
