"""Messages between Yoda (rank 0) and the Droids, over MPI or in one process.

Every message is an :class:`Envelope` ``(kind, seq, epoch, body)``. ``seq``
numbers a sender's messages so that an ACK can say "everything up to here is
journaled"; ``epoch`` is Yoda's incarnation (it grows on ``--resume``) so a
late message from a previous life is recognised and dropped.

Kinds travel on one MPI tag per *class* (control, work, results, heartbeat)
and :meth:`Transport.recv` looks at control first, so a STOP or DRAIN is
never queued behind a thousand UPDATEs.

Waiting never spins: the MPI transport probes, and when nothing is there it
sleeps with an exponential backoff that resets on activity (the same idea as
``mpi4py.futures``' backoff). On an oversubscribed node a spinning rank would
steal the CPU of the payload it is supposed to serve.

Dead ranks: under Open MPI's ULFM (``mpiexec --with-ft ulfm``) a probe fails
with ``MPI_ERR_PROC_FAILED``; the transport then acknowledges the failure
(``Comm.Ack_failed``), learns who died (``Comm.Get_failed``) and hands each
dead rank to the caller once as a :class:`PeerFailed` event. Without ULFM the
runtime tears the job down instead and ``--resume`` is the recovery.
"""

from __future__ import annotations

import collections
import select
import threading
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol, Union


class Kind(IntEnum):
    """Message kinds of docs/DESIGN.md ("Yoda-Droid over MPI")."""

    HELLO = 1  # droid -> yoda: node, cores, capabilities
    CONFIG = 2  # yoda -> droid: job definitions
    WORK_REQ = 3  # droid -> yoda: how many ranges it wants
    WORK = 4  # yoda -> droid: a batch of leased ranges, or no_more
    UPDATE = 5  # droid -> yoda: a batch of range results
    ACK = 6  # yoda -> droid: results up to seq are journaled
    HB = 7  # droid -> yoda: heartbeat with node metrics
    DRAIN = 8  # yoda -> droid: finish current ranges by a time, take no new ones
    BYE = 9  # droid -> yoda: all done, outputs flushed
    STOP = 10  # yoda -> droid: exit now


class Tag(IntEnum):
    """One MPI tag per message class; lower value = looked at first."""

    CONTROL = 11
    WORK = 12
    RESULT = 13
    HEARTBEAT = 14


TAG_OF: dict[Kind, Tag] = {
    Kind.HELLO: Tag.CONTROL,
    Kind.CONFIG: Tag.CONTROL,
    Kind.DRAIN: Tag.CONTROL,
    Kind.BYE: Tag.CONTROL,
    Kind.STOP: Tag.CONTROL,
    Kind.WORK_REQ: Tag.WORK,
    Kind.WORK: Tag.WORK,
    Kind.UPDATE: Tag.RESULT,
    Kind.ACK: Tag.RESULT,
    Kind.HB: Tag.HEARTBEAT,
}
TAG_ORDER: tuple[Tag, ...] = tuple(sorted(Tag))


@dataclass
class Envelope:
    """One message. ``source`` is filled in by the receiving transport."""

    kind: Kind
    seq: int = 0
    epoch: int = 0
    body: Any = None
    source: int = -1

    def wire(self) -> tuple[int, int, int, Any]:
        return (int(self.kind), self.seq, self.epoch, self.body)

    @classmethod
    def from_wire(cls, obj: Any, source: int) -> Envelope | None:
        """Rebuild an envelope; None for garbage (logged and dropped by the caller)."""
        if not isinstance(obj, tuple) or len(obj) != 4:
            return None
        kind, seq, epoch, body = obj
        try:
            kind = Kind(kind)
        except ValueError:
            return None
        if not isinstance(seq, int) or not isinstance(epoch, int):
            return None
        return cls(kind, seq, epoch, body, source)


@dataclass(frozen=True)
class PeerFailed:
    """A rank is known dead (ULFM, or an in-process simulated failure)."""

    rank: int


Incoming = Union[Envelope, PeerFailed]


