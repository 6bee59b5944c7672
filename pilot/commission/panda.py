"""The suite against a real PanDA server: jobs submitted to two queues, results read back.

The two queues (clones of a production queue, as PanDA's commissioning
makes them in CRIC) must exist on the server. Jobs are submitted with
PanDA's own classes (:mod:`pilot.commission.panda_submit`, run by the
interpreter given as ``--panda-python``), the pilots run against the
server, and each job is read back with ``/api/v1/job/get_description_incl_archive``
until it reaches a final state (or, once the pilots are done, ``holding``:
the pilot's final update is in, the server's Adder has not run yet).

What the server keeps is what is compared: state, codes, diagnostics, the
files with size and checksum (after the Adder), and its own times:
``creationTime``, ``startTime`` (set when the job is handed out) and
``endTime``. The sequence of updates is not in the job's description, so
it stays empty here.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pilot.commission.report import JobOutcome, _int
from pilot.errors import ErrorCode, PilotError

SUBMIT_SCRIPT = Path(__file__).resolve().parent / "panda_submit.py"
FINAL = frozenset({"finished", "failed", "cancelled", "closed"})


class PandaServer:
    """One real PanDA server: submit through PanDA's interpreter, read back over /api/v1."""

    def __init__(self, url: str, python: str, *, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.python = python
        self.token = token

    def submit(self, job: dict[str, Any]) -> int:
        request = json.dumps({"url": self.url, "job": job})
        try:
            out = subprocess.run(
                [self.python, str(SUBMIT_SCRIPT)],
                input=request, capture_output=True, text=True, timeout=180, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, f"submit: {exc}") from None
        if out.returncode != 0:
            raise PilotError(
                ErrorCode.COMMUNICATIONFAILURE, f"submit to {self.url}: {out.stderr.strip()[-500:]}"
            )
        return int(out.stdout.strip().splitlines()[-1])

    def describe(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """Each job's description as the server keeps it (active or archived)."""
        if not ids:
            return {}
        query = urllib.parse.urlencode([("job_ids", i) for i in ids])
        req = urllib.request.Request(
            f"{self.url}/api/v1/job/get_description_incl_archive?{query}",
            headers={"Accept": "application/json"},
        )
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=120) as answer:  # noqa: S310 - operator's URL
                body = json.loads(answer.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, f"read back: {exc}") from None
        if not body.get("success"):
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, f"read back: {body.get('message')}")
        return {int(d["PandaID"]): d for d in body.get("data") or [] if d}

    def waiting(self, ids: list[int]) -> int:
        """How many of ``ids`` still wait for a pilot."""
        states = [d.get("jobStatus") for d in self.describe(ids).values()]
        return sum(s in ("defined", "assigned", "activated", "pending") for s in states)

    def settle(self, ids: list[int], timeout: float) -> None:
        """Wait until every job is final, ``timeout`` at most: after the pilot's final
        update a job is ``holding`` until the server's Adder has registered its files."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(d.get("jobStatus") in FINAL for d in self.describe(ids).values()):
                return
            time.sleep(2.0)


def _epoch(value: Any) -> float | None:
    if isinstance(value, dict) and "__datetime__" in value:
        value = value["__datetime__"]
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def outcome_from_description(panda_id: int, d: dict[str, Any] | None) -> JobOutcome:
    """A job's outcome from its server description (see the module's note on times)."""
    out = JobOutcome(panda_id)
    if not d:
        return out
    created, started, ended = (_epoch(d.get(k)) for k in ("creationTime", "startTime", "endTime"))
    if started and created:
        out.handed_out = round(started - created, 2)
        out.handed_out_at = round(started, 3)
    state = str(d.get("jobStatus") or "")
    if state not in FINAL | {"holding"}:
        return out
    out.state = state
    out.pilotErrorCode = _int(d.get("pilotErrorCode"))
    out.exeErrorCode = _int(d.get("exeErrorCode"))
    out.transExitCode = _int(d.get("transExitCode"))
    out.pilotErrorDiag = str(d.get("pilotErrorDiag") or "")[:256]
    out.exeErrorDiag = str(d.get("exeErrorDiag") or "")[:256]
    out.pilot_id = str(d.get("pilotID") or "")
    if ended and started:
        out.final_update = round(ended - started, 2)
    for f in d.get("Files") or []:
        if f.get("type") in ("output", "log"):
            checksum = str(f.get("checksum") or "")
            out.files.append(
                {
                    "lfn": str(f.get("lfn")),
                    "fsize": _int(f.get("fsize")),
                    "adler32": checksum.split(":", 1)[-1],
                }
            )
    out.files.sort(key=lambda f: f["lfn"])
    return out
