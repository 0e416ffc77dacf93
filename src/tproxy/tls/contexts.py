"""The `ssl.SSLContext`s of interception: one per forged leaf and ALPN toward clients
(`LeafContexts`), one per verification mode and ALPN list toward upstreams (`UpstreamContexts`),
each made once and cached (bounded).

Why contexts are cached per ALPN. The stdlib sets ALPN on a context, not on a connection
(`set_alpn_protocols`), and the two legs of a session must agree: the upstream is offered the
client's own list, and the client is offered exactly what the upstream chose. So a context is
keyed by the ALPN it carries. The keys must stay few, since a new verifying upstream context
loads the trust store on the event loop (below): the upstream is offered only the protocols of
`UPSTREAM_ALPN` the client offered, in the client's order, so at most 16 lists exist (browsers
send `h2,http/1.1`, others `http/1.1` or none), and the cache holds them all; upstreams choose
among those three protocols.

How a forged leaf reaches OpenSSL. `SSLContext.load_cert_chain` reads files only. The leaf key
and the leaf certificate are written into an anonymous memory file (`memfd_create(2)`) and loaded
through its `/proc/self/fd/N` path: the private key never touches a filesystem, and nothing is
left to clean up after a crash. Without /proc (an unusual container), a file in a private
directory (mode 0700) on /dev/shm (tmpfs) is written, loaded and unlinked at once. Only the leaf
is presented, not the CA: the client has the CA as a trust anchor, and sending it costs each
handshake about 500 bytes (and each new context 0.1 ms).

Measured on this machine (2 cores, Python 3.11.7, OpenSSL 3.0.19, medians of 300): a new server
context with a leaf loaded costs about 0.55-0.65 ms (0.09 ms of it the bare `SSLContext`, the rest
OpenSSL decoding the PEM key and certificate; memfd and tmpfs cost the same); a cached one costs
a dict lookup. Choosing the context: each session's client leg is made from the leaf's context
directly (`wrap_bio` with it). The two ways cost the same (measured: our first flight 151 µs
made directly, 148 µs through a front context whose `sni_callback` switches to the leaf's), but
the leaf's context depends on more than the SNI -- the ALPN the upstream chose, the upstream's
certificate -- all known before the client leg exists, and nothing then runs inside OpenSSL's
callback (where an exception would be lost). A new upstream context loads the system's trust
store (144 CAs from /etc/ssl/certs/ca-certificates.crt): 16-20 ms, once per ALPN list.

Both kinds of context refuse TLS 1.2 renegotiation (`OP_NO_RENEGOTIATION`; TLS 1.3 has none) and
older versions than TLS 1.2, and carry the handshake observer of `legs` (`_msg_callback`, see
there); toward upstreams, TLS 1.2 is offered with ECDHE suites only (`UPSTREAM_TLS12_CIPHERS`).
Once its handshake is done, a leg moves its connection to `established`, one bare context per side
without the observer: the observer costs a Python call per TLS record (measured: reading
a 100-byte record 2.9 µs without, 7.3 µs with it; a 16 KiB one 11.0 µs against 14.9 µs), and an
established connection needs nothing of its context any more (its keys, its peer's certificate
and its session are its own; renegotiation, which would need the certificate again, is refused).

The key log (`--keylog`). `SSLContext.keylog_filename` makes each context open the file itself,
by its path (`fopen(path, "a")`, kept open): one descriptor per cached context (up to
`KEYLOG_DESCRIPTORS` of them, which the server takes out of its descriptor budget), and each
later open would follow whatever the path is by then, a symbolic link included. So `open_keylog`
opens the file once per process (O_NOFOLLOW, 0600, a regular file not readable by group or
others), and the contexts are handed that descriptor's `/proc/self/fd/N` instead of the path:
each context's own open then reaches the same file whatever the path has become (the stdlib has
no key log callback to write through one descriptor).
"""

from __future__ import annotations

