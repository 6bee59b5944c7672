"""Start-up hook that records a Python payload's socket connections.

Loaded by Python itself when this directory is on ``PYTHONPATH``. Tracing
must never break the payload: every failure to write is ignored. A
``sitecustomize`` that the site or the environment already had is loaded
after this one, so installing the tracer takes nothing away.

Written in the subset of Python that Python 2.7 and every Python 3 read: the
tracer is on by default, and an old release's interpreter must neither choke
on it nor lose the site's own ``sitecustomize`` behind it.
"""

import os
import socket
import sys
import time


def _install(path):
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def record(sock, address):
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        try:
            host, port = address[0], address[1]
            proto = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
            shown = "[{}]".format(host) if ":" in str(host) else str(host)
            line = "{:.3f} {} {} {}:{}\n".format(time.time(), os.getpid(), proto, shown, int(port))
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8", errors="replace"))
            finally:
                os.close(fd)
        except (OSError, TypeError, ValueError, IndexError):
            pass

    def connect(self, address):
        record(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        record(self, address)
        return real_connect_ex(self, address)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex


def _chain():
    """Import the ``sitecustomize`` this one shadows, if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = list(sys.path)
    mine = sys.modules.pop("sitecustomize", None)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        import importlib

        try:
            importlib.import_module("sitecustomize")
        except ImportError:
            pass
    finally:
        sys.path[:] = saved
        if mine is not None:
            sys.modules["sitecustomize"] = mine


_log = os.environ.get("PANDA_TRACER_LOG")
if _log:
    _install(_log)
_chain()
