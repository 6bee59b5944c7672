"""``pilot submit`` and ``pilot status``: load work into the dispatcher and look at it.

Both talk to a running server through its token-protected admin endpoints
(``--url``), or open the SQLite file directly (``--db``), which WAL allows
while the server runs. A file holding an object with ``job`` and ``nRanges``
is an event-service task; any other object, or a list, is job definitions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import requests

from pilot.errors import ErrorCode, PilotError
from pilot.fileio import read_json
from pilot.server import loading
from pilot.server.db import Store, StoreError
from pilot.server.serve import TOKEN_ENV

DEFAULT_DB = "pilot-server.db"


def is_task(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("job"), dict) and "nRanges" in obj


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return args.token
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    for candidate in (args.token_file, f"{args.db}.token"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text(encoding="utf-8").strip()
    return None


def _admin(args: argparse.Namespace, verb: str, path: str, body: Any = None) -> dict[str, Any]:
    token = _token(args)
    if not token:
        raise PilotError(
            ErrorCode.COMMUNICATIONFAILURE,
            f"no admin token: use --token, ${TOKEN_ENV} or --token-file",
        )
    try:
        response = requests.request(
            verb,
            f"{args.url.rstrip('/')}{path}",
            json=body,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=60,
        )
    except requests.RequestException as exc:
        raise PilotError(
            ErrorCode.COMMUNICATIONFAILURE, f"{args.url}: {type(exc).__name__}"
        ) from None
    try:
        answer = response.json()
    except ValueError:
        raise PilotError(
            ErrorCode.COMMUNICATIONFAILURE, f"{path}: HTTP {response.status_code}, not JSON"
        ) from None
    if response.status_code >= 300:
        raise PilotError(
            ErrorCode.COMMUNICATIONFAILURE,
            f"{path}: HTTP {response.status_code}: {answer.get('errorDialog')}",
        )
    return answer


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="server URL (admin endpoints)")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite file, when no --url")
    parser.add_argument("--token", default=None, help=f"admin token (default ${TOKEN_ENV})")
    parser.add_argument("--token-file", default=None, help="file holding the admin token")


def submit_main(argv: list[str] | None = None) -> int:
    """``pilot submit job.json|task.json ...``: prints the PandaIDs created."""
    parser = argparse.ArgumentParser(
        prog="pilot submit", description="Load jobs or event-service tasks into `pilot serve`."
    )
    parser.add_argument("files", nargs="*", help="job definition(s) or task JSON files")
    parser.add_argument(
        "--queue", action="append", default=[], help="a queue description (schedconfig JSON)"
    )
    parser.add_argument(
        "--storages", action="append", default=[], help="storage descriptions (ddmendpoints JSON)"
    )
    _common(parser)
    args = parser.parse_args(argv)
    if not (args.files or args.queue or args.storages):
        parser.error("nothing to submit")
    try:
        for kind, names in (("queues", args.queue), ("storages", args.storages)):
            for name in names:
                obj = read_json(name)
                if args.url:
                    answer = _admin(args, "POST", f"/admin/{kind}", obj)
                    answer.pop("StatusCode", None)
                else:
                    store = Store(args.db)
                    try:
                        loader = loading.load_queue if kind == "queues" else loading.load_storages
                        answer = {kind: loader(store, obj)}
                    finally:
                        store.close()
                print(f"{name}: {json.dumps(answer)}")
        for name in args.files:
            obj = read_json(name)
            if args.url:
                path = "/admin/tasks" if is_task(obj) else "/admin/jobs"
                answer = _admin(args, "POST", path, obj)
            else:
                store = Store(args.db)
                try:
                    if is_task(obj):
                        answer = loading.load_task(store, obj)
                    else:
                        ids = loading.load_jobs(store, obj if isinstance(obj, list) else [obj])
                        answer = {"PandaIDs": ids}
                finally:
                    store.close()
            answer.pop("StatusCode", None)
            print(f"{name}: {json.dumps(answer)}")
    except (PilotError, StoreError) as exc:
        print(f"pilot submit: {exc}", file=sys.stderr)
        return 1
    return 0


def status_main(argv: list[str] | None = None) -> int:
    """``pilot status [--json] [--flush --spool DIR]``: jobs with their range counts."""
    parser = argparse.ArgumentParser(prog="pilot status", description="Jobs and event ranges.")
    _common(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--flush", action="store_true", help="send the spooled updates to --url")
    parser.add_argument("--spool", default=None, help="spool directory (with --flush)")
    args = parser.parse_args(argv)
    if args.flush:
        from pilot.comm.panda import PandaClient
        from pilot.comm.spool import flush_spool

        if not args.url or not args.spool:
            print("pilot status --flush needs --url and --spool", file=sys.stderr)
            return 2
        try:
            token = _token(args)
            extra = {"token": token} if token else {}
            return flush_spool(args.spool, PandaClient.from_env(args.url, retries=2, **extra))
        except PilotError as exc:
            print(f"pilot status: {exc}", file=sys.stderr)
            return 1
    try:
        if args.url:
            jobs = _admin(args, "GET", "/admin/status")["jobs"]
        else:
            if not Path(args.db).is_file():
                print(f"pilot status: no database {args.db}", file=sys.stderr)
                return 1
            store = Store(args.db)
            try:
                jobs = store.summary()
            finally:
                store.close()
    except PilotError as exc:
        print(f"pilot status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(jobs, indent=1))
        return 0
    print(f"{'PandaID':>10} {'task':>8} {'att':>3} {'status':<12} {'command':<10} ranges")
    for j in jobs:
        ranges = " ".join(f"{k}={v}" for k, v in sorted(j["ranges"].items())) or "-"
        print(
            f"{j['panda_id']:>10} {j['task_id']:>8} {j['attempt_nr']:>3} {j['status']:<12}"
            f" {j['command']:<10} {ranges}"
        )
    return 0


main = submit_main
