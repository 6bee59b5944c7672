"""PanDA pilot error codes, the one exception type that carries them, and
recognition of payload failures.

The numbers and acronyms are PanDA's: PanDA monitoring, Harvester and the
operators' dashboards key on them, so they are never renumbered here. Every
failure in the pilot is a :class:`PilotError` with one of these codes; the
diagnostic sent upstream is built in one place, :func:`error_diag`, because
PanDA keeps at most 256 characters of it.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class ErrorCode(IntEnum):
    """PanDA pilot error codes (``pilotErrorCode``); names are PanDA's acronyms."""

    GENERALERROR = 1008
    NOLOCALSPACE = 1098
    STAGEINFAILED = 1099
    REPLICANOTFOUND = 1100
    NOSUCHFILE = 1103
    USERDIRTOOLARGE = 1104
    STDOUTTOOBIG = 1106
    SETUPFAILURE = 1110
    NFSSQLITE = 1115
    QUEUEDATA = 1116
    QUEUEDATANOTOK = 1117
    OUTPUTFILETOOLARGE = 1124
    NOSTORAGE = 1133
    STAGEOUTFAILED = 1137
    PUTMD5MISMATCH = 1141
    CHMODTRF = 1143
    PANDAKILL = 1144
    GETMD5MISMATCH = 1145
    TRFDOWNLOADFAILURE = 1149
    LOOPINGJOB = 1150
    STAGEINTIMEOUT = 1151
    STAGEOUTTIMEOUT = 1152
    NOPROXY = 1163
    MISSINGOUTPUTFILE = 1165
    SIZETOOLARGE = 1168
    GETADMISMATCH = 1171
    PUTADMISMATCH = 1172
    NOVOMSPROXY = 1177
    GETGLOBUSSYSERR = 1180
    PUTGLOBUSSYSERR = 1181
    NOSOFTWAREDIR = 1186
    NOPAYLOADMETADATA = 1187
    LFNTOOLONG = 1190
    ZEROFILESIZE = 1191
    MKDIR = 1199
    KILLSIGNAL = 1200
    SIGTERM = 1201
    SIGQUIT = 1202
    SIGSEGV = 1203
    SIGXCPU = 1204
    USERKILL = 1205
    SIGBUS = 1206
    SIGUSR1 = 1207
    MISSINGINSTALLATION = 1211
    PAYLOADOUTOFMEMORY = 1212
    REACHEDMAXTIME = 1213
    UNKNOWNPAYLOADFAILURE = 1220
    FILEEXISTS = 1221
    BADALLOC = 1223
    ESRECOVERABLE = 1224
    ESFATAL = 1228
    EXECUTEDCLONEJOB = 1234
    PAYLOADEXCEEDMAXMEM = 1235
    FAILEDBYSERVER = 1236
    ESNOEVENTS = 1238
    MESSAGEHANDLINGFAILURE = 1240
    CHKSUMNOTSUP = 1242
    NORELEASEFOUND = 1244
    NOUSERTARBALL = 1246
    BADXML = 1247
    NOTIMPLEMENTED = 1300
    UNKNOWNEXCEPTION = 1301
    CONVERSIONFAILURE = 1302
    FILEHANDLINGFAILURE = 1303
    PAYLOADEXECUTIONFAILURE = 1305
    SINGULARITYGENERALFAILURE = 1306
    SINGULARITYNOLOOPDEVICES = 1307
    SINGULARITYBINDPOINTFAILURE = 1308
    SINGULARITYIMAGEMOUNTFAILURE = 1309
    PAYLOADEXECUTIONEXCEPTION = 1310
    NOTDEFINED = 1311
    NOTSAMELENGTH = 1312
    NOSTORAGEPROTOCOL = 1313
    UNKNOWNCHECKSUMTYPE = 1314
    UNKNOWNTRFFAILURE = 1315
    RUCIOSERVICEUNAVAILABLE = 1316
    EXCEEDEDMAXWAITTIME = 1317
    COMMUNICATIONFAILURE = 1318
    INTERNALPILOTPROBLEM = 1319
    LOGFILECREATIONFAILURE = 1320
    RUCIOLOCATIONFAILED = 1321
    RUCIOLISTREPLICASFAILED = 1322
    UNKNOWNCOPYTOOL = 1323
    SERVICENOTAVAILABLE = 1324
    SINGULARITYNOTINSTALLED = 1325
    NOREPLICAS = 1326
    UNREACHABLENETWORK = 1327
    PAYLOADSIGSEGV = 1328
    NONDETERMINISTICDDM = 1329
    JSONRETRIEVALTIMEOUT = 1330
    MISSINGINPUTFILE = 1331
    BLACKHOLE = 1332
    NOREMOTESPACE = 1333
    SETUPFATAL = 1334
    MISSINGUSERCODE = 1335
    JOBALREADYRUNNING = 1336
    BADMEMORYMONITORJSON = 1337
    STAGEINAUTHENTICATIONFAILURE = 1338
    DBRELEASEFAILURE = 1339
    SINGULARITYNEWUSERNAMESPACE = 1340
    BADQUEUECONFIGURATION = 1341
    MIDDLEWAREIMPORTFAILURE = 1342
    NOOUTPUTINJOBREPORT = 1343
    RESOURCEUNAVAILABLE = 1344
    SINGULARITYFAILEDUSERNAMESPACE = 1345
    TRANSFORMNOTFOUND = 1346
    UNSUPPORTEDSL5OS = 1347
    SINGULARITYRESOURCEUNAVAILABLE = 1348
    UNRECOGNIZEDTRFARGUMENTS = 1349
    EMPTYOUTPUTFILE = 1350
    UNRECOGNIZEDTRFSTDERR = 1351
    STATFILEPROBLEM = 1352
    NOSUCHPROCESS = 1353
    GENERALCPUCALCPROBLEM = 1354
    COREDUMP = 1355
    PREPROCESSFAILURE = 1356
    POSTPROCESSFAILURE = 1357
    MISSINGRELEASEUNPACKED = 1358
    PANDAQUEUENOTACTIVE = 1359
    IMAGENOTFOUND = 1360
    REMOTEFILECOULDNOTBEOPENED = 1361
    XRDCPERROR = 1362
    MISSINGCREDENTIALS = 1364
    NOCTYPES = 1365
    CHECKSUMCALCFAILURE = 1366
    COMMANDTIMEDOUT = 1367
    REMOTEFILEOPENTIMEDOUT = 1368
    FRONTIER = 1369
    BADOUTPUTFILENAME = 1371
    APPTAINERNOTINSTALLED = 1372
    CERTIFICATEHASEXPIRED = 1373
    REMOTEFILEDICTDOESNOTEXIST = 1374
    LEASETIME = 1375
    LOGCREATIONTIMEOUT = 1376


