"""Pilot processes of a commissioning run, each the leader of a session of its own.

A pilot starts payloads, monitors, copytools and, for the PanDA pilot,
process groups of its own; ending only the command we started leaves them
running. Every pilot is therefore started in a new session and ended by
session: SIGTERM to every process of the session (and to the descendants
of its leader that left it), a grace period, then SIGKILL. A process that
moved to a session of its own is still found through the process tree
recorded while it ran.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

GRACE = 5.0


class PilotProcess:
    """One pilot command, started in a new session; :meth:`end` ends all it started."""

    def __init__(
        self, argv: list[str], *, cwd: Path | None, env: dict[str, str], log: Path
    ) -> None:
        self.argv = argv
        self._out = open(log, "ab")  # noqa: SIM115 - closed in end()
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.sid = self.proc.pid
        self._known: dict[int, float] = {}  # pid -> create time, seen in the tree
        self._lock = threading.Lock()

    def close(self) -> None:
        self._out.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        self._remember()
        return self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None when still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            rc = self.poll()
            if rc is not None:
                return rc
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                return self.proc.wait(timeout=min(left, 2.0))
            except subprocess.TimeoutExpired:
                continue

    def _remember(self) -> None:
        """Note the leader's descendants, so that those that leave the session are found."""
        try:
            leader = psutil.Process(self.proc.pid)
            kids = leader.children(recursive=True)
        except psutil.Error:
            return
        with self._lock:
            for p in kids:
                try:
                    self._known[p.pid] = p.create_time()
                except psutil.Error:
                    continue

    def members(self) -> list[psutil.Process]:
        """Every live process of the pilot: its session and the descendants seen."""
        self._remember()
        out: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) == self.sid:
                    out[proc.pid] = proc
            except (OSError, psutil.Error):
                continue
        with self._lock:
            known = dict(self._known)
        for pid, created in known.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    out[pid] = p
            except psutil.Error:
                continue
        return [p for p in out.values() if p.pid != os.getpid()]

    def end(self, grace: float = GRACE) -> None:
        """SIGTERM to all of it, SIGKILL to what is left after ``grace`` seconds; reap."""
        end_all([self], grace)


def end_all(pilots: list[PilotProcess], grace: float = GRACE) -> None:
    """End every pilot at once: one grace period for all, not one after the other."""
    procs = [p for pilot in pilots for p in pilot.members()]
    for p in procs:
        _signal(p, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive + [p for pilot in pilots for p in pilot.members()]:
        _signal(p, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace)
    for pilot in pilots:
        try:
            pilot.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        pilot.close()


def _signal(p: psutil.Process, signum: int) -> None:
    try:
        p.send_signal(signum)
    except psutil.Error:
        pass
