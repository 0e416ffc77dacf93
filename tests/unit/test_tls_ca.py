"""The interception CA: a certificate clients accept as a CA, a key file that is 0600 from its
first byte whatever the umask, never overwritten without force, and every way a CA directory can
be unusable said in one sentence naming the file."""

from __future__ import annotations

import base64
import os
import re
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from tproxy.cli.main import main
from tproxy.tls.ca import (
    CA_VALIDITY,
    CAError,
    build_ca,
    ca_common_name,
    create_ca,
    load_ca,
    read_ca_cert,
)

NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    """Restores the process's umask after a test that sets its own."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def _write_ca(
    folder: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / "ca.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)


# --- creating -----------------------------------------------------------------------------------


def test_a_created_ca_is_a_ca_for_ten_years_named_after_its_host(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca", now=NOW, hostname="router1")
    cert = read_ca_cert(tmp_path / "ca")
    assert cert == ca.cert
    assert cert.subject.rfc4514_string() == (
        "O=tproxy,CN=tproxy interception CA (router1\\, created 2026-12-01)"
    )
    assert cert.issuer == cert.subject
    assert cert.not_valid_before_utc == NOW - timedelta(days=1)
    assert cert.not_valid_after_utc == NOW + CA_VALIDITY
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert (usage.value.key_cert_sign, usage.value.crl_sign) == (True, True)
    assert not usage.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.serial_number.bit_length() > 64
    cert.verify_directly_issued_by(cert)  # self-signed, and the signature is right


def test_serials_are_random(tmp_path: Path) -> None:
    serials = {build_ca(NOW, "h")[0].serial_number for _ in range(20)}
    assert len(serials) == 20


def test_a_long_host_name_is_cut_to_fit_a_common_name() -> None:
    name = ca_common_name("a" * 200, NOW)
    assert len(name) == 64
    assert name.startswith("tproxy interception CA (aaa")
    assert name.endswith("..., created 2026-12-01)")
    cert, _ = build_ca(NOW, "a" * 200)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o777])
@pytest.mark.usefixtures("umask")
def test_the_key_is_0600_and_the_certificate_0644_whatever_the_umask(
    tmp_path: Path, mask: int
) -> None:
    os.umask(mask)
    create_ca(tmp_path, now=NOW)
    assert _mode(tmp_path / "ca.key") == 0o600
    assert _mode(tmp_path / "ca.crt") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key"]  # no temp files
    load_ca(tmp_path, now=NOW)


def test_the_key_file_is_0600_before_anything_is_written_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every write into a file that becomes ca.key finds it 0600 already."""
    real_write = os.write
    modes: list[int] = []

    def spying_write(fd: int, data: bytes | memoryview) -> int:
        if b"PRIVATE KEY" in bytes(data):
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spying_write)
    old = os.umask(0)
    try:
        create_ca(tmp_path, now=NOW)
    finally:
        os.umask(old)
    assert modes == [0o600]


