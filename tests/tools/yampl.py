"""The real yampl library, built from ``../shared/tools/yampl`` when it is there.

yampl is not on a package registry; the shared tools carry its source and a
build script (Debian's libzmq, cmake, pybind11). The build is kept under
/tmp between test runs. Where the tool or root is missing, the tests that
need it skip and say why.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO.parent / "shared" / "tools" / "yampl" / "build.sh"
PREFIX = Path(f"/tmp/pilot-tests-yampl-{os.getuid()}")


def yampl_env() -> tuple[dict[str, str] | None, str]:
    """(environment in which ``import yampl`` is the real binding, "") or (None, why not)."""
    if not BUILD.is_file():
        return None, f"no yampl build script at {BUILD} (the shared tools are absent)"
    binding = list((PREFIX / "python").glob("yampl*.so"))
    if not binding:
        if os.geteuid() != 0:
            return None, "building yampl installs Debian packages, which needs root"
        work = PREFIX.with_name(PREFIX.name + "-work")
        env = {**os.environ, "PREFIX": str(PREFIX), "YAMPL_WORK": str(work)}
        try:
            proc = subprocess.run(
                ["bash", str(BUILD)], env=env, capture_output=True, text=True, timeout=1200
            )
        except subprocess.TimeoutExpired:
            return None, "building yampl timed out"
        binding = list((PREFIX / "python").glob("yampl*.so"))
        if proc.returncode != 0 or not binding:
            tail = (proc.stderr or proc.stdout)[-600:]
            return None, f"yampl did not build: {tail}"
    env = dict(os.environ)
    env["YAMPL_INSTALL_PREFIX"] = str(PREFIX)
    env["LD_LIBRARY_PATH"] = ":".join(
        p for p in (str(PREFIX / "lib" / "yampl"), env.get("LD_LIBRARY_PATH", "")) if p
    )
    env["PYTHONPATH"] = ":".join(
        p for p in (str(PREFIX / "python"), str(REPO), env.get("PYTHONPATH", "")) if p
    )
    return env, ""
