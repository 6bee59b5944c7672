"""User containers: wrap the payload command in bubblewrap or apptainer.

PanDA's queue description says which runtime a site has (``container_type``,
e.g. ``apptainer:pilot`` or ``bwrap:user``; the part after the colon says
who runs it, and only the payload is wrapped here) and extra options
(``container_options``); a job names its image in ``container_name``. The
wrapper is built as an argv list, never a shell string, so an image name
or a work directory with odd characters cannot change the command.

bubblewrap needs no daemon and no setuid helper when run as root or with
user namespaces, which makes it the runtime the tests use; apptainer is the
grid's, and its command line is built the same way.
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError

RUNTIMES = ("bwrap", "apptainer", "singularity")


@dataclass(frozen=True)
class ContainerSpec:
    """How to wrap a payload: the runtime, the image, binds and network policy."""

    runtime: str
    image: str = ""  # a root-fs directory (bwrap), a .sif or docker:// URL (apptainer); "" = host
    options: tuple[str, ...] = ()
    binds: tuple[str, ...] = ()
    network: bool = True
    env: dict[str, str] = field(default_factory=dict)
    # read-only binds (the pilot's connection tracer), and host paths the payload must
    # not see (the pilot's own credentials): each is covered by an empty file or directory
    ro_binds: tuple[str, ...] = ()
    hide: tuple[str, ...] = ()

    @classmethod
    def from_queue(
        cls, queue: dict[str, Any], image: str = "", *, network: bool = True
    ) -> ContainerSpec | None:
        """None when the queue runs payloads without a container."""
        kind = str(queue.get("container_type") or "").strip()
        if not kind:
            return None
        # "apptainer:pilot", or "singularity:pilot;docker:wrapper" on some queues
        for part in kind.split(";"):
            runtime, _, who = part.partition(":")
            runtime = runtime.strip().lower()
            if runtime in RUNTIMES and who.strip().lower() in ("", "pilot", "user", "payload"):
                opts = tuple(shlex.split(str(queue.get("container_options") or "")))
                return cls(runtime=runtime, image=image, options=opts, network=network)
        return None


def _runtime_path(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if name == "bwrap":
            raise PilotError(
                ErrorCode.SINGULARITYNOTINSTALLED, "bubblewrap (bwrap) is not installed"
            )
        raise PilotError(ErrorCode.APPTAINERNOTINSTALLED, f"{name} is not installed")
    return path


def wrap(
    command: str, workdir: Path, spec: ContainerSpec, *, runtime_path: str | None = None
) -> list[str]:
    """The argv that runs ``command`` (a shell string) inside the container, in ``workdir``."""
    workdir = Path(workdir).resolve()
    if spec.runtime == "bwrap":
        return _bwrap(command, workdir, spec, runtime_path or _runtime_path("bwrap"))
    if spec.runtime in ("apptainer", "singularity"):
        return _apptainer(command, workdir, spec, runtime_path or _runtime_path(spec.runtime))
    raise PilotError(
        ErrorCode.SINGULARITYGENERALFAILURE, f"unknown container runtime {spec.runtime!r}"
    )


def _hidden(spec: ContainerSpec) -> list[Path]:
    """The paths to hide that exist (a missing one needs no cover)."""
    return [Path(p) for p in spec.hide if Path(p).exists()]


def _bwrap(command: str, workdir: Path, spec: ContainerSpec, exe: str) -> list[str]:
    if spec.image:
        root = Path(spec.image)
        if not root.is_dir():
            raise PilotError(
                ErrorCode.IMAGENOTFOUND, f"bubblewrap image {spec.image} is not a directory"
            )
        argv = [exe, "--ro-bind", str(root), "/"]
    else:
        argv = [exe, "--ro-bind", "/", "/"]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    if spec.image:
        argv += ["--tmpfs", "/tmp"]
    else:
        # The host's /tmp stays visible (read-only): software may live there,
        # a virtual environment for one. Scratch goes to the work directory.
        scratch = workdir / ".tmp"
        scratch.mkdir(exist_ok=True)
        argv += ["--setenv", "TMPDIR", str(scratch)]
    argv += ["--bind", str(workdir), str(workdir)]
    for bind in spec.binds:
        src, _, dest = bind.partition(":")
        argv += ["--bind", src, dest or src]
    for bind in spec.ro_binds:
        src, _, dest = bind.partition(":")
        argv += ["--ro-bind", src, dest or src]
    for path in [] if spec.image else _hidden(spec):  # an image holds no host files
        # an empty directory or /dev/null over it: the path exists, its contents do not
        argv += ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", "/dev/null", str(path)]
    argv += ["--unshare-pid", "--unshare-ipc", "--die-with-parent", "--new-session"]
    if not spec.network:
        argv.append("--unshare-net")
    for key, value in sorted(spec.env.items()):
        argv += ["--setenv", key, value]
    argv += list(spec.options)
    argv += ["--chdir", str(workdir), "/bin/sh", "-c", command]
    return argv


def _apptainer(command: str, workdir: Path, spec: ContainerSpec, exe: str) -> list[str]:
    if not spec.image:
        raise PilotError(ErrorCode.IMAGENOTFOUND, "apptainer needs an image (container_name)")
    argv = [exe, "exec", "--pwd", str(workdir), "-B", str(workdir)]
    for bind in spec.binds:
        argv += ["-B", bind]
    for bind in spec.ro_binds:
        src, _, dest = bind.partition(":")
        argv += ["-B", f"{src}:{dest or src}:ro"]
    for path in _hidden(spec):
        if path.is_dir():
            empty = workdir / ".hidden"
            empty.mkdir(exist_ok=True)
            argv += ["-B", f"{empty}:{path}:ro"]
        else:
            argv += ["-B", f"/dev/null:{path}:ro"]
    if not spec.network:
        argv += ["--net", "--network", "none"]
    for key, value in sorted(spec.env.items()):
        argv += ["--env", f"{key}={value}"]
    argv += list(spec.options)
    argv += [spec.image, "/bin/sh", "-c", command]
    return argv
