"""Forged leaf certificates: their validity, their extensions, and a cache so that a repeat costs
no signing. No I/O; the clock is an argument.

Theory of operation. One leaf key (ECDSA P-256) is made per process and carries every forged
leaf, as sslsplit and mitmproxy do: a leaf then costs one signature and no key generation. The
names come from `names.choose_names`; the rest is fixed:

* validity: from one day before now (client clocks that are behind; never before the CA's own
  start) to the earliest of 397 days later, the CA's end and the upstream certificate's end.
  397 days keeps every leaf inside the 398-day limit Apple and Chrome put on server certificates
  (they exempt user-installed roots today; staying inside costs nothing, since leaves are
  re-forged long before). A leaf never outlives the upstream's certificate, so an expired upstream
  certificate stays expired for the client (when upstream verification is off and lets one
  through at all).
* extensions: basicConstraints CA:FALSE (critical), keyUsage digitalSignature (critical; plus
  keyEncipherment for an RSA leaf key), extendedKeyUsage serverAuth, subjectAltName (every name
  `choose_names` chose: the SNI alone when the client sent one; clients ignore the common
  name), subjectKeyIdentifier, and authorityKeyIdentifier from the CA's subjectKeyIdentifier
  (what OpenSSL's X509_V_FLAG_X509_STRICT, Python 3.13's default, demands). The subject is
  CN=the first DNS name (when it fits X.509's 64 characters), O=tproxy.
* serial: 159 random bits (`x509.random_serial_number`; the CA/Browser Forum asks for 64 or more).

The cache is an LRU of `DEFAULT_CACHE_SIZE` leaves keyed by the leaf's names (in order) and the
upstream certificate's end of validity. A cached leaf is used while it has more than a day to run,
or when a new one would end no later (its end is the upstream's or the CA's).

Measured (cryptography 50.0.2 on OpenSSL 3, this machine, medians): forging a leaf with one name
over the shared key, signed by a P-256 CA, takes about 0.07 ms (2000 leaves); with 100 names about
0.29 ms; a cache hit about 2 µs (4 µs for 100 names: what `choose_names` said for the same inputs
is cached too); making the P-256 leaf key about 0.009 ms, once per process (RSA-2048: about
27 ms). An RSA-2048 CA makes each signature about 0.18 ms dearer (0.22 ms against 0.04 ms).
Cheap enough to forge on the event loop: no thread or process pool.
"""

from __future__ import annotations

import ipaddress
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tproxy.core.endpoint import IPAddress
from tproxy.tls.ca import BACKDATE, CA, ORGANIZATION
from tproxy.tls.names import (
    MAX_UPSTREAM_NAMES,
    LeafName,
    LeafNames,
    NameRejected,
    UpstreamCertFacts,
    choose_names,
    shown,
)

LEAF_MAX_VALIDITY = timedelta(days=397)
# A cached leaf with less than this to run is forged again (when a new one would last longer).
REFRESH_BEFORE = timedelta(days=1)
# HAProxy's default for its generated-certificate cache (tune.ssl.ssl-ctx-cache-size is 1000).
DEFAULT_CACHE_SIZE = 1024
_MAX_CN_CHARS = 64
# An upstream certificate larger than this is read again for each session rather than kept as
# a cache key: certificates with a hundred names take about 4 KiB; OpenSSL accepts up to 100 KiB
# (max_cert_list), which 1024 cached keys would make 100 MiB.
MAX_CACHED_CERT_BYTES = 16 * 1024

LeafKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
K = TypeVar("K")
V = TypeVar("V")


def new_leaf_key() -> LeafKey:
    """The one key every forged leaf of this process carries (P-256: about 0.01 ms)."""
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class ForgedLeaf:
    """A forged certificate and what a TLS server needs to present it.

    Args:
        cert: the leaf.
        names: the names it carries, and those left out (for the session's log).
        chain_pem: the leaf then the CA certificate, PEM: `load_cert_chain`'s certfile.
    """

    cert: x509.Certificate
    names: LeafNames
    chain_pem: bytes

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc


