"""Run a payload in its own process group and kill its whole tree.

The payload gets a new session (``setsid``) so that one ``killpg`` reaches it
and every child it forks, and so that a signal meant for the pilot's own
group does not hit the payload before the pilot has decided what to do.
Grandchildren that call ``setsid`` themselves escape the group; they are
found with psutil (descendants of the payload, recorded while it runs) and
killed too, so no process of a job survives it.

A child that outlives its parent is re-parented: to init normally, where a
walk down from the payload no longer finds it. Two things find it anyway:
every payload process carries the payload's tag in its environment
(``TAG_VARIABLE``), and the pilot makes itself a child subreaper
(:func:`become_subreaper`, Linux's ``PR_SET_CHILD_SUBREAPER``) so such
orphans are re-parented to the pilot, which can then also reap them.
:meth:`PayloadProcess.clean_up` runs after every payload's end, however it
ended, and kills what is left of its tree.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pilot.errors import ErrorCode, PilotError

TAG_VARIABLE = "PANDA_PILOT_PAYLOAD_TAG"
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
_PROC = Path("/proc")


def become_subreaper() -> bool:
    """Make this process the subreaper of its descendants: an orphaned payload process is
    re-parented here instead of to init. True if it took (Linux >= 3.4); idempotent."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@dataclass
class KillRecord:
    """What a kill did: the evidence operators ask for afterwards."""

    reason_code: int = 0
    reason: str = ""
    signals: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)


