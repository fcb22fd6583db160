"""Server credentials for TLS and mutual TLS, from the certificate settings.

Half a configuration is refused at startup rather than quietly serving in plaintext: a key
without a certificate, or a client CA without a server certificate, is an error.
"""

from __future__ import annotations

import logging

import grpc

from qwen_grpc.config import Settings

_LOGGER = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """The TLS settings are incomplete or unreadable."""


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials if a certificate is configured, else ``None`` (plaintext).

    With ``tls_client_ca_file`` the server requires a client certificate signed by that CA
    (mutual TLS); the certificate's identity then names the client for rate limits and logs.
    """
    cert, key, client_ca = (
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file,
    )
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return None
    if cert is None or key is None:
        raise TlsConfigError("TLS needs both tls_cert_file and tls_key_file")
    try:
        chain = cert.read_bytes()
        private_key = key.read_bytes()
        root = client_ca.read_bytes() if client_ca is not None else None
    except OSError as exc:
        raise TlsConfigError(f"cannot read a TLS file: {exc}") from exc
    _LOGGER.info("TLS on%s", " with client certificates required" if root else "")
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=root, require_client_auth=root is not None
    )