def test_a_missing_directory_is_made_private(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    create_ca(folder, now=NOW)
    assert _mode(folder) & 0o077 == 0
    assert (folder / "ca.key").is_file()


@pytest.mark.parametrize("existing", ["ca.key", "ca.crt"])
def test_an_existing_ca_is_never_overwritten_without_force(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(CAError) as error:
        create_ca(tmp_path, now=NOW)
    assert str(error.value) == (
        f"{tmp_path / existing} exists; 'tproxy ca create --force' replaces the CA"
    )
    assert (tmp_path / existing).read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == [existing]


def test_a_file_appearing_meanwhile_is_not_overwritten_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check before writing is not what protects the file: linking into place is."""
    real_link = os.link

    def racing_link(source: str | Path, target: str | Path) -> None:
        if Path(target).name == "ca.crt":
            Path(target).write_bytes(b"theirs")
        real_link(source, target)

    monkeypatch.setattr(os, "link", racing_link)
    with pytest.raises(CAError, match=r"ca\.crt exists"):
        create_ca(tmp_path, now=NOW)
    assert (tmp_path / "ca.crt").read_bytes() == b"theirs"
    # The key linked a moment before is ours and useless without its certificate: gone again.
    assert [p.name for p in tmp_path.iterdir()] == ["ca.crt"]


def test_force_replaces_the_ca(tmp_path: Path) -> None:
    old = create_ca(tmp_path, now=NOW)
    (tmp_path / "ca.key").chmod(0o600)
    new = create_ca(tmp_path, force=True, now=NOW)
    assert new.cert != old.cert
    loaded = load_ca(tmp_path, now=NOW)
    assert loaded.cert == new.cert
    assert _mode(tmp_path / "ca.key") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key"]


def test_a_directory_that_cannot_be_written_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(CAError) as error:
        create_ca(tmp_path / "file", now=NOW)
    assert str(error.value).startswith(f"cannot create {tmp_path / 'file'}: ")


# --- loading --------------------------------------------------------------------------------------


def test_loading_gives_back_what_was_created(tmp_path: Path) -> None:
    created = create_ca(tmp_path, now=NOW)
    loaded = load_ca(tmp_path, now=NOW)
    assert loaded.cert == created.cert
    assert loaded.directory == tmp_path
    assert loaded.not_after == NOW + CA_VALIDITY
    assert loaded.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    ski = loaded.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert loaded.subject_key_identifier == ski


def test_an_rsa_ca_loads_and_a_weak_one_does_not(tmp_path: Path) -> None:
    key = rsa.generate_private_key(65537, 2048)
    _write_ca(tmp_path / "good", build_ca(NOW, "h", key)[0], key)
    assert isinstance(load_ca(tmp_path / "good", now=NOW).key, rsa.RSAPrivateKey)
    weak = rsa.generate_private_key(65537, 1024)
    _write_ca(tmp_path / "weak", build_ca(NOW, "h", weak)[0], weak)
    with pytest.raises(CAError, match="RSA key of 1024 bits; clients want 2048"):
        load_ca(tmp_path / "weak", now=NOW)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ca"
    create_ca(folder, now=NOW)
    return folder


def _load_error(folder: Path, now: datetime = NOW) -> str:
    with pytest.raises(CAError) as error:
        load_ca(folder, now=now)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_missing_directory(tmp_path: Path) -> None:
    assert _load_error(tmp_path / "nope") == (
        f"{tmp_path / 'nope'}: no such directory (create a CA with 'tproxy ca create "
        f"{tmp_path / 'nope'}')"
    )
    (tmp_path / "file").write_text("")
    assert _load_error(tmp_path / "file").startswith(f"{tmp_path / 'file'}: not a directory")


@pytest.mark.parametrize(("name", "what"), [("ca.crt", "certificate"), ("ca.key", "key")])
def test_a_missing_file(ca_dir: Path, name: str, what: str) -> None:
    (ca_dir / name).unlink()
    assert _load_error(ca_dir) == (
        f"{ca_dir / name}: no such file (the CA's {what}; 'tproxy ca create' makes both files)"
    )


def test_an_unreadable_key(ca_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root nothing is unreadable by mode: the refusal is simulated where it happens."""
    real_open = Path.open

    def denying_open(self: Path, *args: object, **kwargs: object) -> object:
        if self.name == "ca.key":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", denying_open)
    assert _load_error(ca_dir) == (
        f"cannot read {ca_dir / 'ca.key'}: permission denied (run as its owner)"
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o601])
def test_a_key_that_group_or_others_may_read_is_refused(ca_dir: Path, mode: int) -> None:
    (ca_dir / "ca.key").chmod(mode)
    message = _load_error(ca_dir)
    assert message.startswith(
        f"{ca_dir / 'ca.key'} may be read by group or others (mode {mode:04o}): "
    )
    assert message.endswith(f"; chmod 600 {ca_dir / 'ca.key'}")


def test_a_key_only_its_owner_may_read_loads(ca_dir: Path) -> None:
    (ca_dir / "ca.key").chmod(0o400)
    load_ca(ca_dir, now=NOW)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("ca.crt", b"garbage", "{dir}/ca.crt is not a PEM certificate"),
        ("ca.key", b"garbage", "{dir}/ca.key is not a PEM private key"),
        ("ca.key", b"", "{dir}/ca.key is not a PEM private key"),
    ],
)
def test_files_that_are_not_pem(ca_dir: Path, name: str, content: bytes, message: str) -> None:
    (ca_dir / name).write_bytes(content)
    assert _load_error(ca_dir) == message.format(dir=ca_dir)


