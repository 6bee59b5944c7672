"""The payload's outbound connections: seen, reported, and judged by a policy.

Two sources, because each misses what the other sees:

- the tracer's ``pandatracerlog.txt`` in the work directory catches every
  ``connect()``, even one that lasted a millisecond, but only when the payload
  runs under a tracer;
- psutil sampling of the payload tree's sockets needs no cooperation from the
  payload, but sees only connections open at the moment of a sample.

Tracer log format (one connection per line, written by
:mod:`pilot.monitor.pytracer` and readable by any tracer that follows it)::

    <epoch> <pid> <proto> <remote_ip>:<port>
    1732540000.123 4242 tcp 188.184.21.108:443
    1732540000.456 4242 tcp [2001:db8::1]:443

Readers are lenient: a line in another layout that holds an ``ip:port`` is
taken for what it says; anything else is counted and skipped, never fatal.

Policy and the code it fails a job with: PanDA has no error code for "the
payload connected where it must not"; the incumbent only reports. When a
site asks to fail such jobs the pilot uses 1008 GENERALERROR with a
diagnostic naming the connection, rather than a code that would send
operators the wrong way (1344 RESOURCEUNAVAILABLE blames the site, 1305/1310
blame the payload's execution, 1327 UNREACHABLENETWORK says the opposite).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import psutil

from pilot.errors import ErrorCode, PilotError

TRACER_LOG = "pandatracerlog.txt"
POLICY_CODE = ErrorCode.GENERALERROR
# The payload tree's sockets are looked at far more often than the rest is sampled:
# a connection lives seconds, and reading a process's sockets costs ~30 us of CPU.
# Listing the tree scans all of /proc (~3 ms), so that is done every TREE_EVERY looks
# and the processes known are read in between (a new child's sockets wait at most
# that long; the tracer sees its connects).
CONNECTION_INTERVAL = 1.0
TREE_EVERY = 5

_STRICT = re.compile(
    r"^\s*(?P<t>\d+(?:\.\d+)?)\s+(?P<pid>\d+)\s+(?P<proto>[a-zA-Z0-9]+)\s+"
    r"(?:\[(?P<ip6>[0-9a-fA-F:.%a-z]+)\]|(?P<ip4>[0-9.]+)):(?P<port>\d+)\s*$"
)
_LOOSE = re.compile(
    r"(?:\[(?P<ip6>[0-9a-fA-F:.]+)\]|(?P<ip4>\d{1,3}(?:\.\d{1,3}){3}))[:\s,/]+(?:port\s*)?(?P<port>\d{1,5})\b"
)


@dataclass(frozen=True)
class Connection:
    """One remote endpoint the payload connected to."""

    remote_ip: str
    port: int
    proto: str = "tcp"
    pid: int = 0
    time: float = 0.0
    source: str = "psutil"  # or "tracer"

    @property
    def endpoint(self) -> str:
        return (
            f"[{self.remote_ip}]:{self.port}"
            if ":" in self.remote_ip
            else f"{self.remote_ip}:{self.port}"
        )


# -- tracer log ----------------------------------------------------------------


def parse_tracer_line(line: str) -> Connection | None:
    """One line of the tracer log; ``None`` when nothing in it names an endpoint."""
    m = _STRICT.match(line)
    if m:
        ip = m.group("ip6") or m.group("ip4")
        if _valid_ip(ip):
            return Connection(
                ip, int(m.group("port")), m.group("proto").lower(), int(m.group("pid")),
                float(m.group("t")), "tracer",
            )  # fmt: skip
    m = _LOOSE.search(line)
    if m:
        ip = m.group("ip6") or m.group("ip4")
        port = int(m.group("port"))
        if _valid_ip(ip) and 0 < port < 65536:
            proto = "udp" if re.search(r"\budp\b", line, re.I) else "tcp"
            return Connection(ip, port, proto, 0, 0.0, "tracer")
    return None


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


class TracerLog:
    """Reads the tracer log incrementally (the payload keeps appending to it)."""

    def __init__(self, path: str | Path, max_read: int = 1 << 20) -> None:
        self.path = Path(path)
        self.offset = 0
        self.unrecognised = 0
        self._max_read = max_read
        self._partial = b""

    def read_new(self) -> list[Connection]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                if size < self.offset:  # truncated or replaced: start again
                    self.offset, self._partial = 0, b""
                fh.seek(self.offset)
                data = fh.read(self._max_read)
        except OSError:
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for its end
        found = []
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line or line.startswith("#"):
                continue
            conn = parse_tracer_line(line)
            if conn is None:
                self.unrecognised += 1
            else:
                found.append(conn)
        return found


# -- psutil sampling -------------------------------------------------------------


def sample_sockets(procs: Iterable[psutil.Process], now: float | None = None) -> list[Connection]:
    """Remote endpoints of the inet sockets the processes hold open now."""
    now = time.time() if now is None else now
    found = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if not c.raddr:
                continue  # listening or unconnected: not outbound
            proto = "udp" if c.type == socket.SOCK_DGRAM else "tcp"
            found.append(Connection(c.raddr.ip, c.raddr.port, proto, proc.pid, now, "psutil"))
    return found


# -- policy ----------------------------------------------------------------------


class PolicyMode(str, Enum):
    REPORT = "report"
    DENY_ALL = "deny-all"
    ALLOW_LIST = "allow-list"


@dataclass(frozen=True)
class AllowRule:
    """A network (a host is a /32 or /128) and a port; either may be a wildcard."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None
    text: str

    def matches(self, conn: Connection) -> bool:
        if self.port is not None and conn.port != self.port:
            return False
        if self.network is None:
            return True
        try:
            ip = ipaddress.ip_address(conn.remote_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.version == self.network.version and ip in self.network


@dataclass
class ConnectionPolicy:
    """Report only, deny every connection, or allow only listed hosts/networks/ports.

    Spec strings (for the CLI and the queue description):
    ``report``, ``deny-all``, or ``allow:<rule>,<rule>,...`` where a rule is
    ``host``, ``host:port``, ``10.0.0.0/8``, ``10.0.0.0/8:443``, ``[2001:db8::/32]:443``
    or ``*:53`` / ``:53`` (a port anywhere). Host names are resolved once,
    when the policy is built.
    """

    mode: PolicyMode = PolicyMode.REPORT
    allow: list[AllowRule] = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: str | None) -> ConnectionPolicy:
        spec = (spec or "report").strip()
        if spec in ("", "report", "none"):
            return cls(PolicyMode.REPORT)
        if spec in ("deny-all", "deny"):
            return cls(PolicyMode.DENY_ALL)
        if spec.startswith("allow:") or spec.startswith("allow-list:"):
            body = spec.split(":", 1)[1]
            rules = [parse_rule(item) for item in body.split(",") if item.strip()]
            return cls(PolicyMode.ALLOW_LIST, [r for rs in rules for r in rs])
        raise PilotError(
            ErrorCode.BADQUEUECONFIGURATION,
            f"connection policy {spec!r}: expected report, deny-all or allow:<rules>",
        )

    @property
    def enforcing(self) -> bool:
        return self.mode is not PolicyMode.REPORT

    @property
    def denies_all(self) -> bool:
        return self.mode is PolicyMode.DENY_ALL

    def allowed(self, conn: Connection) -> bool:
        if self.mode is PolicyMode.REPORT:
            return True
        if self.mode is PolicyMode.DENY_ALL:
            return False
        return any(rule.matches(conn) for rule in self.allow)

    def describe(self) -> str:
        if self.mode is PolicyMode.ALLOW_LIST:
            return "allow:" + ",".join(r.text for r in self.allow)
        return self.mode.value