class PayloadProcess:
    """A running payload: its process, its group, the descendants seen."""

    def __init__(
        self,
        argv: Sequence[str] | str,
        *,
        cwd: str | Path,
        env: Mapping[str, str] | None = None,
        stdout: str | Path | None = None,
        stderr: str | Path | None = None,
        stdin: int | None = subprocess.DEVNULL,
        shell: bool = False,
        tag: str | None = None,
    ) -> None:
        self.cwd = Path(cwd)
        self.stdout_path = Path(stdout) if stdout else None
        self.stderr_path = Path(stderr) if stderr else None
        self._out = open(self.stdout_path, "ab") if self.stdout_path else subprocess.DEVNULL
        self._err = open(self.stderr_path, "ab") if self.stderr_path else subprocess.DEVNULL
        self.start_time = time.time()
        self.kill_record: KillRecord | None = None
        self._cleaned = False
        self._known: dict[int, psutil.Process] = {}
        # Every process of the payload inherits this variable, so even one
        # that double-forks out of the group is found again at kill time.
        self.tag = tag or f"{os.getpid()}-{time.monotonic_ns()}"
        env = dict(env if env is not None else os.environ)
        env[TAG_VARIABLE] = self.tag
        try:
            self.proc = subprocess.Popen(
                argv,
                cwd=str(self.cwd),
                env=env,
                stdout=self._out,
                stderr=self._err,
                stdin=stdin,
                shell=shell,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError as exc:
            self._close()
            raise PilotError(ErrorCode.TRANSFORMNOTFOUND, f"cannot start payload: {exc}") from None
        except PermissionError as exc:
            self._close()
            raise PilotError(ErrorCode.CHMODTRF, f"cannot start payload: {exc}") from None
        except OSError as exc:
            self._close()
            raise PilotError(
                ErrorCode.PAYLOADEXECUTIONEXCEPTION, f"cannot start payload: {exc}"
            ) from None
        self.pid = self.proc.pid
        self.pgid = self.pid
        # A pidfd becomes readable when the process exits: waiting on it
        # with select() costs nothing, where Popen.wait(timeout) polls.
        try:
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        try:
            self._known[self.pid] = psutil.Process(self.pid)
        except psutil.Error:
            pass

    # -- observation ---------------------------------------------------------
    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None:
            self._close()
        return rc

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def wait(self, timeout: float | None = None, wake_fds: Sequence[int] = ()) -> int | None:
        """Wait for the payload; ``None`` when ``timeout`` passed first.

        A readable descriptor in ``wake_fds`` (a signal's self-pipe, a
        message channel) ends the wait early, so one thread can sleep on
        the payload and on everything else that needs it at once.
        """
        rc = self.proc.poll()
        if rc is not None:
            self._close()
            return rc
        if self._pidfd is None:
            try:
                rc = self.proc.wait(timeout=timeout if not wake_fds else min(timeout or 0.5, 0.5))
            except subprocess.TimeoutExpired:
                return None
        else:
            select.select([self._pidfd, *wake_fds], [], [], timeout)
            rc = self.proc.poll()
        if rc is not None:
            self._close()
        return rc

    def processes(self) -> list[psutil.Process]:
        """The payload and all its live descendants (remembered across re-parenting)."""
        procs: dict[int, psutil.Process] = {}
        root = self._known.get(self.pid)
        if root is not None:
            try:
                if root.is_running():
                    procs[root.pid] = root
                    for child in root.children(recursive=True):
                        procs[child.pid] = child
            except psutil.Error:
                pass
        for pid, p in list(self._known.items()):
            if pid not in procs:
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        procs[pid] = p
                    else:
                        del self._known[pid]
                except psutil.Error:
                    del self._known[pid]
        self._known.update(procs)
        return list(procs.values())

    # -- killing -------------------------------------------------------------
    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def tagged_processes(self) -> list[psutil.Process]:
        """Processes carrying this payload's tag: the ones that left the group or the tree.

        Runs at every payload's end, so it reads ``/proc/<pid>/environ`` as bytes and
        looks for the tag there: a quarter of the CPU of asking psutil for each
        process's environment as a dict (benchmarks/bench_monitor.py)."""
        if not _PROC.is_dir():
            return self._tagged_by_psutil()
        needle = f"\0{TAG_VARIABLE}={self.tag}\0".encode()
        skip = {os.getpid(), self.pid, *self._known}
        return _processes(pid for pid, env in _environments(skip) if needle in env)

    def _tagged_by_psutil(self) -> list[psutil.Process]:
        found = []
        skip = {os.getpid(), self.pid, *self._known}
        for p in psutil.process_iter():
            if p.pid in skip:
                continue
            try:
                if p.environ().get(TAG_VARIABLE) == self.tag:
                    found.append(p)
            except (psutil.Error, OSError):
                continue
        return found

    def remnants(self) -> list[psutil.Process]:
        """Live processes of this payload other than its root: what :meth:`clean_up` kills."""
        procs = {p.pid: p for p in self.processes() + self.tagged_processes()}
        return [p for pid, p in procs.items() if pid != self.pid and _alive(p)]

    def clean_up(self, grace: float = 10.0) -> KillRecord | None:
        """After the payload's end (or to end it): kill whatever of its tree is left, the
        orphans re-parented to init or to the pilot included, and reap them. None when
        nothing was left (the usual case: one scan of the process table)."""
        if self._cleaned:
            return None  # the root is gone and nothing was left: nothing can come back
        if self.proc.poll() is not None and not self.remnants():
            self._reap_known()
            self._close()
            self._cleaned = True
            return None
        record = self.kill_tree(grace, self.kill_record.reason_code if self.kill_record else 0)
        self._cleaned = self.proc.poll() is not None and not record.survivors
        return record

    def _reap_known(self, also: Sequence[int] = ()) -> None:
        """Reap the payload's processes that died as children of this one (re-parented to
        it, the subreaper): else they stay zombies as long as the pilot runs. Those are
        the ones seen alive, the ones just killed, and any zombie child still in the
        payload's session (another payload's root is never: each has a session of its
        own, so its exit status stays for its own Popen)."""
        pids = {*self._known, *also}
        try:
            for child in psutil.Process().children():
                if child.pid not in pids and child.status() == psutil.STATUS_ZOMBIE:
                    if os.getsid(child.pid) == self.pgid:
                        pids.add(child.pid)
        except (psutil.Error, OSError):
            pass
        for pid in pids:
            if pid == self.pid:
                continue  # the root is subprocess's to reap (it keeps the exit status)
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid  # not ours to reap, or reaped already
            except OSError:
                continue
            if done:
                self._known.pop(pid, None)

    def kill_tree(self, grace: float = 10.0, reason_code: int = 0, reason: str = "") -> KillRecord:
        """SIGTERM the group and every known descendant, wait ``grace``, then SIGKILL.

        The record keeps the pids and signals used, for the job's log.
        """
        record = KillRecord(reason_code=reason_code, reason=reason)
        procs = self.processes() + self.tagged_processes()
        record.pids = sorted({p.pid for p in procs} | {self.pid})
        record.signals.append("SIGTERM")
        others = [p for p in procs if p.pid != self.pid]
        # Once the root is reaped its pid may be reused: the group is signalled only while
        # it surely is the payload's (its root unreaped, or a member of it still known).
        group = self.proc.poll() is None or any(_pgid(p) == self.pgid for p in others)
        if group:
            self.signal_group(signal.SIGTERM)
        for p in others:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        deadline = time.monotonic() + grace
        # The root is ours: reap it with subprocess so its exit status is kept.
        self.wait(timeout=grace)
        alive = [p for p in others if _alive(p)]
        if alive:
            psutil.wait_procs(alive, timeout=max(0.0, deadline - time.monotonic()))
        alive = [
            p for p in self.processes() + self.tagged_processes() if p.pid != self.pid and _alive(p)
        ]
        if alive or self.proc.poll() is None:
            record.signals.append("SIGKILL")
            if self.proc.poll() is None or any(_pgid(p) == self.pgid for p in alive):
                self.signal_group(signal.SIGKILL)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            self.wait(timeout=5)
            psutil.wait_procs(alive, timeout=5)
        record.survivors = [p.pid for p in alive if _alive(p)]
        if self.proc.poll() is None:
            record.survivors.append(self.pid)
        self._reap_known(record.pids)
        self._close()
        if self.kill_record is None:
            self.kill_record = record
        return record

    def _close(self) -> None:
        if getattr(self, "_pidfd", None) is not None and self.proc.returncode is not None:
            os.close(self._pidfd)
            self._pidfd = None
        for fh in (self._out, self._err):
            if hasattr(fh, "close"):
                try:
                    fh.close()
                except OSError:
                    pass


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except OSError:
        return None


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def end_leftovers(workdir: str | Path, grace: float = 5.0) -> list[int]:
    """End the payload processes an earlier pilot left running in ``workdir``.

    A pilot killed with SIGKILL cannot end its payload, which then runs on as an
    orphan (a batch system's cgroup ends it with the job, not sooner). A pilot that
    resumes the job in the same work directory must not run beside it: two payloads
    would write the same outputs. Only processes that carry a payload tag
    (``TAG_VARIABLE``) and work inside ``workdir`` are ended: SIGTERM, then SIGKILL
    after ``grace``. Returns their pids."""
    root = Path(workdir).resolve()
    if not _PROC.is_dir():
        return []
    needle = f"\0{TAG_VARIABLE}=".encode()
    inside: list[int] = []
    for pid, env in _environments({os.getpid()}):
        at = env.find(needle)
        if at < 0 or env[at + len(needle) : at + len(needle) + 1] in (b"", b"\0"):
            continue  # no tag, or an empty one
        try:
            cwd = Path(os.readlink(_PROC / str(pid) / "cwd"))
        except OSError:
            continue  # gone meanwhile
        if cwd == root or root in cwd.parents:
            inside.append(pid)
    found = _processes(inside)
    for p in found:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(found, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    return [p.pid for p in found]


def _environments(skip: set[int]) -> Iterator[tuple[int, bytes]]:
    """Every readable process but ``skip``, with its environment block as
    ``/proc/<pid>/environ`` has it, a NUL in front (so ``\\0NAME=`` finds the first
    variable too). Bytes, not psutil's dict: a quarter of the CPU at each payload's end."""
    for name in os.listdir(_PROC):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(_PROC / name / "environ", "rb") as fh:
                env = b"\0" + fh.read()
        except OSError:
            continue  # gone, or not ours to read
        yield int(name), env


def _processes(pids: Iterable[int]) -> list[psutil.Process]:
    """psutil handles of those of ``pids`` still there (made only for the few found)."""
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return found