def test_a_certificate_with_a_duplicate_extension(ca_dir: Path) -> None:
    """cryptography refuses it with DuplicateExtension, not a ValueError."""
    der = read_ca_cert(ca_dir).public_bytes(serialization.Encoding.DER)
    key_identifiers = (b"\x06\x03\x55\x1d\x0e", b"\x06\x03\x55\x1d\x23")  # SKI, AKI
    mangled = x509.load_der_x509_certificate(der.replace(key_identifiers[1], key_identifiers[0]))
    pem = (
        b"-----BEGIN CERTIFICATE-----\n"
        + base64.encodebytes(mangled.public_bytes(serialization.Encoding.DER))
        + b"-----END CERTIFICATE-----\n"
    )
    (ca_dir / "ca.crt").write_bytes(pem)
    assert _load_error(ca_dir).startswith(
        f"{ca_dir / 'ca.crt'} has malformed extensions (DuplicateExtension: "
    )


def test_an_encrypted_key(ca_dir: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (ca_dir / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert _load_error(ca_dir) == f"{ca_dir / 'ca.key'} is encrypted; tproxy needs the key " + (
        "unencrypted"
    )


def test_a_key_that_is_not_the_certificates(ca_dir: Path, tmp_path: Path) -> None:
    other = create_ca(tmp_path / "other", now=NOW)
    (ca_dir / "ca.key").write_bytes((tmp_path / "other" / "ca.key").read_bytes())
    assert other.cert != read_ca_cert(ca_dir)
    assert _load_error(ca_dir) == f"{ca_dir / 'ca.key'} is not the key of {ca_dir / 'ca.crt'}"


def test_an_ed25519_key_is_refused(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ca.crt").write_bytes(
        build_ca(NOW, "h")[0].public_bytes(serialization.Encoding.PEM)
    )
    (tmp_path / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "ca.key").chmod(0o600)
    assert "neither an EC nor an RSA key" in _load_error(tmp_path)


def _leaf_signed_by_itself(
    key: ec.EllipticCurvePrivateKey, extensions: list[tuple[x509.ExtensionType, bool]]
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a ca")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize(
    ("extensions", "message"),
    [
        ([], "is not a CA certificate (no basicConstraints CA:TRUE)"),
        (
            [(x509.BasicConstraints(ca=False, path_length=None), True)],
            "is not a CA certificate (no basicConstraints CA:TRUE)",
        ),
        (
            [
                (x509.BasicConstraints(ca=True, path_length=None), True),
                (
                    x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                    True,
                ),
            ],
            "may not sign certificates (its keyUsage lacks keyCertSign)",
        ),
    ],
)
def test_a_certificate_that_is_not_a_ca(
    tmp_path: Path, extensions: list[tuple[x509.ExtensionType, bool]], message: str
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    _write_ca(tmp_path, _leaf_signed_by_itself(key, extensions), key)
    assert _load_error(tmp_path) == f"{tmp_path / 'ca.crt'} {message}"


def test_an_expired_or_not_yet_valid_ca(ca_dir: Path) -> None:
    later = NOW + CA_VALIDITY + timedelta(seconds=1)
    assert _load_error(ca_dir, later) == (
        f"{ca_dir / 'ca.crt'} expired on 2036-11-28; create a new CA (and install it on the "
        "clients)"
    )
    earlier = NOW - timedelta(days=2)
    assert _load_error(ca_dir, earlier) == (
        f"{ca_dir / 'ca.crt'} is not valid before 2026-11-30 08:00 UTC; is this machine's "
        "clock right?"
    )
    load_ca(ca_dir, now=NOW + CA_VALIDITY)  # its last second still counts


# --- the command line -------------------------------------------------------------------------


def test_ca_create_then_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ca"
    assert main(["ca", "create", str(folder)]) == 0
    created = capsys.readouterr().out.splitlines()
    assert created[0] == f"created {folder / 'ca.crt'} and {folder / 'ca.key'} (mode 0600)"
    assert main(["ca", "show", str(folder)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert created[1:] == shown
    cert = read_ca_cert(folder)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert shown[0].startswith("subject:     CN=tproxy interception CA (")
    assert shown[0].endswith("), O=tproxy")
    assert shown[1] == f"sha256:      {fingerprint}"
    assert re.fullmatch(r"valid:       \S+ \S+ UTC to \S+ \S+ UTC \(364[89] days left\)", shown[2])
    for client, command in [("Debian/Ubuntu", "update-ca-certificates"), ("Firefox", "Import"),
                            ("Android", "Install a certificate"), ("Windows", "certutil"),
                            ("macOS", "security add-trusted-cert")]:  # fmt: skip
        line = next(line for line in shown if line.startswith(f"  {client}: "))
        assert command in line and str(folder / "ca.crt") in line
    assert shown[-1] == "usable by 'tproxy run --ca': yes"


def test_ca_create_refuses_to_overwrite_and_force_replaces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "create", str(tmp_path)]) == 0
    before = read_ca_cert(tmp_path)
    capsys.readouterr()
    assert main(["ca", "create", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"tproxy: error: {tmp_path / 'ca.key'} exists; 'tproxy ca create --force' replaces the CA\n"
    )
    assert read_ca_cert(tmp_path) == before
    assert main(["ca", "create", "--force", str(tmp_path)]) == 0
    assert read_ca_cert(tmp_path) != before


def test_ca_show_says_why_a_ca_is_not_usable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_ca(tmp_path, now=NOW)
    (tmp_path / "ca.key").chmod(0o644)
    assert main(["ca", "show", str(tmp_path)]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(
        f"usable by 'tproxy run --ca': no: {tmp_path / 'ca.key'} may be read by group or others"
    )
    assert main(["ca", "show", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tproxy: error: {tmp_path / 'nope'}: no such directory")
    assert len(err.splitlines()) == 1


def test_run_checks_the_ca_at_start_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--ca", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"tproxy: error: --ca: {tmp_path / 'nope'}: no such directory (create a CA with "
        f"'tproxy ca create {tmp_path / 'nope'}')\n"
    )
    create_ca(tmp_path, now=datetime.now(UTC))
    (tmp_path / "ca.key").write_bytes(b"garbage")
    assert main(["run", "--ca", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"tproxy: error: --ca: {tmp_path / 'ca.key'} is not a PEM private key\n"
    )


def test_run_checks_the_key_log_at_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca"
    create_ca(ca, now=datetime.now(UTC))
    link = tmp_path / "keys.log"
    link.symlink_to(tmp_path / "elsewhere.log")
    assert main(["run", "--ca", str(ca), "--keylog", str(link)]) == 1
    assert capsys.readouterr().err == (
        f"tproxy: error: --keylog {link}: a symbolic link; give the file itself\n"
    )
    assert main(["run", "--keylog", str(tmp_path / "k.log")]) == 1
    assert capsys.readouterr().err == (
        "tproxy: error: --keylog (keylog) needs --ca (ca): only intercepted sessions have keys\n"
    )


def test_ca_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ca", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "create" in out and "show" in out
    with pytest.raises(SystemExit) as exited:
        main(["ca"])
    assert exited.value.code == 2
