"""Request decoding and answer encoding in PanDA's formats (no server)."""

from __future__ import annotations

import gzip
import io
import json
from urllib.parse import parse_qs

import pytest

from pilot.server.wire import (
    BadRequest,
    decode_params,
    encode_answer,
    int_param,
    json_param,
    str_param,
)


def _environ(body: bytes, ctype: str = "", encoding: str = "", query: str = "") -> dict:
    env = {
        "wsgi.input": io.BytesIO(body),
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": ctype,
        "QUERY_STRING": query,
    }
    if encoding:
        env["HTTP_CONTENT_ENCODING"] = encoding
    return env


def test_form_body_and_query() -> None:
    env = _environ(b"siteName=Q&node=n%201&mem=", query="siteName=OLD&x=1")
    assert decode_params(env) == {"siteName": "Q", "node": "n 1", "mem": "", "x": "1"}


def test_gzip_json_body_keeps_json_values() -> None:
    body = gzip.compress(json.dumps({"eventRanges": [{"a": 1}], "version": 1}).encode())
    env = _environ(body, "application/json; charset=utf-8", "gzip")
    params = decode_params(env)
    assert params == {"eventRanges": [{"a": 1}], "version": 1}
    assert json_param(params, "eventRanges") == [{"a": 1}]


def test_body_limits() -> None:
    with pytest.raises(BadRequest) as err:
        decode_params(_environ(b"a=" + b"x" * 100), limit=50)
    assert err.value.status == 413
    bomb = gzip.compress(b"a=" + b"x" * 10_000)
    with pytest.raises(BadRequest) as err:
        decode_params(_environ(bomb, encoding="gzip"), limit=1000)
    assert err.value.status == 413
    env = _environ(b"")
    env["CONTENT_LENGTH"] = "-1"
    with pytest.raises(BadRequest):
        decode_params(env)


@pytest.mark.parametrize(
    "body,ctype",
    [(b"\xff\xfe", ""), (b"[1]", "application/json"), (b"{", "application/json")],
)
def test_bad_bodies(body: bytes, ctype: str) -> None:
    with pytest.raises(BadRequest) as err:
        decode_params(_environ(body, ctype))
    assert err.value.status == 400 and err.value.reason


def test_param_checks() -> None:
    p = {"a": "12", "b": "1.0", "c": "x", "d": True, "e": ["1"], "f": "-3", "j": "[1"}
    assert int_param(p, "a") == 12 and int_param(p, "b") == 1
    assert int_param(p, "missing", default=5) == 5
    for key in ("c", "d", "e", "f", "missing"):
        with pytest.raises(BadRequest):
            int_param(p, key)
    assert str_param(p, "a") == "12"
    with pytest.raises(BadRequest):
        str_param(p, "e")
    with pytest.raises(BadRequest):
        json_param(p, "j")


def test_answers() -> None:
    body, ctype = encode_answer({"StatusCode": 0, "command": None, "l": [1]}, as_json=True)
    assert ctype == "application/json" and json.loads(body)["command"] is None
    body, ctype = encode_answer({"StatusCode": 0, "command": None, "l": [1]}, as_json=False)
    assert parse_qs(body.decode()) == {"StatusCode": ["0"], "command": ["NULL"], "l": ["[1]"]}


def test_abusive_shapes() -> None:
    many = "&".join(f"k{i}=v" for i in range(20_000)).encode()
    with pytest.raises(BadRequest) as err:
        decode_params(_environ(many))
    assert err.value.status == 400
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(BadRequest):
        decode_params(_environ(b'{"a": ' + deep + b"}", "application/json"))
    with pytest.raises(BadRequest):
        json_param({"eventRanges": deep.decode()}, "eventRanges")