class Transport(Protocol):
    """What Yoda and Droid need from a transport, and nothing more."""

    rank: int
    size: int

    def send(self, dest: int, env: Envelope) -> None:
        """Queue ``env`` for ``dest``; never blocks on the receiver."""
        ...

    def recv(self, timeout: float) -> Incoming | None:
        """Next message or failure event, control first; None after ``timeout`` seconds."""
        ...

    def probe(self) -> bool:
        """True if a message is waiting (does not consume it)."""
        ...

    def close(self) -> None: ...


@dataclass
class Backoff:
    """Sleep between empty probes: short after activity, growing to ``maximum``.

    ``maximum`` bounds both the latency added to a quiet link and the wakeups
    per second of an idle rank (20/s at 50 ms, a negligible cost).
    """

    minimum: float = 0.0001
    maximum: float = 0.05
    factor: float = 2.0
    current: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.current = self.minimum

    def reset(self) -> None:
        self.current = self.minimum

    def sleep(self, limit: float, wake: Any = None) -> bool:
        """Sleep; with ``wake`` (anything with a ``fileno()``), return early when it has
        something to read. True if woken that way (activity: the backoff resets)."""
        t = max(0.0, min(self.current, limit))
        if wake is not None and select.select([wake], [], [], t)[0]:
            self.reset()
            return True
        if wake is None:
            time.sleep(t)
        self.current = min(self.maximum, self.current * self.factor)
        return False


class MPITransport:
    """The transport over an mpi4py communicator (COMM_WORLD by default)."""

    def __init__(self, comm: Any = None, *, max_sleep: float = 0.05) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        # Errors come back as exceptions instead of aborting every rank; that is
        # what lets ULFM report a dead peer instead of killing the allocation.
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self.backoff = Backoff(maximum=max_sleep)
        # another source of work (e.g. rank 0's upstream link): recv returns None as soon
        # as it is readable, instead of sleeping through its answer
        self.wake: Any = None
        self._pending: list[Any] = []  # isend requests not yet complete
        self._dead: set[int] = set()
        self._events: collections.deque[PeerFailed] = collections.deque()
        self._status = MPI.Status()
        self.sent = 0
        self.received = 0

    @property
    def dead(self) -> frozenset[int]:
        return frozenset(self._dead)

    def send(self, dest: int, env: Envelope) -> None:
        if dest in self._dead:
            return
        try:
            req = self.comm.isend(env.wire(), dest=dest, tag=int(TAG_OF[env.kind]))
        except self._mpi.Exception as exc:
            self._on_error(exc)
            return
        self._pending.append(req)
        self.sent += 1
        self._complete_sends()

    def _complete_sends(self) -> None:
        if not self._pending:
            return
        still = []
        for req in self._pending:
            try:
                done = req.Test()
            except self._mpi.Exception as exc:
                self._on_error(exc)
                done = True  # a send to a dead rank will never complete
            if not done:
                still.append(req)
        self._pending = still

    def _on_error(self, exc: Any) -> None:
        MPI = self._mpi
        cls = exc.Get_error_class()
        failed_classes = {MPI.ERR_PROC_FAILED, getattr(MPI, "ERR_PROC_FAILED_PENDING", -1)}
        if cls not in failed_classes:
            raise exc
        self._learn_failed()

    def _learn_failed(self) -> None:
        MPI = self._mpi
        try:
            self.comm.Ack_failed()
            group = self.comm.Get_failed()
        except (MPI.Exception, NotImplementedError, AttributeError):
            return
        try:
            n = group.Get_size()
            ranks = MPI.Group.Translate_ranks(group, list(range(n)), self.comm.Get_group())
        finally:
            group.Free()
        for rank in ranks:
            if rank not in self._dead and rank != MPI.UNDEFINED:
                self._dead.add(rank)
                self._events.append(PeerFailed(rank))

    def _try_recv(self) -> Incoming | None:
        if self._events:
            return self._events.popleft()
        MPI = self._mpi
        for tag in TAG_ORDER:
            try:
                if not self.comm.Iprobe(MPI.ANY_SOURCE, int(tag), self._status):
                    continue
                source = self._status.Get_source()
                obj = self.comm.recv(source=source, tag=int(tag))
            except MPI.Exception as exc:
                self._on_error(exc)
                return self._events.popleft() if self._events else None
            self.received += 1
            env = Envelope.from_wire(obj, source)
            if env is not None:
                return env
        return None

    def recv(self, timeout: float) -> Incoming | None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            self._complete_sends()
            got = self._try_recv()
            if got is not None:
                self.backoff.reset()
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.backoff.sleep(left, self.wake):
                return None

    def probe(self) -> bool:
        MPI = self._mpi
        if self._events:
            return True
        for tag in TAG_ORDER:
            try:
                if self.comm.Iprobe(MPI.ANY_SOURCE, int(tag)):
                    return True
            except MPI.Exception as exc:
                self._on_error(exc)
                return bool(self._events)
        return False

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (with backoff) until queued sends completed; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            self._complete_sends()
            if self._pending:
                self.backoff.sleep(deadline - time.monotonic())
        return not self._pending

    def close(self) -> None:
        self.flush(2.0)
        for req in self._pending:
            try:
                req.Cancel()
            except self._mpi.Exception:
                pass
        self._pending = []


