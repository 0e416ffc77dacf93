"""The interception CA: create one in a directory (`create_ca`), load and check it (`load_ca`).

A CA directory holds two PEM files: `ca.crt`, the certificate clients install (0644), and
`ca.key`, its private key (0600). Whoever reads `ca.key` can impersonate every server to every
client that trusts the certificate, so:

* the key file is created with O_EXCL and mode 0600 and chmod'ed to 0600 before a byte is written
  into it, whatever the umask (a umask only removes bits, but one of 0777 would leave the owner
  unable to read it); it is written under a temporary name and linked into place, so a crash
  never leaves half a key under the real name;
* an existing CA is never overwritten unless asked (`force`), and then it is replaced by
  rename(2), each file atomically (a reader between the two renames may see the new key with the
  old certificate: it says so, "does not match", and a retry finds both new);
* `load_ca` refuses a key file that group or others may read (mode & 0o077), as ssh refuses an
  unprotected private key: a warning would be printed once and ignored while the key stays
  readable; `chmod 600` is the one-line fix and the error says so.

Key type: ECDSA on P-256 with SHA-256 signatures, for the CA and for the leaves (see `forge`).
Every client in scope verifies it: OpenSSL/curl, Firefox (NSS), Chrome, Android (ECDSA
certificates since 4.0; P-256 is the curve the Android CTS requires), Windows (CNG, since Vista)
and macOS/iOS. It is what mitmproxy's users could not have had with RSA: keys made in microseconds
(P-256 about 0.01 ms here, RSA-2048 about 27 ms, median of 20) and signatures about six times
cheaper (0.04 ms against 0.22 ms per leaf, cryptography 50). The clients it shuts out are those
with only RSA suites (Windows XP, Java 6): not worth intercepting. An existing RSA CA (2048 bits
or more) loads too.

The certificate: subject "tproxy interception CA (HOST, created DATE)" with O=tproxy (so it is
easy to find, and to tell apart from another box's), basicConstraints CA:TRUE with pathlen 0
(critical: it signs leaves, never another CA), keyUsage keyCertSign and cRLSign (critical),
subject and authority key identifiers, a random 159-bit serial, valid from one day before
creation (for client clocks that are behind) for ten years. No name constraints: it has to sign
for any name a rule intercepts.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

CERT_FILE = "ca.crt"
KEY_FILE = "ca.key"
CA_VALIDITY = timedelta(days=3650)
# Certificates start a day early: a client whose clock is behind (or set to local time and read as
# UTC, up to 14 hours off) still accepts them.
BACKDATE = timedelta(days=1)
ORGANIZATION = "tproxy"
# X.509's upper bound for a common name (RFC 5280 appendix A, ub-common-name).
_MAX_CN_CHARS = 64
_MIN_RSA_BITS = 2048

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CAError(Exception):
    """A CA that cannot be created or used: one sentence for the operator, naming the file."""


@dataclass(frozen=True)
class CA:
    """A loaded CA: its certificate and key, checked to belong together.

    Args:
        cert: the CA certificate.
        key: its private key.
        directory: where it was loaded from (for messages).
    """

    cert: x509.Certificate
    key: CAKey
    directory: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def subject_key_identifier(self) -> x509.SubjectKeyIdentifier:
        """Its SKI extension if it has one, else one computed from its key (what a leaf's
        authorityKeyIdentifier must repeat)."""
        try:
            return self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())


def ca_common_name(hostname: str, created: datetime) -> str:
    """The CA's common name, with the host cut short to fit X.509's 64 characters."""
    date = created.strftime("%Y-%m-%d")
    room = _MAX_CN_CHARS - len(f"tproxy interception CA (, created {date})")
    host = hostname if len(hostname) <= room else hostname[: room - 3] + "..."
    return f"tproxy interception CA ({host}, created {date})"


def build_ca(
    now: datetime, hostname: str, key: CAKey | None = None
) -> tuple[x509.Certificate, CAKey]:
    """A new self-signed CA certificate and its key (pure but for the key's randomness).

    Args:
        now: the creation time (aware).
        hostname: the machine's name, in the subject so one box's CA is told from another's.
        key: the key to use; None makes a P-256 one.
    """
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, ca_common_name(hostname, now)),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def create_ca(
    directory: str | os.PathLike[str],
    *,
    force: bool = False,
    now: datetime | None = None,
    hostname: str | None = None,
) -> CA:
    """Create a CA in `directory` (made, mode 0700, if missing): `ca.crt` (0644), `ca.key` (0600).

    Args:
        directory: the CA directory.
        force: replace an existing CA (each file atomically); without it, refuse.
        now: the creation time; None: the clock's.
        hostname: for the subject; None: this machine's name.

    Raises:
        CAError: the files exist (without `force`), or the directory cannot be written.
    """
    folder = Path(directory)
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    if not force:
        for path in (key_path, cert_path):
            if os.path.lexists(path):
                raise CAError(f"{path} exists; 'tproxy ca create --force' replaces the CA")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CAError(f"cannot create {folder}: {exc.strerror}") from None
    if not folder.is_dir():
        raise CAError(f"{folder} is not a directory")
    cert, key = build_ca(now or datetime.now(UTC), hostname or socket.gethostname())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key first: a certificate without its key is never left behind for clients to trust.
    _install(key_path, key_pem, 0o600, replace=force)
    try:
        _install(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, replace=force)
    except CAError:
        if not force:
            key_path.unlink(missing_ok=True)  # ours: linked a moment ago
        raise
    _sync_directory(folder)
    return CA(cert, key, folder)


def _sync_directory(folder: Path) -> None:
    """Make the new names durable (a crash after `ca create` said so keeps the CA)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a filesystem that cannot sync a directory: the files themselves are synced
    finally:
        os.close(fd)


def _install(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write `data` to `path` with `mode`: under a new temporary name first (O_EXCL, the mode set
    before anything is written), then linked into place (refusing an existing file) or renamed
    over it (`replace`)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o600)
    except OSError as exc:
        raise CAError(f"cannot write in {path.parent}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits from the owner too
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if the file appeared meanwhile: never overwrites
    except FileExistsError:
        raise CAError(f"{path} exists; 'tproxy ca create --force' replaces the CA") from None
    except OSError as exc:
        raise CAError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)


def read_ca_cert(directory: str | os.PathLike[str]) -> x509.Certificate:
    """The CA certificate of `directory` (no check of the key: `load_ca` does that).

    Raises:
        CAError: no such directory or file, unreadable, or not a PEM certificate.
    """
    folder = _existing_dir(directory)
    path = folder / CERT_FILE
    data, _ = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CAError(f"{path} is not a PEM certificate") from None
    except Exception as exc:  # cryptography has more ways to refuse (see forge.read_upstream_cert)
        raise CAError(f"{path} is not a certificate ({type(exc).__name__}: {exc})") from None


def load_ca(directory: str | os.PathLike[str], *, now: datetime | None = None) -> CA:
    """The CA of `directory`, checked to be usable for forging.

    Args:
        directory: the CA directory (`tproxy run --ca DIR`).
        now: the time to check validity at; None: the clock's.

    Raises:
        CAError: one sentence naming the file and the fix: a missing directory or file, a file
            that cannot be read (permissions), a key readable by group or others, a file that is
            not PEM (or an encrypted key), a key of an unsupported kind, a key that is not the
            certificate's, a certificate that is not a CA's, expired or not yet valid.
    """
    folder = _existing_dir(directory)
    cert = read_ca_cert(folder)
    key_path = folder / KEY_FILE
    key_pem, mode = _read(key_path, "key")
    if mode & 0o077:
        raise CAError(
            f"{key_path} may be read by group or others (mode {mode:04o}): whoever reads it can "
            f"impersonate any server to the CA's clients; chmod 600 {key_path}"
        )
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CAError(f"{key_path} is encrypted; tproxy needs the key unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CAError(f"{key_path} is not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CAError(f"{key_path} is an RSA key of {key.key_size} bits; clients want 2048+")
    elif not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{key_path} is neither an EC nor an RSA key, which clients would refuse")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != cert.public_key().public_bytes(der, public):
        raise CAError(f"{key_path} is not the key of {folder / CERT_FILE}")
    _check_is_ca(cert, folder / CERT_FILE)
    _check_validity(cert, folder / CERT_FILE, now or datetime.now(UTC))
    return CA(cert, key, folder)


def _existing_dir(directory: str | os.PathLike[str]) -> Path:
    folder = Path(directory)
    if not folder.is_dir():
        what = "not a directory" if folder.exists() else "no such directory"
        raise CAError(f"{folder}: {what} (create a CA with 'tproxy ca create {folder}')")
    return folder


def _read(path: Path, what: str) -> tuple[bytes, int]:
    """The file's bytes and mode (of the file opened, so the two belong together)."""
    try:
        with path.open("rb") as file:
            mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
            return file.read(1 << 20), mode
    except FileNotFoundError:
        raise CAError(
            f"{path}: no such file (the CA's {what}; 'tproxy ca create' makes both files)"
        ) from None
    except PermissionError:
        raise CAError(f"cannot read {path}: permission denied (run as its owner)") from None
    except OSError as exc:
        raise CAError(f"cannot read {path}: {exc.strerror}") from None


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        extensions = cert.extensions
    except Exception as exc:  # ValueError, DuplicateExtension, ...
        raise CAError(f"{path} has malformed extensions ({type(exc).__name__}: {exc})") from None
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CAError(f"{path} is not a CA certificate (no basicConstraints CA:TRUE)")
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CAError(f"{path} may not sign certificates (its keyUsage lacks keyCertSign)")


def _check_validity(cert: x509.Certificate, path: Path, now: datetime) -> None:
    if now > cert.not_valid_after_utc:
        raise CAError(
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; create a new CA "
            "(and install it on the clients)"
        )
    if now < cert.not_valid_before_utc:
        raise CAError(
            f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "is this machine's clock right?"
        )