def connection_policy(config: Any) -> ConnectionPolicy:
    """The policy a pilot's configuration asks for: its own, else its queue's, else report."""
    queue = getattr(config, "queue", None) or {}
    return ConnectionPolicy.from_spec(
        getattr(config, "connection_policy", None) or queue.get("connection_policy")
    )


def network_isolated(config: Any, policy: ConnectionPolicy) -> bool:
    """True when the payload gets no network at all: a container under deny-all."""
    return getattr(config, "container", None) is not None and policy.denies_all


def parse_rule(text: str) -> list[AllowRule]:
    """One allow-list entry; a host name becomes one rule per address it resolves to."""
    item = text.strip()
    host, port = item, None
    if item.startswith("["):
        end = item.find("]")
        if end < 0:
            raise PilotError(ErrorCode.BADQUEUECONFIGURATION, f"bad allow rule {text!r}")
        host, rest = item[1:end], item[end + 1 :]
        port = _port(rest[1:], text) if rest.startswith(":") else None
    elif item.count(":") == 1:
        host, port_text = item.split(":")
        port = _port(port_text, text)
    if host in ("", "*"):
        return [AllowRule(None, port, item)]
    try:
        return [AllowRule(ipaddress.ip_network(host, strict=False), port, item)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise PilotError(
            ErrorCode.BADQUEUECONFIGURATION, f"allow rule {text!r}: cannot resolve {host}: {exc}"
        ) from None
    addrs = sorted({info[4][0] for info in infos})
    return [AllowRule(ipaddress.ip_network(a), port, item) for a in addrs]


def _port(text: str, rule: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise PilotError(
            ErrorCode.BADQUEUECONFIGURATION, f"bad port in allow rule {rule!r}"
        ) from None
    if not 0 < port < 65536:
        raise PilotError(ErrorCode.BADQUEUECONFIGURATION, f"bad port in allow rule {rule!r}")
    return port


# -- ledger and report -------------------------------------------------------------


@dataclass
class _Seen:
    first: Connection
    count: int = 1
    sources: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)


class ConnectionWatch:
    """Collects connections from both sources, judges them, and writes the report."""

    def __init__(
        self,
        workdir: str | Path,
        policy: ConnectionPolicy | None = None,
        *,
        isolated: bool = False,
    ) -> None:
        self.policy = policy or ConnectionPolicy()
        # The payload runs in a network namespace of its own: what it tries cannot leave,
        # so an attempt is reported as blocked, not held against the job.
        self.isolated = isolated
        self.tracer = TracerLog(Path(workdir) / TRACER_LOG)
        self.seen: dict[tuple[str, int, str], _Seen] = {}
        self.violation: Connection | None = None
        self._looks = 0
        self._tree: list[psutil.Process] = []

    def look(self, payload: Any, now: float | None = None) -> PilotError | None:
        """One look at a payload (anything with ``processes()``): its tree's sockets and
        the tracer's log; the tree itself is listed again every ``TREE_EVERY`` looks."""
        self._looks += 1
        if self._looks % TREE_EVERY == 1 or not self._tree:
            self._tree = payload.processes() if payload is not None else []
        return self.update(self._tree, now)

    def update(
        self, procs: Iterable[psutil.Process], now: float | None = None
    ) -> PilotError | None:
        """Read the tracer log and the sockets; the first disallowed connection, as an error."""
        new = self.tracer.read_new() + sample_sockets(procs, now)
        for conn in new:
            self.add(conn)
        return self.breach()

    def add(self, conn: Connection) -> None:
        key = (conn.remote_ip, conn.port, conn.proto)
        seen = self.seen.get(key)
        if seen is None:
            seen = self.seen[key] = _Seen(conn)
        else:
            seen.count += 1
        seen.sources.add(conn.source)
        if conn.pid:
            seen.pids.add(conn.pid)
        if self.violation is None and not self.policy.allowed(conn):
            self.violation = conn

    def breach(self) -> PilotError | None:
        if self.violation is None or not self.policy.enforcing or self.isolated:
            return None
        c = self.violation
        return PilotError(
            POLICY_CODE,
            f"outbound connection to {c.endpoint}/{c.proto} (pid {c.pid or '?'}, seen by "
            f"{c.source}) not allowed by connection policy {self.policy.describe()}",
        )

    def report(self, max_lines: int = 10) -> str:
        """A few lines for the log extracts; empty when the payload made no connection."""
        if not self.seen and not self.tracer.unrecognised:
            return ""
        where = ", no network in the container" if self.isolated else ""
        lines = [
            f"outbound connections: {len(self.seen)} endpoint(s), "
            f"policy {self.policy.describe()}{where}"
        ]
        denied = "blocked" if self.isolated else "DENIED"
        for (_ip, _port, proto), s in list(self.seen.items())[:max_lines]:
            verdict = "allowed" if self.policy.allowed(s.first) else denied
            pids = ",".join(str(p) for p in sorted(s.pids)[:3]) or "?"
            lines.append(
                f"  {s.first.endpoint}/{proto} x{s.count} pid {pids} via {'+'.join(sorted(s.sources))} {verdict}"
            )
        if len(self.seen) > max_lines:
            lines.append(f"  ... {len(self.seen) - max_lines} more")
        if self.tracer.unrecognised:
            lines.append(f"  {self.tracer.unrecognised} unrecognised line(s) in {TRACER_LOG}")
        return "\n".join(lines)
