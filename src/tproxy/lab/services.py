"""Real servers for the lab: nginx (HTTP, answers with the client address it saw; HTTPS with a
throw-away certificate, self-signed or issued by a throw-away CA), openssl s_server (HTTPS), the
checksum peer server, iperf3; and a readiness wait that polls `ss` instead of sleeping."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tproxy.lab.topology import Host, Lab, LabError, wait_until

HTTP_PORT = 80
TLS_PORT = 443
TLS_NAME = "www.example.test"
PEER_PORT = 9000
IPERF_PORT = 5201
UPSTREAM_CA_NAME = "tproxy lab upstream CA"

_NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    server {{
        listen {port}{listen_options};
        listen [::]:{port}{listen_options};{tls}
        location / {{
            default_type text/plain;
            return 200 "hello from the server; it saw you as $remote_addr\\n";
        }}
    }}
}}
"""


def is_listening(lab: Lab, host: Host, port: int) -> bool:
    result = lab.run(host, ["ss", "-Hltn", f"sport = :{port}"], check=False)
    return bool(result.stdout.strip())


def wait_listening(lab: Lab, host: Host, port: int, what: str, timeout_s: float = 10) -> None:
    wait_until(lambda: is_listening(lab, host, port), timeout_s, f"{what} to listen on {port}")


def start_nginx(lab: Lab, host: Host, port: int = HTTP_PORT) -> None:
    _run_nginx(lab, host, port, _workdir(lab, "nginx"))


def _workdir(lab: Lab, what: str) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-{what}-"))
    lab.cleanup_paths.append(workdir)
    return workdir


def _run_nginx(
    lab: Lab, host: Host, port: int, workdir: Path, *, listen_options: str = "", tls: str = ""
) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise LabError("nginx was not found: run scripts/bootstrap (apt-get install nginx)")
    conf = workdir / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(workdir=workdir, port=port,
                                       listen_options=listen_options, tls=tls))  # fmt: skip
    lab.start(host, [nginx, "-c", str(conf), "-e", "stderr"])
    wait_listening(lab, host, port, "nginx")


def _self_signed(lab: Lab, host: Host, workdir: Path, name: str) -> tuple[Path, Path]:
    """A throw-away self-signed EC certificate for `name` (CN and SAN): (key, certificate)."""
    if shutil.which("openssl") is None:
        raise LabError("openssl was not found: run scripts/bootstrap (apt-get install openssl)")
    key, cert = workdir / "key.pem", workdir / "cert.pem"
    lab.run(host, ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                   "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                   str(cert), "-days", "1", "-subj", f"/CN={name}",
                   "-addext", f"subjectAltName=DNS:{name}"])  # fmt: skip
    return key, cert


def start_tls_server(lab: Lab, host: Host, port: int = TLS_PORT, name: str = TLS_NAME) -> Path:
    """openssl s_server on `port` (IPv4 and IPv6) with a throw-away self-signed EC certificate
    for `name`; it answers any HTTP request with a status page (`-www`). Clients need `-k` (or
    the certificate, returned, as their CA)."""
    key, cert = _self_signed(lab, host, _workdir(lab, "tls"), name)
    for listen in (f"0.0.0.0:{port}", f"[::]:{port}"):  # s_server binds one family
        lab.start(host, ["openssl", "s_server", "-accept", listen, "-cert", str(cert),
                         "-key", str(key), "-www", "-quiet"])  # fmt: skip

    def both_listen() -> bool:
        listing = lab.run(host, ["ss", "-Hltn", f"sport = :{port}"], check=False)
        return len(listing.stdout.decode().splitlines()) == 2

    wait_until(both_listen, 10, f"openssl s_server to listen on {port} over IPv4 and IPv6")
    return cert


def start_tls_nginx(lab: Lab, host: Host, port: int = TLS_PORT, name: str = TLS_NAME) -> Path:
    """nginx with TLS and HTTP/2 (ALPN h2 and http/1.1) on `port`, IPv4 and IPv6, with a
    throw-away self-signed EC certificate for `name`, returned (a client's or tproxy's CA)."""
    workdir = _workdir(lab, "nginx-tls")
    key, cert = _self_signed(lab, host, workdir, name)
    _run_tls_nginx(lab, host, port, workdir, key=key, cert=cert)
    return cert


def start_issued_tls_nginx(
    lab: Lab, host: Host, names: Sequence[str], port: int = TLS_PORT
) -> ServerPKI:
    """nginx as `start_tls_nginx`, its certificate for all of `names` issued by a throw-away CA
    of its own (`UPSTREAM_CA_NAME`): the CA a client or tproxy (`--upstream-ca`) trusts for it,
    as it would trust a public CA for a real server."""
    workdir = _workdir(lab, "nginx-tls")
    pki = issue_server_certificate(workdir, names, datetime.now(UTC))
    _run_tls_nginx(lab, host, port, workdir, key=pki.key, cert=pki.cert)
    return pki


def _run_tls_nginx(
    lab: Lab, host: Host, port: int, workdir: Path, *, key: Path, cert: Path
) -> None:
    tls = f"\n        ssl_certificate {cert};\n        ssl_certificate_key {key};"
    _run_nginx(lab, host, port, workdir, listen_options=" ssl http2", tls=tls)


@dataclass(frozen=True)
class ServerPKI:
    """A throw-away CA and the server certificate it issued, as PEM files."""

    ca_cert: Path
    cert: Path
    key: Path


def issue_server_certificate(workdir: Path, names: Sequence[str], now: datetime) -> ServerPKI:
    """A throw-away CA (P-256, `UPSTREAM_CA_NAME`, valid a day) and a server certificate for
    `names` (subjectAltName; the first is the CN) it signs, written to `workdir`; nothing keeps
    the CA's key."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, UPSTREAM_CA_NAME)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    not_before, not_after = now - timedelta(hours=1), now + timedelta(days=1)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = ServerPKI(workdir / "upstream-ca.crt", workdir / "cert.pem", workdir / "key.pem")
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.touch(mode=0o600)
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """A CA's (`cert_sign`: certificates and CRLs) or a TLS server's (signatures) key usage."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


class PeerServer:
    """A running `tproxy.lab.peers` server; `ends()` is what it saw of each finished connection."""

    def __init__(self, lab: Lab, host: Host, port: int) -> None:
        workdir = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-peers-"))
        lab.cleanup_paths.append(workdir)
        self._log = workdir / f"peers-{port}.jsonl"
        with self._log.open("wb") as out:
            argv = [sys.executable, "-m", "tproxy.lab.peers", "serve", "--port", str(port)]
            self.proc = lab.start(host, argv, stdout=out)
        wait_listening(lab, host, port, "the peer server")

    def ends(self) -> list[dict[str, Any]]:
        lines = self._log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]


def start_peer_server(lab: Lab, host: Host, port: int = PEER_PORT) -> PeerServer:
    return PeerServer(lab, host, port)


def start_iperf_server(lab: Lab, host: Host, port: int = IPERF_PORT) -> None:
    if shutil.which("iperf3") is None:
        raise LabError("iperf3 was not found: run scripts/bootstrap (apt-get install iperf3)")
    lab.start(host, ["iperf3", "-s", "-p", str(port)])
    wait_listening(lab, host, port, "iperf3")
