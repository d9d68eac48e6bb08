"""TLS contexts for the HTTP API: the node's server side, and the client side
that agents and nodes (forwarding to the leader) use. Standard library only.

Both sides refuse anything older than TLS 1.2. The client side verifies the
peer's certificate and host name against ``ca_file``, or against the system's
trust store when none is given.
"""

from __future__ import annotations

import ssl

from coordinator.errors import InvalidInput


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The node's listening context. ``InvalidInput`` (naming ``tls_cert``)
    when the files do not hold a certificate and its private key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"tls_cert: cannot load {cert_file} with key {key_file}: {exc}", field="tls_cert") from None
    return context


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context trusting ``ca_file`` (else the system CAs).
    ``InvalidInput`` (naming ``tls_ca``) when ``ca_file`` holds no certificate."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"tls_ca: cannot load {ca_file}: {exc}", field="tls_ca") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
