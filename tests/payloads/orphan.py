"""A payload wrapper that leaves an orphan behind on purpose, then becomes the payload.

Usage: python orphan.py MARKER ARG ...

It double-forks a sleeping grandchild that calls ``setsid`` (out of the payload's
process group and session) and whose parent exits at once, so the grandchild is
re-parented (to init, or to the nearest subreaper), as a daemonising helper of a real
payload would be. The grandchild sleeps for ``SLEEP`` seconds with ``MARKER`` in its
command line, where a test looks for it after the run. The wrapper then execs
``python ARG ...``: the payload proper, whose every process the pilot must end.
"""

from __future__ import annotations

import os
import sys
import time

SLEEP = 120.0  # bounded: a pilot that loses the orphan leaves it for this long


def leave_orphan(marker: str) -> None:
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(
                sys.executable,
                [sys.executable, "-c", f"import time; time.sleep({SLEEP})", f"orphan:{marker}"],
            )
        os._exit(0)  # the grandchild's parent goes: it is an orphan now
    os.waitpid(pid, 0)


def survivors(marker: str) -> list[int]:
    """Pids of the orphans ``marker`` left that are still alive (zombies are dead)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if f"orphan:{marker}" in (p.info["cmdline"] or []) and p.info["status"] != "zombie":
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def main(argv: list[str]) -> int:
    marker, rest = argv[0], argv[1:]
    leave_orphan(marker)
    time.sleep(0.1)  # the orphan is re-parented before the payload starts
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *rest])
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
