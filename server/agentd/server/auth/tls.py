"""Server TLS credentials whose files are re-read when they change, without a restart.

gRPC asks ``CertificateFiles.fetch`` for the configuration at every new TLS handshake
(on a gRPC thread); it answers ``None`` (keep the current one) unless a file's mtime,
size or inode changed, so a renewed certificate (cert-manager, certbot, a rotated
Kubernetes secret, which swaps a symlink) is used by the next connection while existing
connections carry on. A half-written or mismatched pair is logged and the previous
configuration keeps serving.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc

log = logging.getLogger("agentd.tls")


class CertificateFiles:
    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self._files = (cert_file, key_file, *((client_ca_file,) if client_ca_file else ()))
        self._client_ca = client_ca_file is not None
        self._lock = threading.Lock()
        self._signature = self._stat()
        self.initial = self._config()

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        signature = []
        for path in self._files:
            stat = path.stat()  # follows symlinks: a swapped Kubernetes secret shows as a change
            signature.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(signature)

    def _config(self) -> grpc.ServerCertificateConfiguration:
        chain, key = self._files[0].read_bytes(), self._files[1].read_bytes()
        root = self._files[2].read_bytes() if self._client_ca else None
        _check_pair(chain, key)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=root)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-config fetcher: a new configuration when the files changed, else None."""
        with self._lock:
            try:
                signature = self._stat()
                if signature == self._signature:
                    return None
                config = self._config()
            except (OSError, ValueError) as exc:
                log.error("TLS files changed but cannot be loaded; the previous certificate keeps serving: %s", exc)
                return None
            self._signature = signature
            log.info("TLS certificate reloaded from %s", self._files[0])
            return config


def _check_pair(chain: bytes, key: bytes) -> None:
    """Refuse a certificate whose key does not match: gRPC would fail every handshake instead."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(chain)
        private = serialization.load_pem_private_key(key, password=None)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate and unencrypted private key: {exc}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(serialization.Encoding.DER, public) != private.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise ValueError("the private key does not match the certificate")


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None
) -> grpc.ServerCredentials:
    """TLS credentials; with a client CA, every client must present a certificate it signed (mTLS)."""
    files = CertificateFiles(cert_file, key_file, client_ca_file)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=client_ca_file is not None
    )
