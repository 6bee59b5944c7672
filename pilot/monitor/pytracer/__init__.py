"""A connection tracer for Python payloads, for sites without a system tracer.

Putting this directory first on the payload's ``PYTHONPATH`` makes Python load
its ``sitecustomize`` module at start-up, which wraps ``socket.connect`` and
``socket.connect_ex`` to append one line per connection to the file named by
``PANDA_TRACER_LOG`` (see :mod:`pilot.monitor.connections` for the format).
It needs no compiler and no ``LD_PRELOAD``; it sees only Python code's
connections, which psutil sampling complements.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TRACER_DIR = Path(__file__).resolve().parent
LOG_VARIABLE = "PANDA_TRACER_LOG"


def tracer_env(workdir: str | Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) plus what turns the tracer on for a payload in ``workdir``."""
    from pilot.monitor.connections import TRACER_LOG

    out = dict(os.environ if env is None else env)
    old = out.get("PYTHONPATH", "")
    out["PYTHONPATH"] = str(TRACER_DIR) + (os.pathsep + old if old else "")
    out[LOG_VARIABLE] = str(Path(workdir).resolve() / TRACER_LOG)
    return out
