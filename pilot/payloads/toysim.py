"""A toy detector simulation that speaks the event-service protocol.

It is a real payload, not a stub: it is what the tests, the demo and a new
site's commissioning run, so it must behave like a production event-service
transform in everything the pilot can observe (messages, outputs, CPU use,
crashes), while needing nothing but numpy.

Physics (kept simple, but honest work): every event shoots a Poisson number
of particles with exponential energies into a detector of ``LAYERS`` layers
and ``ETA_BINS`` pseudo-rapidity bins; each layer absorbs a gamma-distributed
fraction of a particle's energy until it falls under a threshold. The energy
deposits are histogrammed per range. An event is seeded by its number and the
input file's GUID, so a range gives the same output bytes wherever and
however often it runs.

Protocol mode (default): toysim is a client of yampl's ``LOCAL`` transport,
as AthenaMP is: a ZeroMQ DEALER with no identity connected to
``ipc:///tmp/zmq_<channel>``, one frame per message. It learns the channel
the way AthenaMP does, from its job options on the command line: a
``--preExec`` (run as Python, as transforms run it) that sets
``jps.AthenaMPFlags.EventRangeChannel`` or ``ConfigFlags.MP.EventRangeChannel``,
or ``--mtes-channel`` inside ``--athenaopts`` when it runs as AthenaMT
(``--CA --multithreaded=true``); the default is ``EventService_EventRanges``.

* payload -> pilot: ``Ready for events``
* pilot -> payload: a JSON list with one range, or ``No more events``
* payload -> pilot: ``<output path>,ID:<eventRangeID>,CPU:<s>,WALL:<s>``
  (``CPU:N/A,WALL:N/A`` as AthenaMT), ``ERR_ATHENAMP_PROCESS <id>: <reason>``,
  or ``ERR_ATHENAMP_PARSE "<range text>": Wrong format``

Ranges are read with AthenaMP's own naive parser (strip ``[{``/``}]``, split
on commas, then on the first colon), so a pilot that sends something
AthenaMP would misread fails here too. As AthenaMT, ``PFN`` is required and
``No more events`` must arrive exactly.

Command mode (``--start/--last/--lfn/--guid/--output``): process one range,
write the output, print the same done line on stdout and exit 0; on an
injected failure print the ``ERR_`` line on stderr and exit 65.

Output format (deterministic bytes, so checksums are reproducible): the magic
``TOYSIM1\\n``, a 4-byte little-endian header length, a JSON header (range,
array names, dtypes, shapes), then the arrays' raw little-endian bytes.
:func:`read_output` reads it back.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import struct
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

LAYERS = 8
ETA_BINS = 20
MAGIC = b"TOYSIM1\n"
DEFAULT_CHANNEL = "EventService_EventRanges"
READY = "Ready for events"
NO_MORE = "No more events"
# How long toysim waits for the pilot's answer before it gives up (AthenaMP
# waits for ever; a toy must stay bounded), and how often it checks that the
# pilot that started it is still there.
REPLY_WAIT = 3600.0
_PARENT_CHECK_MS = 1000
EXIT_RANGE_FAILED = 65
EXIT_CRASH = 3
HOG_STEP = 10 * 2**20  # bytes the injected memory leak adds every 50 ms
HOG_STEPS = 200  # at most 2 GB: the pilot's memory limit stops it long before


class Injected:
    """Failures a test asks for; each fires when its event is in the range."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.crash_substring: str = args.crash_on_range_substring or ""
        self.fail_event: int | None = args.fail_on_event
        self.fatal_event: int | None = args.fatal_on_event
        self.hang_event: int | None = args.hang_on_event
        self.segfault_event: int | None = args.segfault_on_event
        self.hog_event: int | None = args.hog_on_event

    @staticmethod
    def _hit(event: int | None, start: int, last: int) -> bool:
        return event is not None and start <= event <= last

    def before_range(self, range_id: str, start: int, last: int) -> str | None:
        """Crash, hang or segfault now if asked; return an ERR_ message for a failed range."""
        if self.crash_substring and self.crash_substring in range_id:
            sys.stderr.write(f"toysim: injected crash on range {range_id}\n")
            sys.stderr.flush()
            os._exit(EXIT_CRASH)
        if self._hit(self.segfault_event, start, last):
            sys.stderr.write(f"toysim: injected segmentation fault on range {range_id}\n")
            sys.stderr.flush()
            signal.signal(signal.SIGSEGV, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGSEGV)
        if self._hit(self.hog_event, start, last):
            sys.stderr.write(f"toysim: injected memory leak on range {range_id}\n")
            sys.stderr.flush()
            leak = []
            for _ in range(HOG_STEPS):  # bounded: HOG_STEPS x 10 MB, then a hang
                leak.append(np.ones(HOG_STEP // 8))  # written, so it is resident
                time.sleep(0.05)
            for _ in range(100000):
                time.sleep(1.0)
        if self._hit(self.hang_event, start, last):
            sys.stderr.write(f"toysim: injected hang on range {range_id}\n")
            sys.stderr.flush()
            for _ in range(100000):  # bounded: ~28 hours, the pilot kills it long before
                time.sleep(1.0)
        if self._hit(self.fatal_event, start, last):
            return f"ERR_TE_FATAL {range_id}: injected fatal error on event {self.fatal_event}"
        if self._hit(self.fail_event, start, last):
            return (
                f"ERR_ATHENAMP_PROCESS {range_id}: injected failure processing event "
                f"{self.fail_event}"
            )
        return None


def event_seed(event: int, guid: str) -> int:
    digest = hashlib.sha256(f"{guid}:{event}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def simulate_event(event: int, guid: str) -> tuple[np.ndarray, int]:
    """Energy deposits (layers x eta bins, GeV) of one event and its particle count."""
    rng = np.random.default_rng(event_seed(event, guid))
    n = int(rng.poisson(20)) + 1
    energy = rng.exponential(10.0, n)
    eta_bin = np.clip(
        ((rng.uniform(-2.5, 2.5, n) + 2.5) / 5.0 * ETA_BINS).astype(int), 0, ETA_BINS - 1
    )
    deposits = np.zeros((LAYERS, ETA_BINS))
    for layer in range(LAYERS):
        alive = energy > 0.05
        if not alive.any():
            break
        frac = np.clip(rng.gamma(2.0, 0.12, n), 0.0, 1.0)
        dep = np.where(alive, energy * frac, 0.0)
        np.add.at(deposits[layer], eta_bin, dep)
        energy = energy - dep
    return deposits, n


def burn_cpu(seconds: float) -> None:
    """Spend ``seconds`` of CPU on real arithmetic: the configurable cost of an event."""
    if seconds <= 0:
        return
    target = time.process_time() + seconds
    a = np.arange(1, 4097, dtype=np.float64)
    while time.process_time() < target:
        a = np.sqrt(a * a + 1.0)


def simulate_range(start: int, last: int, guid: str, cpu_per_event: float) -> dict[str, np.ndarray]:
    events = np.arange(start, last + 1, dtype=np.int64)
    totals = np.zeros(len(events))
    particles = np.zeros(len(events), dtype=np.int32)
    histogram = np.zeros((LAYERS, ETA_BINS))
    for i, ev in enumerate(events):
        deposits, n = simulate_event(int(ev), guid)
        burn_cpu(cpu_per_event)
        histogram += deposits
        totals[i] = deposits.sum()
        particles[i] = n
    return {
        "events": events,
        "total_deposit": totals,
        "n_particles": particles,
        "histogram": histogram,
    }


def write_output(path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    meta = dict(header)
    meta["arrays"] = [
        {"name": k, "dtype": v.dtype.newbyteorder("<").str, "shape": list(v.shape)}
        for k, v in arrays.items()
    ]
    head = json.dumps(meta, sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        fh.write(MAGIC)
        fh.write(struct.pack("<I", len(head)))
        fh.write(head)
        for v in arrays.values():
            fh.write(np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<")).tobytes())
    os.replace(tmp, path)


def read_output(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a toysim output file back: (header, arrays)."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not a toysim output")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    off = len(MAGIC) + 4
    meta = json.loads(data[off : off + n])
    off += n
    arrays = {}
    for a in meta["arrays"]:
        dt = np.dtype(a["dtype"])
        count = int(np.prod(a["shape"])) if a["shape"] else 1
        arrays[a["name"]] = np.frombuffer(data, dt, count, off).reshape(a["shape"])
        off += count * dt.itemsize
    return meta, arrays


def process_range(
    rng: dict[str, Any], out_dir: Path, cpu_per_event: float, injected: Injected
) -> str:
    """Run one range; the protocol line to send back (done or ERR_)."""
    rid = rng.get("eventRangeID")
    try:
        rid = str(rid)
        start = int(rng["startEvent"])
        last = int(rng["lastEvent"])
        guid = str(rng.get("GUID", ""))
        lfn = str(rng.get("LFN", ""))
    except (KeyError, TypeError, ValueError) as exc:
        return f"ERR_ATHENAMP_PARSE {rid}: bad event range: {exc}"
    if last < start:
        return f"ERR_ATHENAMP_PARSE {rid}: lastEvent {last} < startEvent {start}"
    err = injected.before_range(rid, start, last)
    if err:
        return err
    t0, c0 = time.time(), time.process_time()
    arrays = simulate_range(start, last, guid, cpu_per_event)
    path = out_dir / f"toysim.{rid}.dat"
    header = {"eventRangeID": rid, "startEvent": start, "lastEvent": last, "GUID": guid, "LFN": lfn}
    write_output(path, header, arrays)
    cpu, wall = time.process_time() - c0, time.time() - t0
    return f"{path.resolve()},ID:{rid},CPU:{cpu:.3f},WALL:{wall:.3f}"


def parse_range_message(text: str, *, need_pfn: bool = False) -> dict[str, Any] | str:
    """The range in the pilot's message, read as AthenaMP reads it; or an ERR_ line.

    AthenaMP strips a leading ``[{`` and a trailing ``}]``, splits on commas,
    cuts each pair at its first colon and trims spaces, double quotes and a
    ``u'`` prefix. Toysim does the same, so a value holding a comma, or a
    trailing NUL after the ``}]``, breaks here as it would break there.
    """
    body = text.strip(" ")
    if not (body.startswith("[{") and body.endswith("}]")):
        return f'ERR_ATHENAMP_PARSE "{text}": Wrong format'
    fields: dict[str, str] = {}
    for pair in body[2:-2].split(","):
        key, sep, value = pair.partition(":")
        if not sep:
            return f'ERR_ATHENAMP_PARSE "{text}": Wrong format'
        clean = [part.strip(" ").strip('"').removeprefix("u'").strip("'") for part in (key, value)]
        fields[clean[0]] = clean[1]
    required = ("eventRangeID", "startEvent", "lastEvent") + (("PFN",) if need_pfn else ())
    if any(k not in fields for k in required):
        return f'ERR_ATHENAMP_PARSE "{text}": Wrong format'
    try:
        start, last = int(fields["startEvent"]), int(fields["lastEvent"])
    except ValueError:
        return f'ERR_ATHENAMP_PARSE "{text}": Wrong values of range fields'
    if not fields["eventRangeID"] or last < start or (need_pfn and not fields["PFN"]):
        return f'ERR_ATHENAMP_PARSE "{text}": Wrong values of range fields'
    return {**fields, "startEvent": start, "lastEvent": last}


class _Flags:
    """Just enough of Athena's flag containers for a --preExec to set the channel."""

    def __init__(self) -> None:
        self.EventRangeChannel = DEFAULT_CHANNEL
        self.MP = self
        self.AthenaMPFlags = self


def channel_from_options(args: argparse.Namespace) -> str:
    """The channel the job options name, the way AthenaMP would find it."""
    if args.athenaopts:
        mt = argparse.ArgumentParser(add_help=False)
        mt.add_argument("--mtes", action="store_true")
        mt.add_argument("--mtes-channel", default="")
        known, _ = mt.parse_known_args(shlex.split(args.athenaopts))
        if known.mtes and known.mtes_channel:
            return known.mtes_channel
    flags = _Flags()
    module = types.ModuleType("AthenaMP.AthenaMPFlags")
    module.jobproperties = flags  # type: ignore[attr-defined]
    package = types.ModuleType("AthenaMP")
    package.AthenaMPFlags = module  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("AthenaMP", "AthenaMP.AthenaMPFlags")}
    sys.modules.update({"AthenaMP": package, "AthenaMP.AthenaMPFlags": module})
    try:
        for values in args.preExec or []:
            for code in values:
                try:
                    exec(code, {"ConfigFlags": flags, "flags": flags, "os": os})  # noqa: S102
                except Exception as exc:  # a transform's preExec may need all of Athena
                    sys.stderr.write(f"toysim: --preExec {code!r} not run here: {exc}\n")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return str(flags.EventRangeChannel)


def _orphaned(parent: int) -> bool:
    return os.getppid() != parent


def run_protocol(
    channel: str, out_dir: Path, cpu_per_event: float, injected: Injected, *, mtes: bool = False
) -> int:
    import zmq  # the transport's library; command mode and the physics do not need it

    context = zmq.Context(io_threads=1)
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)  # let the last report leave before the process does
    sock.connect(f"ipc:///tmp/zmq_{channel}")
    parent = os.getppid()

    def receive() -> str | None:
        """The pilot's next message; None if it went away or never answered."""
        for _ in range(int(REPLY_WAIT * 1000 / _PARENT_CHECK_MS)):
            if sock.poll(_PARENT_CHECK_MS, zmq.POLLIN):
                return sock.recv().decode("utf-8", "replace")
            if _orphaned(parent):
                return None
        return None

    n_ranges = 0
    try:
        while True:
            sock.send(READY.encode())
            text = receive()
            if text is None:
                sys.stderr.write("toysim: no answer from the pilot\n")
                return 1
            if (text == NO_MORE) if mtes else (NO_MORE in text):
                break
            msg = parse_range_message(text, need_pfn=mtes)
            if isinstance(msg, str):
                reply = msg
            else:
                reply = process_range(msg, out_dir, cpu_per_event, injected)
                if mtes and not reply.startswith("ERR_"):
                    reply = reply.rsplit(",CPU:", 1)[0] + ",CPU:N/A,WALL:N/A"
            sock.send(reply.encode())
            n_ranges += 1
    finally:
        sock.close()
        context.term()
    print(f"toysim: processed {n_ranges} ranges")
    return 0


def run_command(args: argparse.Namespace, out_dir: Path, injected: Injected) -> int:
    rng = {
        "eventRangeID": args.range_id or f"0-0-0-{args.start}-0",
        "startEvent": args.start,
        "lastEvent": args.last,
        "LFN": args.lfn or "",
        "GUID": args.guid or "",
    }
    line = process_range(rng, out_dir, args.cpu_per_event, injected)
    if line.startswith("ERR_"):
        sys.stderr.write(line + "\n")
        return EXIT_RANGE_FAILED
    path = Path(line.split(",ID:", 1)[0])
    if args.output:
        target = Path(args.output)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        line = f"{target.resolve()}," + line.split(",", 1)[1]
    print(line)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pilot.payloads.toysim", description=__doc__.split("\n")[0]
    )
    a = p.add_argument_group("job options (how AthenaMP learns its channel)")
    a.add_argument("--preExec", nargs="+", action="append", metavar="CODE")
    a.add_argument("--CA", action="store_true", help="ComponentAccumulator configuration")
    a.add_argument("--multithreaded", default="false", help="true: run as AthenaMT (MTES)")
    a.add_argument("--athenaopts", default="", help="options for athena (--mtes-channel)")
    p.add_argument("--cpu-per-event", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--output-dir", default=".", help="where outputs are written (protocol mode)")
    p.add_argument("--crash-on-range-substring", metavar="TEXT")
    p.add_argument("--fail-on-event", type=int, metavar="N", help="report ERR_ATHENAMP_PROCESS")
    p.add_argument("--fatal-on-event", type=int, metavar="N", help="report ERR_TE_FATAL")
    p.add_argument("--hang-on-event", type=int, metavar="N")
    p.add_argument("--segfault-on-event", type=int, metavar="N")
    p.add_argument(
        "--hog-on-event", type=int, metavar="N", help="leak memory (10 MB per 50 ms), then hang"
    )
    g = p.add_argument_group("command mode (one range per process)")
    g.add_argument("--start", type=int)
    g.add_argument("--last", type=int)
    g.add_argument("--lfn")
    g.add_argument("--guid")
    g.add_argument("--output")
    g.add_argument("--range-id")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    injected = Injected(args)
    if args.start is not None or args.last is not None:
        if args.start is None or args.last is None:
            sys.stderr.write("toysim: command mode needs both --start and --last\n")
            return 2
        return run_command(args, out_dir, injected)
    mtes = args.CA and args.multithreaded.lower() == "true"
    return run_protocol(
        channel_from_options(args), out_dir, args.cpu_per_event, injected, mtes=mtes
    )


if __name__ == "__main__":
    sys.exit(main())