# The standard text PanDA shows for a code; the detail of one failure is
# appended to it by error_diag().
_MESSAGES: dict[int, str] = {
    ErrorCode.GENERALERROR: "General pilot error",
    ErrorCode.NOLOCALSPACE: "Not enough local space",
    ErrorCode.STAGEINFAILED: "Failed to stage-in file",
    ErrorCode.REPLICANOTFOUND: "Replica not found",
    ErrorCode.NOSUCHFILE: "No such file or directory",
    ErrorCode.USERDIRTOOLARGE: "User work directory too large",
    ErrorCode.STDOUTTOOBIG: "Payload stdout file too big",
    ErrorCode.SETUPFAILURE: "Failed during payload setup",
    ErrorCode.QUEUEDATA: "Pilot could not download queuedata",
    ErrorCode.QUEUEDATANOTOK: "Pilot found non-valid queuedata",
    ErrorCode.OUTPUTFILETOOLARGE: "Output file too large",
    ErrorCode.NOSTORAGE: "Fetching of storage data failed",
    ErrorCode.STAGEOUTFAILED: "Failed to stage-out file",
    ErrorCode.PUTMD5MISMATCH: "md5sum mismatch on output file",
    ErrorCode.CHMODTRF: "Failed to chmod transform",
    ErrorCode.PANDAKILL: "This job was killed by panda server",
    ErrorCode.GETMD5MISMATCH: "md5sum mismatch on input file",
    ErrorCode.TRFDOWNLOADFAILURE: "Transform could not be downloaded",
    ErrorCode.LOOPINGJOB: "Looping job killed by pilot",
    ErrorCode.STAGEINTIMEOUT: "File transfer timed out during stage-in",
    ErrorCode.STAGEOUTTIMEOUT: "File transfer timed out during stage-out",
    ErrorCode.NOPROXY: "Grid proxy not valid",
    ErrorCode.MISSINGOUTPUTFILE: "Local output file is missing",
    ErrorCode.SIZETOOLARGE: "Total file size too large",
    ErrorCode.GETADMISMATCH: "adler32 mismatch on input file",
    ErrorCode.PUTADMISMATCH: "adler32 mismatch on output file",
    ErrorCode.NOPAYLOADMETADATA: "Payload metadata does not exist",
    ErrorCode.LFNTOOLONG: "LFN too long",
    ErrorCode.ZEROFILESIZE: "File size cannot be zero",
    ErrorCode.MKDIR: "Failed to create local directory",
    ErrorCode.KILLSIGNAL: "Job terminated by unknown kill signal",
    ErrorCode.SIGTERM: "Job killed by signal: SIGTERM",
    ErrorCode.SIGQUIT: "Job killed by signal: SIGQUIT",
    ErrorCode.SIGSEGV: "Job killed by signal: SIGSEGV",
    ErrorCode.SIGXCPU: "Job killed by signal: SIGXCPU",
    ErrorCode.USERKILL: "Job killed by user",
    ErrorCode.SIGBUS: "Job killed by signal: SIGBUS",
    ErrorCode.SIGUSR1: "Job killed by signal: SIGUSR1",
    ErrorCode.PAYLOADOUTOFMEMORY: "Payload ran out of memory",
    ErrorCode.REACHEDMAXTIME: "Reached maximum batch system time",
    ErrorCode.UNKNOWNPAYLOADFAILURE: "Job failed due to unknown reason",
    ErrorCode.FILEEXISTS: "File already exists",
    ErrorCode.BADALLOC: "Transform failed due to bad_alloc",
    ErrorCode.ESRECOVERABLE: "Event service: recoverable error",
    ErrorCode.ESFATAL: "Event service: fatal error",
    ErrorCode.PAYLOADEXCEEDMAXMEM: "Payload exceeded maximum allowed memory",
    ErrorCode.FAILEDBYSERVER: "Failed by server",
    ErrorCode.ESNOEVENTS: "Event service: no events",
    ErrorCode.MESSAGEHANDLINGFAILURE: "Failed to handle message from payload",
    ErrorCode.CHKSUMNOTSUP: "Mover error: query checksum is not supported",
    ErrorCode.NOTIMPLEMENTED: "The class or function is not implemented",
    ErrorCode.UNKNOWNEXCEPTION: "An unknown pilot exception has occurred",
    ErrorCode.CONVERSIONFAILURE: "Failed to convert object data",
    ErrorCode.FILEHANDLINGFAILURE: "Failed during file handling",
    ErrorCode.PAYLOADEXECUTIONFAILURE: "Failed to execute payload",
    ErrorCode.PAYLOADEXECUTIONEXCEPTION: "Exception caught during payload execution",
    ErrorCode.NOTDEFINED: "Not defined",
    ErrorCode.NOTSAMELENGTH: "Not same length",
    ErrorCode.NOSTORAGEPROTOCOL: "No protocol defined for storage endpoint",
    ErrorCode.UNKNOWNCHECKSUMTYPE: "Unknown checksum type",
    ErrorCode.UNKNOWNTRFFAILURE: "Unknown transform failure",
    ErrorCode.EXCEEDEDMAXWAITTIME: "Exceeded maximum waiting time",
    ErrorCode.COMMUNICATIONFAILURE: "Failed to communicate with server",
    ErrorCode.INTERNALPILOTPROBLEM: "An internal pilot problem has occurred",
    ErrorCode.LOGFILECREATIONFAILURE: "Failed during creation of log file",
    ErrorCode.UNKNOWNCOPYTOOL: "Unknown copy tool",
    ErrorCode.SERVICENOTAVAILABLE: "Service not available at the moment",
    ErrorCode.SINGULARITYNOTINSTALLED: "Singularity: not installed",
    ErrorCode.NOREPLICAS: "No matching replicas were found in list_replicas() output",
    ErrorCode.UNREACHABLENETWORK: "Unable to stage-in file since network is unreachable",
    ErrorCode.PAYLOADSIGSEGV: "SIGSEGV: Invalid memory reference or a segmentation fault",
    ErrorCode.MISSINGINPUTFILE: "Input file is missing in storage element",
    ErrorCode.BLACKHOLE: "Black hole detected in file system (consult Pilot log)",
    ErrorCode.NOREMOTESPACE: "No space left on device",
    ErrorCode.SETUPFATAL: "Setup failed with a fatal exception (consult Payload log)",
    ErrorCode.MISSINGUSERCODE: "User code not available on PanDA server (resubmit task with --useNewCode)",
    ErrorCode.JOBALREADYRUNNING: "Job is already running elsewhere",
    ErrorCode.BADMEMORYMONITORJSON: "Memory monitor produced bad output",
    ErrorCode.BADQUEUECONFIGURATION: "Bad queue configuration detected",
    ErrorCode.NOOUTPUTINJOBREPORT: "Found no output in job report",
    ErrorCode.RESOURCEUNAVAILABLE: "Resource temporarily unavailable",
    ErrorCode.TRANSFORMNOTFOUND: "Transform not found",
    ErrorCode.UNRECOGNIZEDTRFARGUMENTS: "Unrecognized transform arguments",
    ErrorCode.EMPTYOUTPUTFILE: "Empty output file detected",
    ErrorCode.UNRECOGNIZEDTRFSTDERR: "Unrecognized fatal error in transform stderr",
    ErrorCode.STATFILEPROBLEM: "Failed to stat proc file for CPU consumption calculation",
    ErrorCode.NOSUCHPROCESS: "CPU consumption calculation failed: No such process",
    ErrorCode.COREDUMP: "Core dump detected",
    ErrorCode.PREPROCESSFAILURE: "Pre-process command failed",
    ErrorCode.POSTPROCESSFAILURE: "Post-process command failed",
    ErrorCode.PANDAQUEUENOTACTIVE: "PanDA queue is not active",
    ErrorCode.IMAGENOTFOUND: "Image not found",
    ErrorCode.MISSINGCREDENTIALS: "Unable to locate credentials for S3 transfer",
    ErrorCode.CHECKSUMCALCFAILURE: "Failure during checksum calculation",
    ErrorCode.COMMANDTIMEDOUT: "Command timed out",
    ErrorCode.BADOUTPUTFILENAME: "Bad output file name",
    ErrorCode.APPTAINERNOTINSTALLED: "Apptainer is not installed",
    ErrorCode.CERTIFICATEHASEXPIRED: "Certificate has expired",
    ErrorCode.LEASETIME: "Lease time is up",
    ErrorCode.LOGCREATIONTIMEOUT: "Log file creation timed out",
}