class LocalHub:
    """In-process "world" of ``size`` ranks for unit tests and the scale simulator.

    Each rank has one deque per tag class; :meth:`kill` simulates a dead rank:
    its messages vanish and every other rank is told with :class:`PeerFailed`.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._cond: dict[int, threading.Condition] = {}
        self._boxes: dict[int, dict[Tag, collections.deque[Envelope]]] = {}
        self._events: dict[int, collections.deque[PeerFailed]] = {}
        self.dead: set[int] = set()
        self._told: set[int] = set()

    def endpoint(self, rank: int) -> LocalTransport:
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} not in 0..{self.size - 1}")
        return LocalTransport(self, rank)

    def _box(self, rank: int) -> dict[Tag, collections.deque[Envelope]]:
        box = self._boxes.get(rank)
        if box is None:
            box = {tag: collections.deque() for tag in TAG_ORDER}
            self._boxes[rank] = box
            self._cond[rank] = threading.Condition(self._lock)
            self._events[rank] = collections.deque()
        return box

    def deliver(self, dest: int, env: Envelope) -> None:
        with self._lock:
            if dest in self.dead or env.source in self.dead:
                return
            self._box(dest)[TAG_OF[env.kind]].append(env)
            self._cond[dest].notify()

    def kill(self, rank: int) -> None:
        with self._lock:
            if rank in self.dead:
                return
            self.dead.add(rank)
            self._boxes.pop(rank, None)
            for other in list(self._boxes):
                self._events[other].append(PeerFailed(rank))
                self._cond[other].notify()

    def take(self, rank: int, timeout: float) -> Incoming | None:
        with self._lock:
            if rank in self.dead:  # a killed rank is cut off: it learns that once
                if rank not in self._told:
                    self._told.add(rank)
                    return PeerFailed(0)
                self._cond.setdefault(rank, threading.Condition(self._lock)).wait(timeout)
                return None
            box = self._box(rank)
            cond = self._cond[rank]
            events = self._events[rank]
            deadline = time.monotonic() + max(0.0, timeout)
            while True:
                if events:
                    return events.popleft()
                for tag in TAG_ORDER:
                    if box[tag]:
                        return box[tag].popleft()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                cond.wait(left)

    def pending(self, rank: int) -> bool:
        with self._lock:
            box = self._box(rank)
            return bool(self._events[rank]) or any(box[tag] for tag in TAG_ORDER)


class LocalTransport:
    """One rank's view of a :class:`LocalHub`."""

    def __init__(self, hub: LocalHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.size = hub.size
        self.sent = 0
        self.received = 0

    def send(self, dest: int, env: Envelope) -> None:
        self.sent += 1
        self.hub.deliver(dest, Envelope(env.kind, env.seq, env.epoch, env.body, self.rank))

    def recv(self, timeout: float) -> Incoming | None:
        got = self.hub.take(self.rank, timeout)
        if got is not None:
            self.received += 1
        return got

    def probe(self) -> bool:
        return self.hub.pending(self.rank)

    def flush(self, timeout: float = 0.0) -> bool:
        return True

    def close(self) -> None:
        pass
