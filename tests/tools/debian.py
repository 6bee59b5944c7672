"""Install the Debian packages tests need (bubblewrap ...), once, when possible.

The project's own files must bring what the tests use; a package that cannot
be had (not root, no package access) makes the tests that need it skip with
the reason printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def ensure_tool(tool: str, package: str, timeout: float = 600.0) -> str | None:
    """None when ``tool`` is on PATH (installing ``package`` if needed), else why not."""
    if shutil.which(tool):
        return None
    if os.geteuid() != 0:
        return f"{tool} is missing and installing {package} needs root"
    if not shutil.which("apt-get"):
        return f"{tool} is missing and this machine has no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "install", "-y", "-q", package],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", package],
    ):
        try:
            subprocess.run(cmd, env=env, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"installing {package} timed out"
        if shutil.which(tool):
            return None
    return f"could not install {package} with apt-get"