import _ssl
import contextlib
import errno
import os
import ssl
import stat
import tempfile
from collections import OrderedDict
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from tproxy.core.options import ConfigError
from tproxy.tls.forge import ForgedLeaf
from tproxy.tls.legs import ObservedSSLObject, observe_handshake
from tproxy.tls.resumption import UpstreamSessions

UPSTREAM_ALPN = ("h2", "http/1.1", "http/1.0")
"""The ALPN protocols an upstream is offered, those of them the client offered (`usable_alpn`).

Each distinct list is a context of its own, and a verifying one costs 16-20 ms of the event loop
and about 830 KiB (the trust store): were the client's list passed on as it is, each connection
with a list never seen before would cost that, and push the common lists out of the cache (review
rv3). The three protocols of HTTPS over TCP are kept. Any other (`acme-tls/1`, `dot`, `imap`,
`xmpp-client`, a made-up one) is not offered upstream: the upstream sees the client's HTTP
protocols or no ALPN at all, and the client is offered what the upstream chose. A client that
requires another protocol then fails its handshake with us (no_application_protocol): such
traffic is not HTTPS, and is better passed through by a rule than intercepted."""
# Every list `usable_alpn` can give: the ordered selections of UPSTREAM_ALPN (1 + 3 + 6 + 6).
_ALPN_LISTS = 16
# Memory, measured: a leaf context holds about 21.5 KiB (1024 of them: 22 MiB per worker); a
# verifying upstream context about 830 KiB (the system's 144 CAs parsed), a non-verifying one a
# few KiB. Room for every ALPN list in both modes: nothing a client sends evicts a context, and
# the worst case (16 verifying contexts) is about 13 MiB per worker.
DEFAULT_LEAF_CONTEXTS = 1024
DEFAULT_UPSTREAM_CONTEXTS = 2 * _ALPN_LISTS
KEYLOG_DESCRIPTORS = DEFAULT_LEAF_CONTEXTS + DEFAULT_UPSTREAM_CONTEXTS + 1
"""The descriptors key logging may hold: one per cached context with the key log (each opens
it), and `open_keylog`'s own."""
PEM = Encoding.PEM
UPSTREAM_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""The TLS 1.2 suites offered upstream (TLS 1.3's are OpenSSL's defaults, untouched): ECDHE only,
so that a TLS 1.2 upstream signs its key exchange with its certificate's key before it asks for
a client certificate (`legs.UpstreamLeg` believes it only then). An upstream that offers only
RSA key exchange (no forward secrecy; rare since about 2015) then fails as
`upstream_tls_failed`."""


class _LRU:
    """The `capacity` most recently used contexts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[Any, ssl.SSLContext] = OrderedDict()
        self.made = 0  # misses: contexts made

    def get(self, key: Any) -> ssl.SSLContext | None:
        context = self.entries.get(key)
        if context is not None:
            self.entries.move_to_end(key)
        return context

    def put(self, key: Any, context: ssl.SSLContext) -> None:
        self.made += 1
        self.entries[key] = context
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def usable_alpn(offered: tuple[str, ...]) -> tuple[str, ...]:
    """The ALPN list the upstream is offered for a client's: the names of `UPSTREAM_ALPN` it
    offered, in its order, without repeats (see `UPSTREAM_ALPN` for why no others). Other names
    are left out as they are: compared exactly (ALPN names are bytes: `H2` is not `h2`)."""
    names: list[str] = []
    for name in offered:
        if name in UPSTREAM_ALPN and name not in names:
            names.append(name)
            if len(names) == len(UPSTREAM_ALPN):
                break
    return tuple(names)


def _harden_upstream(context: ssl.SSLContext) -> None:
    """TLS 1.2 with a signed key exchange only: see `UPSTREAM_TLS12_CIPHERS`."""
    _harden(context)
    context.set_ciphers(UPSTREAM_TLS12_CIPHERS)


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION


