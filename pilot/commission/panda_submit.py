"""Submit one commissioning job to a real PanDA server; run by PanDA's own interpreter.

PanDA's ``/api/v1/job/submit`` takes jobs serialised by its own ``JobSpec``
(a positional state, so only the server's or the client's classes can make
it). This script is therefore run by an interpreter where
``pandaserver.taskbuffer`` is importable (``--panda-python``), never
imported by the pilot. It reads ``{"url", "job"}`` as JSON on stdin (``job``
a template's job definition with its ``computingSite``) and prints the new
PandaID, or exits 1 with the server's message.
"""

import json
import sys
import time
import uuid

import requests
from pandaserver.taskbuffer import JobUtils
from pandaserver.taskbuffer.FileSpec import FileSpec
from pandaserver.taskbuffer.JobSpec import JobSpec


def _file(job, lfn, kind, spec):
    f = FileSpec()
    f.lfn = lfn
    f.GUID = str(uuid.uuid4())
    f.type = kind
    f.scope = spec.get("scopeLog" if kind == "log" else "scopeOut") or "commission"
    f.destinationDBlock = f.dataset = job.destinationDBlock
    f.destinationSE = job.destinationSE
    job.addFile(f)


def main():
    request = json.load(sys.stdin)
    spec = request["job"]
    tag = f"{int(time.time() * 1000)}"
    job = JobSpec()
    job.jobDefinitionID = 1
    job.jobName = f"{spec.get('jobName') or 'commission'}.{tag}"
    job.transformation = spec["transformation"]
    job.jobParameters = spec.get("jobPars", "")
    job.computingSite = spec["computingSite"]
    job.prodSourceLabel = spec.get("prodSourceLabel") or "managed"
    job.destinationSE = spec.get("destinationSE") or "local"
    job.destinationDBlock = f"commission.{tag}.out"
    job.currentPriority = int(spec.get("currentPriority") or 2000)
    job.VO = spec.get("VO") or "atlas"
    job.cloud = spec.get("cloud") or "US"
    job.coreCount = int(spec.get("coreCount") or 1)
    job.attemptNr = 1
    job.maxAttempt = 1
    job.maxWalltime = int(spec.get("maxWalltime") or 600)
    job.minRamCount = int(spec.get("minRamCount") or 0)
    job.jobsetID = 1
    log = spec.get("logFile") or f"commission.{tag}.log.tgz"
    for lfn in [x for x in str(spec.get("outFiles") or "").split(",") if x and x != log]:
        _file(job, lfn, "output", spec)
    _file(job, log, "log", spec)
    answer = requests.post(
        f"{request['url']}/api/v1/job/submit",
        data={"jobs": JobUtils.dump_jobs_json([job])},
        timeout=120,
    )
    try:
        body = answer.json()
    except ValueError:
        import ast  # a form post is answered with a Python repr

        body = ast.literal_eval(answer.text)
    if answer.status_code != 200 or not body.get("success"):
        print(f"submit failed: HTTP {answer.status_code} {answer.text[:500]}", file=sys.stderr)
        return 1
    print(int(body["data"][0][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
