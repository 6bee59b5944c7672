"""The client over HTTPS: CA directory, X.509 proxy as client certificate, bearer token file.

The dispatcher application is served over TLS by the standard library's
WSGI server (waitress speaks plain HTTP; a grid PanDA server sits behind
Apache with mod_ssl). Certificates are made for the test with openssl.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from pilot.comm.panda import PandaClient, token_from_env
from pilot.errors import ErrorCode, PilotError
from pilot.server import loading
from pilot.server.app import DispatcherApp
from pilot.server.db import Store


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=Test CA", cwd=d)  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        extfile = d / f"{name}.ext"
        extfile.write_text(ext + "\n" if ext else "basicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 extfile.name, cwd=d)  # fmt: skip
    # a proxy file holds the certificate and its key
    (d / "proxy.pem").write_text((d / "client.pem").read_text() + (d / "client.key").read_text())
    certdir = d / "certificates"
    certdir.mkdir()
    shutil.copy(d / "ca.pem", certdir / "ca.pem")
    _openssl("rehash", str(certdir), cwd=d)
    return d


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def tls_server(pki: Path, tmp_path: Path):
    store = Store(tmp_path / "s.db")
    loading.load_jobs(store, [{"transformation": "x"}])
    app = DispatcherApp(store, token="tok", require_pilot_token=True)
    httpd: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED  # like a grid server: a client certificate is needed
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    httpd.handle_error = lambda request, client_address: None  # failed handshakes are expected
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2})
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join(10)
    httpd.server_close()
    store.close()


def test_https_with_proxy_ca_dir_and_token(pki: Path, tls_server: str) -> None:
    client = PandaClient(
        tls_server, proxy=str(pki / "proxy.pem"), ca_path=str(pki / "certificates"),
        token="tok", retries=0,
    )  # fmt: skip
    job = client.get_job("Q")
    assert job is not None and job["transformation"] == "x"


def test_https_failures_are_communication_failures(pki: Path, tls_server: str) -> None:
    untrusted = PandaClient(tls_server, proxy=str(pki / "proxy.pem"), token="tok", retries=0)
    with pytest.raises(PilotError) as err:  # the test CA is not in the default bundle
        untrusted.get_job("Q")
    assert err.value.code == ErrorCode.COMMUNICATIONFAILURE
    no_proxy = PandaClient(tls_server, ca_path=str(pki / "ca.pem"), token="tok", retries=0)
    with pytest.raises(PilotError) as err:
        no_proxy.get_job("Q")
    assert err.value.code == ErrorCode.COMMUNICATIONFAILURE
    bad_token = PandaClient(
        tls_server, proxy=str(pki / "proxy.pem"), ca_path=str(pki / "ca.pem"), token="nope",
        retries=0,
    )  # fmt: skip
    with pytest.raises(PilotError) as err:
        bad_token.get_job("Q")
    assert "StatusCode 50" in err.value.detail and "nope" not in str(err.value)


def test_token_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("abc.def\n")
    env = {"OIDC_AUTH_TOKEN": "token", "OIDC_AUTH_DIR": str(tmp_path)}
    assert token_from_env(env) == "abc.def"
    assert token_from_env({"PANDA_AUTH_TOKEN": str(tmp_path / "token")}) == "abc.def"
    assert token_from_env({"PANDA_AUTH_TOKEN": str(tmp_path / "absent")}) is None
    assert token_from_env({}) is None
    monkeypatch.setenv("OIDC_AUTH_TOKEN", str(tmp_path / "token"))
    monkeypatch.setenv("X509_USER_PROXY", str(tmp_path / "no-proxy-here"))
    client = PandaClient.from_env("https://127.0.0.1:1")
    assert client._headers["Authorization"] == "Bearer abc.def" and client._proxy is None
