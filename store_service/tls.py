"""TLS for shard servers and their clients, through grpc's standard credentials.

    server: serve_shard(shard, tls=ServerTls.from_files("server.crt", "server.key"))
            (client_ca=...: mutual TLS, only clients with a certificate signed by it connect)
    client: connect(addresses, token=..., tls=ClientTls.from_files("ca.crt"))
            (cert/key: the client's own certificate, for mutual TLS)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


def _read(path) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


@dataclass(frozen=True)
class ServerTls:
    cert_chain: bytes              # PEM: the server's certificate (and intermediates)
    private_key: bytes             # PEM
    client_ca: bytes | None = None  # PEM: when set, clients must present a certificate it signed

    @staticmethod
    def from_files(cert: str, key: str, client_ca: str | None = None) -> "ServerTls":
        return ServerTls(_read(cert), _read(key), _read(client_ca))

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


@dataclass(frozen=True)
class ClientTls:
    root_ca: bytes                   # PEM: the CA (or self-signed certificate) the server's certificate chains to
    cert_chain: bytes | None = None  # PEM: this client's certificate (mutual TLS)
    private_key: bytes | None = None
    server_name: str = ""            # the name to check the server's certificate against ("": the address's host)

    @staticmethod
    def from_files(ca: str, cert: str | None = None, key: str | None = None, server_name: str = "") -> "ClientTls":
        return ClientTls(_read(ca), _read(cert), _read(key), server_name)

    def channel(self, address: str, options: list) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(self.root_ca, self.private_key, self.cert_chain)
        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(address, creds, options=list(options) + extra)