def leaf_validity(
    now: datetime, ca: x509.Certificate, upstream_not_after: datetime | None
) -> tuple[datetime, datetime]:
    """A leaf's notBefore and notAfter (whole seconds, as a certificate holds them).

    Args:
        now: the time of forging (aware).
        ca: the CA certificate (a leaf lies within its validity).
        upstream_not_after: the upstream certificate's end, if known.
    """
    now = now.replace(microsecond=0)
    not_before = max(now - BACKDATE, ca.not_valid_before_utc)
    not_after = min(not_before + LEAF_MAX_VALIDITY, ca.not_valid_after_utc)
    if upstream_not_after is not None:
        not_after = min(not_after, upstream_not_after.replace(microsecond=0))
    if not_after <= not_before:  # an expired upstream certificate: expired for the client too
        not_before = not_after - BACKDATE
    return not_before, not_after


def read_upstream_cert(der: bytes) -> UpstreamCertFacts | NameRejected:
    """What forging needs of the upstream's certificate (`SSLObject.getpeercert(True)`); never
    raises: a certificate that cannot be read is a `NameRejected`. Remembered for the last
    `DEFAULT_CACHE_SIZE` certificates up to `MAX_CACHED_CERT_BYTES`: an upstream shows every
    session the same one, and reading it costs about 30 µs (a certificate with 31 names), the
    lookup under 1 µs. At most `MAX_UPSTREAM_NAMES` of its names are kept (`unread` counts the
    rest): a certificate built with thousands (up to about 7000 fit in what OpenSSL accepts)
    would otherwise make every cached entry, and every later step, that large.

    In theory cryptography reports a malformed certificate with ValueError; in practice,
    fuzzing a real certificate's bytes also brought DuplicateExtension, InvalidVersion,
    UnsupportedGeneralNameType and TypeError, and warnings (a negative serial, a country name of
    the wrong length) that would print on stderr once per process. Any of them means the same
    here, so this one place catches them all, warnings silenced.
    """
    if len(der) > MAX_CACHED_CERT_BYTES:
        return _read_upstream_cert_safely(der)
    return _read_upstream_cert_cached(der)


@lru_cache(maxsize=DEFAULT_CACHE_SIZE)
def _read_upstream_cert_cached(der: bytes) -> UpstreamCertFacts | NameRejected:
    return _read_upstream_cert_safely(der)


def _read_upstream_cert_safely(der: bytes) -> UpstreamCertFacts | NameRejected:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_upstream_cert(der)
    except Exception as exc:  # the bytes come from the network: see above
        return NameRejected(
            f"the upstream certificate cannot be read ({type(exc).__name__}: {shown(str(exc))})"
        )


def _read_upstream_cert(der: bytes) -> UpstreamCertFacts:
    cert = x509.load_der_x509_certificate(der)
    try:
        alt_names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        dns: list[str] = []
        ips: list[IPAddress] = []
    else:
        dns = alt_names.get_values_for_type(x509.DNSName)
        ips = [
            ip
            for ip in alt_names.get_values_for_type(x509.IPAddress)
            if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
        ]
    common_names = [
        a.value
        for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if isinstance(a.value, str)
    ]
    kept_dns = dns[:MAX_UPSTREAM_NAMES]
    kept_ips = ips[: MAX_UPSTREAM_NAMES - len(kept_dns)]
    return UpstreamCertFacts(
        dns_names=tuple(kept_dns),
        ip_addresses=tuple(kept_ips),
        common_name=common_names[0] if common_names else None,
        not_after=cert.not_valid_after_utc,
        unread=len(dns) + len(ips) - len(kept_dns) - len(kept_ips),
    )