def _observe(context: ssl.SSLContext) -> None:
    """Handshakes on `context` make `ObservedSSLObject`s that `observe_handshake` informs.

    The callback is set on the C level (`_ssl._SSLContext`'s own `_msg_callback`), under the
    `ssl` module's Python wrapper, which converts three numbers to enums on each of the ~30
    calls of a handshake (measured: about 40 µs per intercepted connection); the observer
    compares plain numbers."""
    context.sslobject_class = ObservedSSLObject
    with contextlib.suppress(AttributeError, TypeError):  # a private API: best effort
        raw = getattr(_ssl._SSLContext, "_msg_callback", None)
        if raw is not None and hasattr(raw, "__set__"):
            raw.__set__(context, observe_handshake)
        else:
            context._msg_callback = observe_handshake  # type: ignore[attr-defined]


class UpstreamContexts:
    """Client contexts toward upstreams: verifying (against the system's trust store, or
    `cafile`) or not (`upstream_verify = false`), one per ALPN list offered.

    Args:
        cafile: a PEM bundle of CA certificates to verify upstreams against instead of the
            system's trust store (`--upstream-ca`); None: the system's.
        keylog: where to append the sessions' secrets (NSS key log format): the path
            `open_keylog` gives; None: no key log.
        capacity: how many contexts to keep.

    Raises:
        ssl.SSLError, OSError: `cafile` cannot be read or holds no CA certificate (the first
            context is made at once, so a bad file fails at load, not on the first session).
    """

    def __init__(
        self,
        cafile: str | None = None,
        *,
        keylog: str | None = None,
        capacity: int = DEFAULT_UPSTREAM_CONTEXTS,
    ) -> None:
        self.cafile = cafile
        self.keylog = keylog
        self._cache = _LRU(capacity)
        # Sessions to resume (`resumption`): they belong to these contexts, and go with them.
        self.sessions: UpstreamSessions[ssl.SSLSession] = UpstreamSessions()
        self.established = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.established.check_hostname = False
        self.established.verify_mode = ssl.CERT_NONE
        _harden_upstream(self.established)
        first = self.get(True, ())
        if cafile is not None and not first.cert_store_stats()["x509_ca"]:
            raise ssl.SSLError(f"{cafile} holds no CA certificate")

    def _make(self, verify: bool, alpn: tuple[str, ...]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _harden_upstream(context)
        if verify:
            if self.cafile is None:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            else:
                context.load_verify_locations(cafile=self.cafile)
            context.check_hostname = True
            context.verify_mode = ssl.CERT_REQUIRED
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if alpn:
            context.set_alpn_protocols(list(alpn))
        if self.keylog is not None:
            context.keylog_filename = self.keylog
        _observe(context)
        return context

    def get(self, verify: bool, alpn: tuple[str, ...]) -> ssl.SSLContext:
        """The handshake context for a session (made on first use; `alpn` as `usable_alpn`
        gives it)."""
        key = (verify, alpn)
        context = self._cache.get(key)
        if context is None:
            context = self._make(verify, alpn)
            self._cache.put(key, context)
        return context

    @property
    def made(self) -> int:
        return self._cache.made


def open_keylog(path: str) -> tuple[int, str]:
    """Open the key log file for this process (`--keylog`): created 0600 if missing, appended to
    otherwise. Whoever reads it decrypts every intercepted session, so a symbolic link, anything
    but a regular file, and a file that group or others may read are refused (as the CA's key
    is: the fix is the user's to make, not a chmod behind their back).

    Returns:
        The descriptor (kept open for the process's life, close-on-exec) and the path the
        contexts open the same file by (`/proc/self/fd/N`; see the module docstring).

    Raises:
        ConfigError: one sentence naming the file.
    """
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise ConfigError(f"--keylog {path}: no such directory {folder}")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        # O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of blocking the start.
        fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"--keylog {path}: a symbolic link; give the file itself") from None
        raise ConfigError(f"--keylog {path}: cannot open it: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"--keylog {path}: not a regular file")
        if mode & 0o077:
            raise ConfigError(
                f"--keylog {path} may be read by group or others (mode {mode:04o}): whoever "
                f"reads it decrypts every intercepted session; chmod 600 {path}"
            )
        by_descriptor = f"/proc/self/fd/{fd}"
        if not os.path.exists(by_descriptor):
            raise ConfigError(f"--keylog {path}: needs /proc (to hand the contexts one file)")
    except BaseException:
        os.close(fd)
        raise
    return fd, by_descriptor


def write_memory_file(data: bytes) -> tuple[int, str]:
    """An anonymous memory file holding `data`: (descriptor, a path that opens it)."""
    fd = os.memfd_create("tproxy-leaf", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd, f"/proc/self/fd/{fd}"


def load_pem_chain(context: ssl.SSLContext, key_and_cert_pem: bytes) -> None:
    """`load_cert_chain` from bytes (the key, then the certificate): through a memory file, or
    a file in a private tmpfs directory where /proc is missing (see the module docstring)."""
    fd, path = write_memory_file(key_and_cert_pem)
    try:
        if os.path.exists(path):
            context.load_cert_chain(path)
            return
    finally:
        os.close(fd)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="tproxy-leaf-", dir=base) as folder:
        os.chmod(folder, 0o700)
        file = os.path.join(folder, "leaf.pem")
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, key_and_cert_pem)
        finally:
            os.close(fd)
        try:
            context.load_cert_chain(file)
        finally:
            os.unlink(file)


