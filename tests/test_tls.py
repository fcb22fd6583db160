"""TLS and mutual TLS, with a CA and certificates generated for the test run."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qwen_grpc.config import Settings
from qwen_grpc.interceptors.access_log import ACCESS_LOGGER
from qwen_grpc.logs import JsonFormatter
from qwen_grpc.tls import TlsConfigError, server_credentials
from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import RunningServer, ServerMaker


@dataclass(frozen=True)
class Pem:
    """A certificate and its private key, PEM-encoded, also written to files."""

    cert: bytes
    key: bytes
    cert_file: Path
    key_file: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    directory: Path,
    stem: str,
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_cert.subject if issuer_cert is not None else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    pem = Pem(
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert_file=directory / f"{stem}.crt",
        key_file=directory / f"{stem}.key",
    )
    pem.cert_file.write_bytes(pem.cert)
    pem.key_file.write_bytes(pem.key)
    return pem, cert, key


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    stranger: Pem  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _issue(directory, "ca", "qwen-grpc test CA", None)
    server, _, _ = _issue(directory, "server", "localhost", (ca_cert, ca_key), server=True)
    client, _, _ = _issue(directory, "client", "billing-service", (ca_cert, ca_key))
    _, other_cert, other_key = _issue(directory, "other-ca", "another CA", None)
    stranger, _, _ = _issue(directory, "stranger", "billing-service", (other_cert, other_key))
    return Pki(ca, server, client, stranger)


def _info(
    running: RunningServer, credentials: grpc.ChannelCredentials | None
) -> chat_pb2.GetModelInfoResponse:
    """One call over a fresh channel (secure if ``credentials``), so nothing is reused."""
    if credentials is None:
        channel = grpc.insecure_channel(running.server.address)
    else:
        channel = grpc.secure_channel(running.server.address, credentials)
    with channel:
        return chat_pb2_grpc.ChatServiceStub(channel).GetModelInfo(
            chat_pb2.GetModelInfoRequest(), timeout=5
        )


def _refused(running: RunningServer, credentials: grpc.ChannelCredentials | None) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _info(running, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_serves_trusting_clients_and_refuses_plaintext(
    make_server: ServerMaker, pki: Pki
) -> None:
    running = make_server(tls_cert_file=pki.server.cert_file, tls_key_file=pki.server.key_file)
    trusting = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    assert _info(running, trusting).context_length == 2048
    _refused(running, None)
    _refused(running, grpc.ssl_channel_credentials(root_certificates=pki.client.cert))


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    make_server: ServerMaker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER.name)
    running = make_server(
        tls_cert_file=pki.server.cert_file,
        tls_key_file=pki.server.key_file,
        tls_client_ca_file=pki.ca.cert_file,
    )

    def presenting(client: Pem | None) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=pki.ca.cert,
            private_key=None if client is None else client.key,
            certificate_chain=None if client is None else client.cert,
        )

    assert _info(running, presenting(pki.client)).context_length == 2048
    _refused(running, presenting(None))
    _refused(running, presenting(pki.stranger))
    [line] = [
        json.loads(JsonFormatter().format(r))
        for r in caplog.records
        if r.name == ACCESS_LOGGER.name
    ]
    assert line["client"] == "cert:billing-service"  # the certificate names the client


@pytest.mark.parametrize(
    "changes",
    [
        {"tls_cert_file": "server.crt"},
        {"tls_key_file": "server.key"},
        {"tls_client_ca_file": "ca.crt"},
        {"tls_cert_file": "missing.crt", "tls_key_file": "server.key"},
    ],
    ids=["cert-only", "key-only", "ca-only", "unreadable"],
)
def test_half_a_tls_configuration_is_refused_at_startup(pki: Pki, changes: dict[str, str]) -> None:
    directory = pki.ca.cert_file.parent
    settings = Settings(**{name: directory / file for name, file in changes.items()})  # type: ignore[arg-type]
    with pytest.raises(TlsConfigError):
        server_credentials(settings)


def test_no_tls_settings_means_plaintext() -> None:
    assert server_credentials(Settings()) is None
