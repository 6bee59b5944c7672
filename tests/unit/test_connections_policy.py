"""Tracer log parsing and connection policy decisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilot.errors import ErrorCode, PilotError
from pilot.monitor.connections import (
    TRACER_LOG,
    Connection,
    ConnectionPolicy,
    ConnectionWatch,
    PolicyMode,
    TracerLog,
    parse_tracer_line,
)


def test_strict_lines_ipv4_and_ipv6() -> None:
    c = parse_tracer_line("1732540000.123 4242 tcp 188.184.21.108:443")
    assert c == Connection("188.184.21.108", 443, "tcp", 4242, 1732540000.123, "tracer")
    c6 = parse_tracer_line("1732540000 7 udp [2001:db8::1]:53")
    assert c6 is not None and c6.remote_ip == "2001:db8::1" and c6.port == 53 and c6.proto == "udp"
    assert c6.endpoint == "[2001:db8::1]:53"


def test_lenient_lines() -> None:
    c = parse_tracer_line("connect(3, {AF_INET, 10.1.2.3, port 8443}) = 0")
    assert c is not None and (c.remote_ip, c.port) == ("10.1.2.3", 8443)
    assert parse_tracer_line("garbage line without endpoint") is None
    assert parse_tracer_line("999.1.1.1:80") is None
    assert parse_tracer_line("1.2.3.4:99999") is None


def test_tracer_log_reads_incrementally_and_counts_garbage(tmp_path: Path) -> None:
    path = tmp_path / TRACER_LOG
    log = TracerLog(path)
    assert log.read_new() == []  # absent file is no connection, not an error
    path.write_bytes(b"1 1 tcp 1.2.3.4:80\nnonsense\n\xff\xfe binary\n1 2 tcp 5.6.7.8:4")
    first = log.read_new()
    assert [c.remote_ip for c in first] == ["1.2.3.4"]
    assert log.unrecognised == 2
    with open(path, "ab") as fh:
        fh.write(b"43\n")
    second = log.read_new()
    assert [(c.remote_ip, c.port) for c in second] == [("5.6.7.8", 443)]
    path.write_text("1 3 tcp 9.9.9.9:1\n")  # replaced by a shorter file
    assert [c.remote_ip for c in log.read_new()] == ["9.9.9.9"]


@pytest.mark.parametrize(
    ("spec", "endpoint", "allowed"),
    [
        ("report", ("8.8.8.8", 53), True),
        ("deny-all", ("127.0.0.1", 80), False),
        ("allow:127.0.0.1", ("127.0.0.1", 80), True),
        ("allow:127.0.0.1", ("127.0.0.2", 80), False),
        ("allow:10.0.0.0/8:443", ("10.9.8.7", 443), True),
        ("allow:10.0.0.0/8:443", ("10.9.8.7", 80), False),
        ("allow:*:53,:123", ("1.1.1.1", 123), True),
        ("allow:[2001:db8::/32]:443", ("2001:db8::5", 443), True),
        ("allow:[2001:db8::/32]:443", ("2001:db9::5", 443), False),
        ("allow:127.0.0.0/8", ("::ffff:127.0.0.1", 80), True),
        ("allow:localhost", ("127.0.0.1", 5), True),
    ],
)
def test_policy_decisions(spec: str, endpoint: tuple[str, int], allowed: bool) -> None:
    policy = ConnectionPolicy.from_spec(spec)
    assert policy.allowed(Connection(*endpoint)) is allowed


def test_bad_policy_specs() -> None:
    for spec in ("block-some", "allow:1.2.3.4:notaport", "allow:[::1", "allow:1.2.3.4:0"):
        with pytest.raises(PilotError) as err:
            ConnectionPolicy.from_spec(spec)
        assert err.value.code == ErrorCode.BADQUEUECONFIGURATION
    assert ConnectionPolicy.from_spec(None).mode is PolicyMode.REPORT


def test_watch_report_and_breach(tmp_path: Path) -> None:
    watch = ConnectionWatch(tmp_path, ConnectionPolicy.from_spec("allow:127.0.0.0/8"))
    watch.add(Connection("127.0.0.1", 80, pid=5))
    assert watch.breach() is None
    watch.add(Connection("192.0.2.1", 443, pid=6, source="tracer"))
    watch.add(Connection("192.0.2.1", 443, pid=7))
    err = watch.breach()
    assert err is not None and err.code == ErrorCode.GENERALERROR and "192.0.2.1:443" in err.detail
    report = watch.report()
    assert "2 endpoint(s)" in report and "DENIED" in report and "x2" in report
    assert ConnectionWatch(tmp_path).report() == ""
