"""Request bodies and answers in PanDA's encodings.

Pilots send form-encoded bodies (3.7, with curl) or gzip-compressed JSON
(``Content-Type: application/json``, newer pilots); both become one dict of
parameters here. Answers are JSON when the client's ``Accept`` names JSON,
else PanDA's urlencoded ``key=value&...``. Everything that can be wrong with
a body (size, compression, encoding, shape) is a :class:`BadRequest` with a
status and a reason, so the server answers 4xx and goes on serving.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any
from urllib.parse import parse_qsl, urlencode

MAX_BODY = 32 * 1024 * 1024
MAX_FIELDS = 10_000


class BadRequest(Exception):
    """A request the dispatcher refuses; ``status`` is the HTTP status (4xx)."""

    def __init__(self, status: int, reason: str, status_code: int = 30) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.status_code = status_code


def read_body(environ: dict[str, Any], limit: int = MAX_BODY) -> bytes:
    """The raw body, at most ``limit`` bytes (413 beyond; the rest is not read)."""
    length_text = environ.get("CONTENT_LENGTH") or ""
    stream = environ["wsgi.input"]
    if length_text:
        try:
            length = int(length_text)
        except ValueError:
            raise BadRequest(400, "Content-Length is not a number") from None
        if length < 0:
            raise BadRequest(400, "negative Content-Length")
        if length > limit:
            raise BadRequest(413, f"body of {length} bytes exceeds the limit of {limit}")
        return stream.read(length) if length else b""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise BadRequest(413, f"body exceeds the limit of {limit} bytes")
    return data


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress with a bound, so a small bomb cannot fill the memory."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise BadRequest(400, f"body is not valid gzip: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise BadRequest(413, f"decompressed body exceeds the limit of {limit} bytes")
    return out


def decode_params(environ: dict[str, Any], limit: int = MAX_BODY) -> dict[str, Any]:
    """Query string and body merged into one dict (body wins); values str or JSON values."""
    params: dict[str, Any] = {}
    query = environ.get("QUERY_STRING") or ""
    if query:
        params.update(_form(query.encode("latin-1", errors="replace")))
    body = read_body(environ, limit)
    encoding = (environ.get("HTTP_CONTENT_ENCODING") or "").lower()
    if "gzip" in encoding or body[:2] == b"\x1f\x8b":
        body = _gunzip(body, limit)
    if not body:
        return params
    ctype = (environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise BadRequest(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise BadRequest(400, f"JSON body must be an object, got {type(obj).__name__}")
        params.update(obj)
        return params
    if ctype not in ("", "application/x-www-form-urlencoded"):
        raise BadRequest(415, f"unsupported Content-Type {ctype!r}")
    params.update(_form(body))
    return params


def _form(data: bytes) -> dict[str, str]:
    try:
        text = data.decode("utf-8")
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=False,
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(400, f"body is not valid form encoding: {exc}") from None
    if text.strip() and not pairs:
        raise BadRequest(400, "body holds no key=value pairs")
    return dict(pairs)


def read_json(environ: dict[str, Any], limit: int = MAX_BODY) -> Any:
    """A JSON body (admin and trace endpoints), gzip allowed."""
    body = read_body(environ, limit)
    if (environ.get("HTTP_CONTENT_ENCODING") or "").lower() == "gzip" or body[:2] == b"\x1f\x8b":
        body = _gunzip(body, limit)
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest(400, f"body is not valid JSON: {exc}") from None


def wants_json(environ: dict[str, Any]) -> bool:
    return "json" in (environ.get("HTTP_ACCEPT") or "").lower()


def panda_value(value: Any) -> str:
    """PanDA sends every field as a string; absent values as ``NULL``, lists and dicts as JSON."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def encode_answer(answer: dict[str, Any], as_json: bool) -> tuple[bytes, str]:
    """Body and Content-Type of an answer."""
    if as_json:
        return json.dumps(answer).encode("utf-8"), "application/json"
    text = urlencode([(k, panda_value(v)) for k, v in answer.items()])
    return text.encode("ascii"), "text/plain; charset=utf-8"


def gzip_json(obj: Any) -> bytes:
    """A gzip-compressed JSON body, as newer pilots send (used by tests and tools)."""
    return gzip.compress(json.dumps(obj).encode("utf-8"))


# -- parameter checks ---------------------------------------------------------------


def int_param(
    params: dict[str, Any], key: str, *, default: int | None = None, minimum: int = 0
) -> int:
    value = params.get(key)
    if value is None or value == "" or value == "NULL":
        if default is None:
            raise BadRequest(400, f"'{key}' is required", status_code=80)
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise BadRequest(400, f"'{key}' must be an integer, got {type(value).__name__}")
    try:
        number = int(value) if not isinstance(value, float) else int(value)
    except ValueError:
        try:
            as_float = float(value)
        except ValueError:
            raise BadRequest(400, f"'{key}' must be an integer, got {value!r:.40}") from None
        if not as_float.is_integer():
            raise BadRequest(400, f"'{key}' must be an integer, got {value!r:.40}") from None
        number = int(as_float)
    if number < minimum:
        raise BadRequest(400, f"'{key}' must be >= {minimum}, got {number}")
    return number


def str_param(params: dict[str, Any], key: str, *, default: str | None = None) -> str:
    value = params.get(key)
    if value is None or value == "":
        if default is None:
            raise BadRequest(400, f"'{key}' is required", status_code=80)
        return default
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise BadRequest(400, f"'{key}' must be a string, got {type(value).__name__}")
    return str(value)


def json_param(params: dict[str, Any], key: str) -> Any:
    """A parameter that carries JSON in a form value, or a JSON value already (JSON body)."""
    value = params.get(key)
    if value is None:
        raise BadRequest(400, f"'{key}' is required", status_code=80)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise BadRequest(400, f"'{key}' is not valid JSON: {exc}") from None
    return value
