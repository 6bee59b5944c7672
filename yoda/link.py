"""Rank 0's link to the upstream: requests out, answers picked up without waiting.

Yoda never calls the upstream itself. It hands a link a request (ranges for
a job, or a batch of results to report) and collects the answers at each
turn of its loop. Two links do the work:

* :class:`InlineLink` calls the upstream object in Yoda's own process and has
  the answer ready at once. Tests use it, with in-memory upstreams.
* :class:`ProcessLink` runs the upstream in a child process (``python -m
  yoda.link``) and talks to it over a pipe. ``pilot hpc`` uses it, for two
  reasons: an HTTP call to a slow PanDA server no longer stalls every droid
  while rank 0 waits for it, and reading a ``getEventRanges`` answer (JSON
  decoding and validation) and writing ``updateEventRanges`` entries, a third
  of rank 0's CPU per range, run on another core.

The child ignores SIGTERM and SIGINT: a walltime signal goes to rank 0, which
drains, sends the last updates through the link and then closes it. It exits
when its pipe closes, so a killed rank 0 does not leave it behind. A child
that dies is restarted; what it had in hand is answered as failed, so the
ranges are asked for again and the results stay unsent (journaled) until a
link reports them.
"""

from __future__ import annotations

import faulthandler
import fcntl
import importlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np

from hpc.tuning import tune_gc
from hpc.wire import ResultBatch, format_range_ids
from pilot.errors import ErrorCode, PilotError
from yoda.intake import Intake, range_columns
from yoda.journal import MAGIC, Book, Journal, Op, cut_torn_tail, read_records

log = logging.getLogger(__name__)


@dataclass
class Ranges:
    """The answer to a fetch. ``intake`` None and no ``error``: the job has no more ranges,
    unless ``pending`` (the upstream's answer is on its way: ask again a little later)."""

    req: int
    job: int
    asked: int
    intake: Intake | None = None
    error: str = ""
    pending: bool = False


@dataclass
class Updated:
    """The answer to an update: per result, whether the upstream took it."""

    req: int
    ok: np.ndarray | None = None
    error: str = ""


Answer = Ranges | Updated


@dataclass
class IdParts:
    """What range ids are made of, for the rows of an update (see ``Ledger.id_parts``)."""

    jobs: dict[int, tuple[int, int]]
    cols: np.ndarray = field(repr=False)

    def ids(self) -> list[str]:
        return format_range_ids(self.jobs, self.cols)


def fetch(
    up: Any,
    req: int,
    job: int,
    panda_id: int,
    jobset_id: int,
    task_id: int,
    n: int,
    fetched: Journal | None = None,
) -> Ranges:
    """One getEventRanges call, read into columns. With ``fetched``, the ranges are written
    there before anyone is told of them (see :func:`recover_fetched`)."""
    try:
        got = up.get_event_ranges(panda_id, jobset_id, task_id, n)
    except PilotError as exc:
        return Ranges(req, job, n, error=str(exc))
    if got is None:  # Harvester: asked, not answered yet
        return Ranges(req, job, n, pending=True)
    if not got:
        return Ranges(req, job, n)
    intake = range_columns(got, panda_id)
    if fetched is not None and len(intake.cols):
        fetched.append(Op.ADD, {"j": job, "files": intake.files}, intake.cols)
    return Ranges(req, job, n, intake)