class _LRU(Generic[K, V]):
    """A dict that keeps its `capacity` most recently used entries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


class LeafForger:
    """Forges leaves signed by one CA over one leaf key, with an LRU cache.

    Args:
        ca: the CA that signs.
        leaf_key: the key every leaf carries; None makes one (`new_leaf_key`).
        capacity: how many leaves the cache keeps.

    `signed` counts signatures (cache misses), `hits` the leaves the cache answered. One per
    worker process, used from its event loop only (not thread-safe, and needs no lock there).
    """

    def __init__(
        self, ca: CA, *, leaf_key: LeafKey | None = None, capacity: int = DEFAULT_CACHE_SIZE
    ) -> None:
        self.ca = ca
        self.leaf_key = leaf_key if leaf_key is not None else new_leaf_key()
        self.capacity = capacity
        self.signed = 0
        self.hits = 0
        self._leaves: _LRU[tuple[tuple[LeafName, ...], datetime | None], ForgedLeaf] = _LRU(
            capacity
        )
        # What choose_names said for the same inputs: a hit then costs no name checks (for an
        # upstream certificate with a hundred names, they would cost more than the lookup).
        self._chosen: _LRU[
            tuple[str | None, UpstreamCertFacts | None, IPAddress | None],
            LeafNames | NameRejected,
        ] = _LRU(capacity)
        self._ca_pem = ca.cert_pem
        self._leaf_ski = x509.SubjectKeyIdentifier.from_public_key(self.leaf_key.public_key())
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.subject_key_identifier
        )

    @property
    def leaf_key_pem(self) -> bytes:
        """The leaf key, PEM (unencrypted): `load_cert_chain`'s keyfile."""
        return self.leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __len__(self) -> int:
        return len(self._leaves)

    def leaf_for(
        self,
        sni: str | None,
        upstream: UpstreamCertFacts | None,
        now: datetime,
        destination: IPAddress | None = None,
    ) -> ForgedLeaf | NameRejected:
        """The leaf for a session: from the cache, or forged and cached.

        Args:
            sni: the client's SNI as sniffed, or None.
            upstream: the upstream certificate's facts (`read_upstream_cert`), or None to forge
                from the SNI alone.
            now: the current time (aware).
            destination: the original destination, the name of last resort.

        Returns:
            The leaf, or why none can be forged (never raises for what the client or the
            upstream sent).
        """
        inputs = (sni, upstream, destination)
        names = self._chosen.get(inputs)
        if names is None:
            names = choose_names(sni, upstream, destination)
            self._chosen.put(inputs, names)
        if isinstance(names, NameRejected):
            return names
        upstream_not_after = upstream.not_after if upstream is not None else None
        key = (names.names, upstream_not_after)
        not_before, not_after = leaf_validity(now, self.ca.cert, upstream_not_after)
        cached = self._leaves.get(key)
        if cached is not None and cached.not_after >= min(not_after, now + REFRESH_BEFORE):
            self.hits += 1
            return cached if cached.names == names else replace(cached, names=names)
        try:
            cert = self._sign(names.names, not_before, not_after)
        except ValueError as exc:  # a name the checks let through and cryptography did not
            return NameRejected(f"cannot forge a certificate: {exc}")
        self.signed += 1
        leaf = ForgedLeaf(cert, names, cert.public_bytes(serialization.Encoding.PEM) + self._ca_pem)
        self._leaves.put(key, leaf)
        return leaf

    def _sign(
        self, names: tuple[LeafName, ...], not_before: datetime, not_after: datetime
    ) -> x509.Certificate:
        attributes = []
        first = names[0]
        if isinstance(first, str) and len(first) <= _MAX_CN_CHARS:
            attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, first))
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION))
        alt_names: list[x509.GeneralName] = [
            x509.DNSName(name) if isinstance(name, str) else x509.IPAddress(name) for name in names
        ]
        rsa_key = isinstance(self.leaf_key, rsa.RSAPrivateKey)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.ca.cert.subject)
            .public_key(self.leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=rsa_key,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(self._leaf_ski, critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self.ca.key, hashes.SHA256())
        )
