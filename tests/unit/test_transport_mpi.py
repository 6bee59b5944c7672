"""The mpi4py transport in a singleton MPI process (no mpiexec): tags, priority, garbage.

Run in a child process: initialising MPI inside pytest would make every later
fork of the test session a fork of an MPI process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mpi4py")

SCRIPT = textwrap.dedent(
    """
    from hpc.transport import Backoff, Envelope, Kind, MPITransport
    t = MPITransport(max_sleep=0.01)
    assert (t.rank, t.size) == (0, 1)
    for kind in (Kind.UPDATE, Kind.HB, Kind.WORK, Kind.STOP):
        t.send(0, Envelope(kind, 7, 3, {"k": kind.name}))
    got = [t.recv(5.0) for _ in range(4)]
    assert [g.kind for g in got] == [Kind.STOP, Kind.WORK, Kind.UPDATE, Kind.HB], got
    assert all(g.source == 0 and g.seq == 7 and g.epoch == 3 for g in got)
    assert t.recv(0.05) is None and not t.probe()
    t.comm.send("garbage", dest=0, tag=11)
    t.comm.send((99, 0, 0, None), dest=0, tag=11)
    assert t.recv(0.2) is None
    b = Backoff(minimum=0.001, maximum=0.004)
    b.sleep(1.0); b.sleep(1.0); b.sleep(1.0)
    assert b.current == 0.004
    b.reset()
    assert b.current == 0.001
    assert t.flush(1.0)
    t.close()
    print("ok")
    """
)


def test_mpi_transport_in_a_singleton_process():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