def recover_fetched(book: Book, path: str | Path) -> int:
    """After ``--resume``: add the ranges a link had from the upstream that rank 0 never
    journaled (it was killed with the answer on its way). The upstream handed them to
    this job, so they are run, not lost. Ranges the ledger has are skipped; returns how
    many were added. A torn last record is cut off, as in the journal."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return 0
    added, end = 0, len(MAGIC)
    for rec in read_records(blob, str(path)):
        if rec.op is Op.ADD and rec.data is not None:
            files = [tuple(f) for f in rec.meta["files"]]
            added += len(book.add_columns(int(rec.meta["j"]), rec.data, files))
        end = rec.end
    if end < len(blob):
        cut_torn_tail(path, end)
    return added


def update(up: Any, req: int, batch: ResultBatch, parts: IdParts) -> Updated:
    ids = parts.ids()
    report = getattr(up, "report_results", None)  # Harvester: outputs go into its dump
    try:
        if report is not None:
            answer = report(batch.results(ids))
        else:
            answer = up.update_event_ranges(batch.panda_entries(ids), version=0)
    except PilotError as exc:
        return Updated(req, error=str(exc))
    if not isinstance(answer, (list, tuple)):
        return Updated(req, error=f"upstream answered {type(answer).__name__}, not a list")
    answer = answer[: len(batch)]
    ok = np.zeros(len(batch), dtype=bool)
    if answer.count(True) == len(answer):  # all taken, the common case: no loop here
        ok[: len(answer)] = True
    else:
        ok[: len(answer)] = [bool(a) for a in answer]
    return Updated(req, ok)


class Link(Protocol):
    def fetch(
        self, req: int, job: int, panda_id: int, jobset_id: int, task_id: int, n: int
    ) -> None: ...
    def update(self, req: int, batch: ResultBatch, parts: IdParts) -> None: ...
    def answers(self, timeout: float = 0.0) -> list[Answer]: ...
    def close(self) -> None: ...


class InlineLink:
    """The upstream called in this process; answers are ready when the call returns."""

    def __init__(self, upstream: Any) -> None:
        self.up = upstream
        self._ready: deque[Answer] = deque()

    def fetch(
        self, req: int, job: int, panda_id: int, jobset_id: int, task_id: int, n: int
    ) -> None:
        self._ready.append(fetch(self.up, req, job, panda_id, jobset_id, task_id, n))

    def update(self, req: int, batch: ResultBatch, parts: IdParts) -> None:
        self._ready.append(update(self.up, req, batch, parts))

    def answers(self, timeout: float = 0.0) -> list[Answer]:
        out = list(self._ready)
        self._ready.clear()
        return out

    def close(self) -> None:
        pass


class ProcessLink:
    """The upstream in a child process. ``spec``: ``{"factory": "module:callable",
    "kwargs": {...}, "path": [sys.path entries], "log": file, "fetched": file}``; the
    callable builds the upstream object there, and every range it fetches is written to
    ``fetched`` before rank 0 hears of it. The spec travels over the pipe, so a token
    never shows in ps."""

    def __init__(self, spec: dict[str, Any], *, start_timeout: float = 60.0) -> None:
        self.spec = spec
        self.start_timeout = start_timeout
        self.restarts = 0
        self._fetching: dict[int, tuple[int, int]] = {}  # request -> (job, ranges asked)
        self._updating: set[int] = set()
        self._start()

    def _start(self) -> None:
        mine, theirs = os.pipe(), os.pipe()  # (ours to read, theirs to write) both ways
        # no stdout/stderr of rank 0's: mpiexec waits for every holder of those to exit
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "yoda.link", str(mine[0]), str(theirs[1])],
            pass_fds=(mine[0], theirs[1]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(mine[0])
        os.close(theirs[1])
        for fd in (mine[1], theirs[0]):  # room for whole answers: the child never waits
            _widen(fd)
        self._out = Connection(mine[1], readable=False)
        self._in = Connection(theirs[0], writable=False)
        # Requests go out from a thread: a big request and a big answer crossing in the
        # pipes would otherwise block both sides on a full pipe, each waiting for the other.
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._pump, name="link-sender", daemon=True)
        self._sender.start()
        self._send(self.spec)
        if not self._in.poll(self.start_timeout):
            self._proc.kill()
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, "upstream link did not start")
        first = self._in.recv()
        if first != ("ready",):
            self._proc.wait(5)
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, f"upstream link: {first[1]}")

    def _pump(self) -> None:
        out, box = self._out, self._outbox
        while (msg := box.get()) is not None:
            try:
                out.send(msg)
            except OSError:
                return  # the child is gone: answers() notices and restarts it

    def _send(self, msg: tuple) -> None:
        self._outbox.put(msg)

    def fileno(self) -> int:
        """Readable when an answer is waiting (a loop can sleep on it)."""
        return self._in.fileno()

    def fetch(
        self, req: int, job: int, panda_id: int, jobset_id: int, task_id: int, n: int
    ) -> None:
        self._fetching[req] = (job, n)
        self._send(("fetch", req, job, panda_id, jobset_id, task_id, n))

    def update(self, req: int, batch: ResultBatch, parts: IdParts) -> None:
        self._updating.add(req)
        self._send(("update", req, batch, parts))

    def answers(self, timeout: float = 0.0) -> list[Answer]:
        out: list[Answer] = []
        try:
            while self._in.poll(timeout if not out else 0.0):
                ans = self._in.recv()
                if isinstance(ans, Ranges):
                    self._fetching.pop(ans.req, None)
                elif isinstance(ans, Updated):
                    self._updating.discard(ans.req)
                out.append(ans)
        except (EOFError, OSError):
            out += self._lost()
        return out

    def _lost(self) -> list[Answer]:
        """The child died: what it held is answered as failed, and a new one is started."""
        rc = self._proc.poll()
        log.error("upstream link died (exit %s); starting another", rc)
        failed: list[Answer] = [
            Ranges(req, job, n, error="link died") for req, (job, n) in self._fetching.items()
        ]
        failed += [Updated(req, error="link died") for req in self._updating]
        self._fetching.clear()
        self._updating.clear()
        self._close_pipes()
        self.restarts += 1
        time.sleep(min(5.0, 0.1 * 2**self.restarts))  # bounded: a child that keeps dying
        self._start()
        return failed

    def _close_pipes(self) -> None:
        self._outbox.put(None)
        for conn in (self._out, self._in):
            try:
                conn.close()
            except OSError:
                pass

    def close(self, timeout: float = 10.0) -> None:
        self._send(("stop",))
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._close_pipes()


def _widen(fd: int, size: int = 1 << 20) -> None:
    """Grow a pipe's buffer (Linux; up to /proc/sys/fs/pipe-max-size), best effort."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (AttributeError, OSError):
        pass