class LeafContexts:
    """Server contexts toward clients: one per forged leaf and ALPN protocol (LRU, bounded).

    Args:
        leaf_key_pem: the key every forged leaf carries (`LeafForger.leaf_key_pem`).
        keylog: where to append the sessions' secrets (NSS key log format): the path
            `open_keylog` gives; None: no key log.
        capacity: how many contexts to keep (each holds a parsed key and certificate, a few
            KiB).
    """

    def __init__(
        self,
        leaf_key_pem: bytes,
        *,
        keylog: str | None = None,
        capacity: int = DEFAULT_LEAF_CONTEXTS,
    ) -> None:
        self._key_pem = leaf_key_pem
        self.keylog = keylog
        self._cache = _LRU(capacity)
        self.established = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _harden(self.established)

    def get(self, leaf: ForgedLeaf, alpn: str | None) -> ssl.SSLContext:
        """The context presenting `leaf` and offering `alpn` (what the upstream chose; None:
        no ALPN), made on first use.

        Raises:
            ssl.SSLError: OpenSSL refuses the leaf (not expected for a leaf `forge` made).
        """
        # The chain's bytes object is the same for every session the forger's cache serves, and
        # a bytes object keeps its hash: the lookup costs no hashing of the PEM after the first.
        key = (leaf.chain_pem, alpn)
        context = self._cache.get(key)
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            _harden(context)
            load_pem_chain(context, self._key_pem + leaf.cert.public_bytes(PEM))
            if alpn is not None:
                context.set_alpn_protocols([alpn])
            if self.keylog is not None:
                context.keylog_filename = self.keylog
            _observe(context)
            self._cache.put(key, context)
        return context

    @property
    def made(self) -> int:
        return self._cache.made

    def __len__(self) -> int:
        return len(self._cache.entries)


def check_upstream_ca(path: str) -> None:
    """Refuse an `--upstream-ca` file that cannot be used, when the configuration is loaded (a
    bad bundle would otherwise fail every intercepted session).

    Raises:
        ConfigError: one sentence naming the file.
    """
    try:
        UpstreamContexts(path)
    except FileNotFoundError:
        raise ConfigError(f"--upstream-ca {path}: no such file") from None
    except ssl.SSLError as exc:
        why = exc.reason or exc.strerror or str(exc)
        raise ConfigError(
            f"--upstream-ca {path}: not a PEM file of CA certificates ({why})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"--upstream-ca {path}: cannot read it: {exc.strerror or exc}") from None
