"""TLS: a server certificate, and client certificates when the server asks for them.
Certificates come from a throwaway CA made by the test (trustme)."""

from __future__ import annotations

import grpc
import pytest
import trustme

from client import Client, ClientOptions, StatusError


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate; as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client@lstm-serve.test")
    files = {
        "ca": ca.cert_pem,
        "server_cert": server_cert.cert_chain_pems[0],
        "server_key": server_cert.private_key_pem,
        "client_cert": client_cert.cert_chain_pems[0],
        "client_key": client_cert.private_key_pem,
        "other_ca": trustme.CA().cert_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(root / f"{name}.pem"))
    return {name: root / f"{name}.pem" for name in files}


def models_over(target: str, **options) -> list[str]:
    with Client(target, ClientOptions(timeout=5, retry_attempts=1, **options)) as client:
        return [m.name for m in client.list_models()]


def trusting(pki, with_client_cert: bool = False) -> grpc.ChannelCredentials:
    """Credentials for the fixture's health checks."""
    client = (
        {"private_key": pki["client_key"].read_bytes(), "certificate_chain": pki["client_cert"].read_bytes()}
        if with_client_cert
        else {}
    )
    return grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes(), **client)


def test_server_certificate(start_server, pki):
    tls = ("--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]))
    proc = start_server(*tls, "--shutdown-delay", "0", credentials=trusting(pki))
    assert "tiny" in models_over(proc.target, ca_cert=pki["ca"])
    with pytest.raises(StatusError) as plaintext:
        models_over(proc.target)
    assert plaintext.value.code.name == "UNAVAILABLE"
    with pytest.raises(StatusError) as untrusted:
        models_over(proc.target, ca_cert=pki["other_ca"])
    assert untrusted.value.code.name == "UNAVAILABLE"


def test_client_certificates_when_the_server_requires_them(start_server, pki):
    proc = start_server(
        "--tls-cert",
        str(pki["server_cert"]),
        "--tls-key",
        str(pki["server_key"]),
        "--tls-client-ca",
        str(pki["ca"]),
        "--shutdown-delay",
        "0",
        credentials=trusting(pki, with_client_cert=True),
    )
    assert "tiny" in models_over(
        proc.target, ca_cert=pki["ca"], client_cert=pki["client_cert"], client_key=pki["client_key"]
    )
    with pytest.raises(StatusError) as anonymous:
        models_over(proc.target, ca_cert=pki["ca"])
    assert anonymous.value.code.name == "UNAVAILABLE"


def test_half_configured_tls_stops_the_start_naming_the_field(tmp_path, pki):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--models-dir",
            str(tmp_path),
            "--tls-cert",
            str(pki["server_cert"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        proc.returncode == 2
        and "tls_cert and tls_key go together" in proc.stderr
        and "Traceback" not in proc.stderr
    )