MAX_DIAG = 256


def error_message(code: int) -> str:
    """The standard PanDA text for ``code`` (its acronym when PanDA has no text)."""
    if code in _MESSAGES:
        return _MESSAGES[code]
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"Unknown error code {code}"


def error_diag(code: int, detail: str = "") -> str:
    """``pilotErrorDiag``: the standard message plus the *tail* of the detail.

    PanDA keeps 256 characters; the end of a detail (the last error line) is
    what tells an operator most, so the detail is cut from the front.
    """
    head = error_message(code)
    detail = " ".join((detail or "").split())
    if not detail:
        return head[:MAX_DIAG]
    text = f"{head}: {detail}"
    if len(text) <= MAX_DIAG:
        return text
    room = MAX_DIAG - len(head) - 5
    if room <= 0:
        return head[:MAX_DIAG]
    return f"{head}: ..{detail[-room:]}"


def diag_detail(code: int, diag: str) -> str:
    """The detail of a diagnostic made by :func:`error_diag`: its standard text removed.

    The standard text itself may hold ``": "`` (``SIGSEGV: Invalid memory ...``),
    so it is removed as a whole, never by splitting at the first colon.
    """
    head = error_message(code)
    if diag == head:
        return ""
    for prefix in (f"{head}: ..", f"{head}: "):
        if diag.startswith(prefix):
            return diag[len(prefix) :]
    return diag


