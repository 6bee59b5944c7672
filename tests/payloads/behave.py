"""A payload for tests that misbehaves on request: exit codes, signals, forks, outputs.

Usage: python -m tests.payloads.behave ACTION [ARG ...]
  write NAME SIZE      write NAME with SIZE deterministic bytes, exit 0
  exit N [MSG]         print MSG to stderr, exit N
  segv                 kill itself with SIGSEGV
  signal SIGNAME       kill itself with that signal
  forktree MARKER      fork children and a setsid grandchild, write their pids to MARKER, sleep
  sleep S              sleep S seconds
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    action, args = argv[0], argv[1:]
    if action == "write":
        name, size = args[0], int(args[1])
        block = bytes(range(256)) * (size // 256 + 1)
        with open(name, "wb") as fh:
            fh.write(block[:size])
        print(f"wrote {name} {size}")
        return 0
    if action == "exit":
        if len(args) > 1:
            print(" ".join(args[1:]), file=sys.stderr)
        return int(args[0])
    if action == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if action == "signal":
        os.kill(os.getpid(), getattr(signal, args[0]))
        time.sleep(5)
    if action == "forktree":
        marker = args[0]
        sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
        child = subprocess.Popen(sleeper)
        escapee = subprocess.Popen(sleeper, start_new_session=True)
        grand = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(300)']); time.sleep(300)",
            ]
        )
        time.sleep(0.5)
        pids = [os.getpid(), child.pid, escapee.pid, grand.pid]
        with open(marker + ".tmp", "w") as fh:
            fh.write(" ".join(map(str, pids)))
        os.replace(marker + ".tmp", marker)
        time.sleep(300)
        return 0
    if action == "sleep":
        time.sleep(float(args[0]))
        return 0
    print(f"unknown action {action}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
