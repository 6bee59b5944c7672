"""How the channel name reaches an AthenaMP payload: written into its command.

AthenaMP takes the yampl channel from its job options, so the pilot edits the
payload's command the way PanDA Pilot 3 does (docs/DESIGN.md,
"Event-service transport"), in one of three configuration styles:

* legacy job options: ``--preExec 'from AthenaMP.AthenaMPFlags import
  jobproperties as jps;jps.AthenaMPFlags.EventRangeChannel="<name>"'``;
* ComponentAccumulator (``--CA``): ``--preExec
  'ConfigFlags.MP.EventRangeChannel="<name>"'``;
* ComponentAccumulator and multithreaded (``--multithreaded=true``):
  ``--mtes --mtes-channel="<name>"`` inside ``--athenaopts='...'``.

A command that mentions ``PILOT_EVENTRANGECHANNEL`` reads the name itself: it
gets ``export PILOT_EVENTRANGECHANNEL="<name>"; `` in front and nothing else.
An existing ``--preExec`` is merged into rather than duplicated: a legacy one
that imports ``jobproperties as jps;`` gets the assignment right after that
import; otherwise each ``--preExec `` becomes the pilot's option followed by
the original argument, a second value of the same option (transforms take
several).

The command is a shell string, as the payload is run through ``/bin/sh``.
"""

from __future__ import annotations

import re

from pilot.eventservice.yampl import check_channel_name

ENV_VARIABLE = "PILOT_EVENTRANGECHANNEL"
_JPS_IMPORT = "import jobproperties as jps;"
# --athenaopts='...' or --athenaopts="..."
_ATHENAOPTS = re.compile(r"""--athenaopts=(['"])(.*?)\1""", re.S)


def is_ca(command: str) -> bool:
    return "--CA" in command


def is_multithreaded(command: str) -> bool:
    return "--multithreaded=true" in command.lower()


def _legacy(name: str) -> str:
    return (
        " --preExec 'from AthenaMP.AthenaMPFlags import jobproperties as jps;"
        f'jps.AthenaMPFlags.EventRangeChannel="{name}"\' '
    )


def _ca(name: str) -> str:
    return f" --preExec 'ConfigFlags.MP.EventRangeChannel=\"{name}\"' "


def _mtes(name: str) -> str:
    return f' --mtes --mtes-channel="{name}" '


def _append(command: str, option: str) -> str:
    command = command.strip()
    if command.endswith(";"):
        command = command[:-1]
    return command + option


def with_channel(command: str, name: str) -> str:
    """``command`` edited so that the payload it runs uses the channel ``name``."""
    name = check_channel_name(name)
    if ENV_VARIABLE in command:
        return f'export {ENV_VARIABLE}="{name}"; {command}'
    ca = is_ca(command)
    if ca and is_multithreaded(command):
        found = _ATHENAOPTS.search(command)
        if found is None:
            return _append(command, f" --athenaopts='{_mtes(name)}' ")
        quote, opts = found.group(1), found.group(2)
        merged = f"--athenaopts={quote}{opts}{_mtes(name)}{quote}"
        return command[: found.start()] + merged + command[found.end() :]
    option = _ca(name) if ca else _legacy(name)
    if _JPS_IMPORT in command:
        return command.replace(
            _JPS_IMPORT, f'{_JPS_IMPORT}jps.AthenaMPFlags.EventRangeChannel="{name}";'
        )
    if "--preExec " in command:
        return command.replace("--preExec ", option.lstrip())
    return _append(command, option)
