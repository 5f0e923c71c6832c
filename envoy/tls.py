"""TLS on Envoy's listener: the operator's certificate and key, served through a file-based SDS secret.

The listener does not name the certificate files itself (a static `tls_certificates` entry is
read once, at start). It names a *secret file* (`secret()`, written beside envoy.yaml) that
Envoy's secret discovery reads from disk and watches, together with the certificate and key
files it points to: a certificate replaced on disk (moved into its folder: `mv`, or a symlink
swap; an edit in place is not seen) is served to the next connection, without a restart.
ALPN offers `h2` (gRPC: workers, the SDK, grpcurl) and `http/1.1` (browsers and curl may use
either); the connection manager's AUTO codec follows what ALPN chose.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SECRET_NAME = "jobwire-server"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"


def secret(certificate: str | os.PathLike[str], key: str | os.PathLike[str]) -> dict[str, Any]:
    """The SDS file's content: one TLS secret naming the certificate chain and key (paths as given,
    so a container's mount point can be named; relative paths are resolved)."""
    chain = _absolute(certificate)
    tls_certificate = {
        "certificate_chain": {"filename": chain},
        "private_key": {"filename": _absolute(key)},
        # Reload on any move into the certificate's folder: `mv` of a new file, or a symlink swap
        # (Kubernetes secrets, certbot-style `live/` folders) that renames no file Envoy names.
        # Envoy then reads certificate and key together and keeps the old pair if they do not match.
        "watched_directory": {"path": str(Path(chain).parent)},
    }
    resource = {"@type": f"{_TLS}.Secret", "name": SECRET_NAME, "tls_certificate": tls_certificate}
    return {"resources": [resource]}


def _absolute(path: str | os.PathLike[str]) -> str:
    # Envoy resolves a relative path against its own working directory, not the caller's.
    return str(path) if Path(path).is_absolute() else str(Path(path).resolve())


def transport_socket(secret_file: str | os.PathLike[str]) -> dict[str, Any]:
    """A listener's DownstreamTlsContext whose certificate comes from the SDS file `secret_file`."""
    sds = {"name": SECRET_NAME, "sds_config": {"path_config_source": {"path": _absolute(secret_file)}}}
    context = {
        "@type": f"{_TLS}.DownstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificate_sds_secret_configs": [sds],
        },
    }
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}