class PilotError(Exception):
    """The pilot's one error type: a PanDA error code plus what happened."""

    def __init__(self, code: int, detail: str = "") -> None:
        self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code
        self.detail = detail
        super().__init__(
            f"{int(code)} {error_message(code)}: {detail}" if detail else error_message(code)
        )

    def __reduce__(self) -> tuple[Any, tuple[int, str]]:
        # rebuilt from code and detail (not the message), e.g. across a process boundary
        return type(self), (int(self.code), self.detail)

    @property
    def diag(self) -> str:
        return error_diag(self.code, self.detail)

    @property
    def acronym(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return str(self.code)


# -- payload error recognition -------------------------------------------------

SIGNAL_CODES: dict[int, ErrorCode] = {
    signal.SIGTERM: ErrorCode.SIGTERM,
    signal.SIGQUIT: ErrorCode.SIGQUIT,
    signal.SIGSEGV: ErrorCode.SIGSEGV,
    signal.SIGXCPU: ErrorCode.SIGXCPU,
    signal.SIGBUS: ErrorCode.SIGBUS,
    signal.SIGUSR1: ErrorCode.SIGUSR1,
    signal.SIGINT: ErrorCode.USERKILL,
}


def signal_code(signum: int) -> ErrorCode:
    """The KILLSIGNAL-family code for a signal that reached the pilot."""
    return SIGNAL_CODES.get(signum, ErrorCode.KILLSIGNAL)


# Patterns in the payload's stderr/stdout, most specific first.  The first
# match decides the code; the matching line becomes the diagnostic.
_PATTERNS: list[tuple[re.Pattern[str], ErrorCode]] = [
    (re.compile(r"Failed to mount image", re.I), ErrorCode.SINGULARITYIMAGEMOUNTFAILURE),
    (re.compile(r"No more available loop devices", re.I), ErrorCode.SINGULARITYNOLOOPDEVICES),
    (
        re.compile(r"Failed to create user namespace", re.I),
        ErrorCode.SINGULARITYFAILEDUSERNAMESPACE,
    ),
    (
        re.compile(r"(Apptainer|Singularity) is not installed", re.I),
        ErrorCode.APPTAINERNOTINSTALLED,
    ),
    (re.compile(r"bind ?point.*(fail|not exist)", re.I), ErrorCode.SINGULARITYBINDPOINTFAILURE),
    (re.compile(r"std::bad_alloc|bad_alloc"), ErrorCode.BADALLOC),
    (
        re.compile(r"MemoryError|Cannot allocate memory|out of memory", re.I),
        ErrorCode.PAYLOADOUTOFMEMORY,
    ),
    (re.compile(r"segmentation (violation|fault)", re.I), ErrorCode.PAYLOADSIGSEGV),
    (re.compile(r"core dumped", re.I), ErrorCode.COREDUMP),
    (
        re.compile(
            r"(command not found|No such file or directory: .*(trf|transform)|transform not found)",
            re.I,
        ),
        ErrorCode.TRANSFORMNOTFOUND,
    ),
    (
        re.compile(
            r"(missing input file|input file .* (not found|does not exist)|Could not open input file)",
            re.I,
        ),
        ErrorCode.MISSINGINPUTFILE,
    ),
    (
        re.compile(r"unrecognized arguments|unrecognised arguments", re.I),
        ErrorCode.UNRECOGNIZEDTRFARGUMENTS,
    ),
    (re.compile(r"No space left on device", re.I), ErrorCode.NOLOCALSPACE),
    (re.compile(r"FRONTIER.*(fail|error)", re.I), ErrorCode.FRONTIER),
]


@dataclass(frozen=True)
class PayloadDiagnosis:
    """What the pilot concludes about a finished payload.

    ``exe_error_code``/``trans_exit_code`` carry the payload's own exit code;
    ``pilot_error_code`` is the pilot's reading of it (0 when all is well).
    """

    pilot_error_code: int
    pilot_error_diag: str
    exe_error_code: int
    trans_exit_code: int

    @property
    def ok(self) -> bool:
        return self.pilot_error_code == 0 and self.exe_error_code == 0


def scan_patterns(text: str) -> tuple[ErrorCode, str] | None:
    """First known failure pattern in ``text``, with the line it was found on."""
    for pattern, code in _PATTERNS:
        m = pattern.search(text)
        if m:
            start = text.rfind("\n", 0, m.start()) + 1
            end = text.find("\n", m.end())
            return code, text[start : end if end >= 0 else len(text)].strip()
    return None


_FATAL_SIGNALS = {
    int(s)
    for s in (
        signal.SIGSEGV,
        signal.SIGKILL,
        signal.SIGTERM,
        signal.SIGBUS,
        signal.SIGQUIT,
        signal.SIGXCPU,
        signal.SIGUSR1,
        signal.SIGABRT,
        signal.SIGINT,
        signal.SIGFPE,
        signal.SIGILL,
    )
}


def diagnose_payload(
    returncode: int, stderr_tail: str = "", stdout_tail: str = ""
) -> PayloadDiagnosis:
    """Map a payload's exit status and output tails to PanDA codes.

    ``returncode`` follows :mod:`subprocess`: negative means killed by that
    signal. A zero exit is success even when stderr holds scary words:
    transforms routinely print errors they recovered from.
    """
    if returncode == 0:
        return PayloadDiagnosis(0, "", 0, 0)
    text = f"{stderr_tail}\n{stdout_tail}"
    if 128 < returncode < 128 + 32 and returncode - 128 in _FATAL_SIGNALS:
        # A shell reports a child killed by signal N as exit 128+N; the
        # payload runs under a shell, so that is how its signals arrive.
        returncode = -(returncode - 128)
    if returncode < 0:
        signum = -returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        if signum == signal.SIGSEGV:
            code = ErrorCode.PAYLOADSIGSEGV
        elif signum == signal.SIGKILL:
            found = scan_patterns(text)
            code = (
                found[0]
                if found and found[0] in (ErrorCode.BADALLOC, ErrorCode.PAYLOADOUTOFMEMORY)
                else ErrorCode.KILLSIGNAL
            )
        else:
            code = signal_code(signum)
        return PayloadDiagnosis(
            code, error_diag(code, f"payload killed by {name}"), 128 + signum, 128 + signum
        )
    found = scan_patterns(text)
    if returncode == 127 and (not found or found[0] != ErrorCode.TRANSFORMNOTFOUND):
        found = (ErrorCode.TRANSFORMNOTFOUND, "payload command not found (exit 127)")
    if returncode == 126:
        found = (ErrorCode.CHMODTRF, "payload command is not executable (exit 126)")
    if found:
        code, line = found
        return PayloadDiagnosis(code, error_diag(code, line), returncode, returncode)
    if returncode in (251, 255) or returncode == -1:
        code = ErrorCode.UNKNOWNTRFFAILURE
    else:
        code = ErrorCode.PAYLOADEXECUTIONFAILURE
    last = next((ln for ln in reversed(stderr_tail.splitlines()) if ln.strip()), "")
    detail = f"exit code {returncode}" + (f": {last.strip()}" if last else "")
    return PayloadDiagnosis(code, error_diag(code, detail), returncode, returncode)
