"""TLS material for grokserve's two gRPC services: server credentials (client API TLS; dispatch mTLS on
workers) and channel credentials (routers dialling workers with their client certificate)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path} ({exc.strerror})") from None


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str
    key_file: str
    ca_file: str | None = None  # set: peers must present a certificate signed by this CA (mutual TLS)
    server_name: str | None = None  # the name a dialling router expects in the worker's certificate

    def server_credentials(self) -> grpc.ServerCredentials:
        pair = [(_read(self.key_file, "key_file"), _read(self.cert_file, "cert_file"))]
        if self.ca_file is None:
            return grpc.ssl_server_credentials(pair)
        return grpc.ssl_server_credentials(pair, root_certificates=_read(self.ca_file, "ca_file"),
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "ca_file") if self.ca_file else None,
            private_key=_read(self.key_file, "key_file"), certificate_chain=_read(self.cert_file, "cert_file"))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def dispatch_tls(ca_file: str | None, cert_file: str | None, key_file: str | None,
                 server_name: str | None = None) -> TlsFiles | None:
    """Mutual TLS material for router↔worker dispatch from the CLI's --dispatch-* options (None: plaintext)."""
    given = [ca_file, cert_file, key_file]
    if not any(given):
        return None
    if not (ca_file and cert_file and key_file):
        raise ValueError("dispatch mTLS needs --dispatch-ca, --dispatch-cert and --dispatch-key together")
    return TlsFiles(cert_file, key_file, ca_file, server_name)