def _factory(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m yoda.link <read fd> <write fd>``."""
    argv = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)  # rank 0 decides when the link ends
    tune_gc()
    inbox = Connection(int(argv[0]), writable=False)
    outbox = Connection(int(argv[1]), readable=False)
    spec = inbox.recv()
    sys.path[:0] = spec.get("path", [])
    if spec.get("log"):
        logging.basicConfig(
            filename=spec["log"],
            level=logging.INFO,
            format="%(asctime)s link %(levelname)s %(name)s: %(message)s",
        )
        # SIGUSR2 writes the child's stacks beside its log, as every rank does: a call
        # that hangs is then seen where it hangs
        stacks = open(Path(spec["log"]).with_suffix(".stacks"), "w")  # noqa: SIM115
        faulthandler.register(signal.SIGUSR2, file=stacks, all_threads=True)
    try:
        up = _factory(spec["factory"])(**spec.get("kwargs", {}))
        fetched = Journal(spec["fetched"], sync_every=1 << 30) if spec.get("fetched") else None
    except Exception as exc:  # noqa: BLE001 - whatever it is, rank 0 must hear of it
        outbox.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    outbox.send(("ready",))
    # Results go out before more ranges come in: a droid's results wait in rank 0's
    # memory and journal until the upstream has them, while ranges to come can wait
    # upstream. Rank 0 keeps a few of each on their way; every request is read as it
    # arrives and updates are served first.
    updates: deque[tuple] = deque()
    fetches: deque[tuple] = deque()
    try:
        while True:
            while not (updates or fetches) or inbox.poll(0):
                try:
                    msg = inbox.recv()
                except EOFError:  # rank 0 is gone
                    msg = ("stop",)
                if msg[0] == "stop":
                    _leave(fetched)
                if msg[0] == "update":
                    updates.append(msg)
                elif msg[0] == "fetch":
                    fetches.append(msg)
            if fetched is not None:
                fetched.sync()  # ranges fetched so far are on disk before the next call
            if updates:
                outbox.send(update(up, *updates.popleft()[1:]))
            else:
                outbox.send(fetch(up, *fetches.popleft()[1:], fetched=fetched))
    except BaseException:
        log.exception("upstream link failed")  # rank 0 sees the pipe close and restarts it
        raise


def _leave(fetched: Journal | None) -> NoReturn:
    """Exit at once: rank 0 waits for this process, and tearing down an interpreter
    that held a million ranges takes longer than anything left to do. The fetched
    ranges are with the OS already (each was written as it came), which is what
    ``--resume`` needs if rank 0 died; after a normal stop rank 0 has journaled and
    synced them itself."""
    if fetched is not None:
        fetched.flush()
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    # run the module's own copy, not __main__'s: answers must pickle as yoda.link classes
    from yoda.link import main as _main

    sys.exit(_main())
