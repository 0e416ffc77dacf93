"""The TLS ClientHello sniffer: real hellos from Python's ssl module and hellos built here, cut at
every offset, re-split into records and TCP segments, mutated and fuzzed."""

from __future__ import annotations

import random
import re
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tproxy.sniffers.facts import MAX_SNIFF_BYTES, NEED_MORE, NeedMore, NotThis, TlsHello
from tproxy.sniffers.tls import sniff_tls

# --- real ClientHellos, from OpenSSL through memory BIOs (no socket, no network) -----------------


def real_hello(
    server_hostname: str | None,
    alpn: Sequence[str] = (),
    maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> bytes:
    """The records of the ClientHello an `ssl` client writes first."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.maximum_version = maximum_version
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


TLS13 = ssl.TLSVersion.TLSv1_3
TLS12 = ssl.TLSVersion.TLSv1_2
H2 = ("h2", "http/1.1")

# (hostname given to wrap_bio, ALPN, maximum version) -> the facts expected.
REAL_CASES = [
    (("www.example.test", H2, TLS13), TlsHello("www.example.test", H2, "1.3", ech=False)),
    (("www.example.test", (), TLS13), TlsHello("www.example.test", (), "1.3", ech=False)),
    ((None, H2, TLS13), TlsHello(None, H2, "1.3", ech=False)),
    ((None, (), TLS13), TlsHello(None, (), "1.3", ech=False)),
    (
        ("WWW.Example.TEST", ("http/1.1",), TLS12),
        TlsHello("www.example.test", ("http/1.1",), "1.2", ech=False),
    ),
    ((None, (), TLS12), TlsHello(None, (), "1.2", ech=False)),
    # OpenSSL sends no SNI for an IP literal (RFC 6066 §3).
    (("192.0.2.1", H2, TLS13), TlsHello(None, H2, "1.3", ech=False)),
    (("2001:db8::1", (), TLS13), TlsHello(None, (), "1.3", ech=False)),
    (("2001:db8::1", (), TLS12), TlsHello(None, (), "1.2", ech=False)),
]
REAL_HELLOS = [(real_hello(*args), facts) for args, facts in REAL_CASES]
REAL_IDS = [f"{a[0]}-{'+'.join(a[1]) or 'no-alpn'}-{a[2].name}" for a, _ in REAL_CASES]


def handshake_of(records: bytes) -> bytes:
    """The handshake stream carried by `records` (whole records only)."""
    out, pos = bytearray(), 0
    while pos < len(records):
        assert records[pos] == 22
        length = int.from_bytes(records[pos + 3 : pos + 5], "big")
        out += records[pos + 5 : pos + 5 + length]
        pos += 5 + length
    assert pos == len(records)
    return bytes(out)


def as_records(handshake: bytes, sizes: Sequence[int], version: bytes = b"\x03\x01") -> bytes:
    """`handshake` in handshake records of `sizes` fragment bytes (cycled; the last one may be
    shorter)."""
    out, pos, i = bytearray(), 0, 0
    while pos < len(handshake):
        fragment = handshake[pos : pos + sizes[i % len(sizes)]]
        out += b"\x16" + version + len(fragment).to_bytes(2, "big") + fragment
        pos += len(fragment)
        i += 1
    return bytes(out)


# --- a ClientHello builder, for what OpenSSL does not send ----------------------------------------


@dataclass
class Writer:
    """Bytes with length-prefixed vectors; remembers where each vector's length field is."""

    buf: bytearray = field(default_factory=bytearray)
    lengths: list[tuple[int, int]] = field(default_factory=list)  # (offset, width)

    def u8(self, value: int) -> None:
        self.buf += value.to_bytes(1, "big")

    def u16(self, value: int) -> None:
        self.buf += value.to_bytes(2, "big")

    def raw(self, data: bytes) -> None:
        self.buf += data

    @contextmanager
    def vector(self, width: int) -> Iterator[None]:
        at = len(self.buf)
        self.buf += bytes(width)
        self.lengths.append((at, width))
        yield
        self.buf[at : at + width] = (len(self.buf) - at - width).to_bytes(width, "big")


GREASE = [0x0A0A + 0x1010 * i for i in range(16)]
GREASE_ALPN = [value.to_bytes(2, "big") for value in GREASE]


@dataclass
class Hello:
    """A ClientHello to build; `extensions=None` leaves the extensions block out."""

    legacy_version: int = 0x0303
    session_id: bytes = bytes(32)
    cipher_suites: Sequence[int] = (0x1301, 0x1302, 0xC02F)
    sni: Sequence[tuple[int, bytes]] | None = ((0, b"www.example.test"),)
    alpn: Sequence[bytes] | None = (b"h2", b"http/1.1")
    versions: Sequence[int] | None = (0x0304, 0x0303)
    extra: Sequence[tuple[int, bytes]] = ()  # before server_name
    extra_after: Sequence[tuple[int, bytes]] = ()
    extensions: bool = True

    def build(self) -> tuple[bytes, list[tuple[int, int]]]:
        """The handshake message and the (offset, width) of each length field in its body."""
        w = Writer()
        w.u8(1)
        with w.vector(3):
            w.u16(self.legacy_version)
            w.raw(bytes(range(32)))
            with w.vector(1):
                w.raw(self.session_id)
            with w.vector(2):
                for suite in self.cipher_suites:
                    w.u16(suite)
            with w.vector(1):
                w.u8(0)
            if self.extensions:
                with w.vector(2):
                    self._extensions(w)
        return bytes(w.buf), w.lengths[1:]

    def _extensions(self, w: Writer) -> None:
        for kind, data in self.extra:
            w.u16(kind)
            with w.vector(2):
                w.raw(data)
        if self.sni is not None:
            w.u16(0)
            with w.vector(2), w.vector(2):
                for name_type, name in self.sni:
                    w.u8(name_type)
                    with w.vector(2):
                        w.raw(name)
        if self.alpn is not None:
            w.u16(16)
            with w.vector(2), w.vector(2):
                for proto in self.alpn:
                    with w.vector(1):
                        w.raw(proto)
        if self.versions is not None:
            w.u16(43)
            with w.vector(2), w.vector(1):
                for version in self.versions:
                    w.u16(version)
        for kind, data in self.extra_after:
            w.u16(kind)
            with w.vector(2):
                w.raw(data)

    def records(self, sizes: Sequence[int] = (1 << 14,)) -> bytes:
        return as_records(self.build()[0], sizes)


def key_shares(count: int, size: int) -> tuple[int, bytes]:
    """A key_share extension (51) with `count` shares of `size` bytes, GREASE group first."""
    shares = b"".join(
        (GREASE[i % 16] if i == 0 else 0x11EC + i).to_bytes(2, "big")
        + size.to_bytes(2, "big")
        + bytes([i]) * size
        for i in range(count)
    )
    return 51, len(shares).to_bytes(2, "big") + shares


def padding(size: int) -> tuple[int, bytes]:
    return 21, bytes(size)


# --- real hellos --------------------------------------------------------------------------------


@pytest.mark.parametrize(("records", "facts"), REAL_HELLOS, ids=REAL_IDS)
def test_a_real_hello_gives_its_facts(records: bytes, facts: TlsHello) -> None:
    assert sniff_tls(records) == facts


@pytest.mark.parametrize(("records", "facts"), REAL_HELLOS, ids=REAL_IDS)
def test_every_prefix_of_a_real_hello_needs_more(records: bytes, facts: TlsHello) -> None:
    for cut in range(len(records)):
        assert sniff_tls(records[:cut]) is NEED_MORE, cut
    assert sniff_tls(records) == facts


@pytest.mark.parametrize(("records", "facts"), REAL_HELLOS, ids=REAL_IDS)
def test_what_follows_the_first_hello_is_not_read(records: bytes, facts: TlsHello) -> None:
    """Early data, a second hello, or garbage after the first hello change nothing."""
    other = real_hello("other.example.test", ("x",))
    for tail in (b"\x17\x03\x03\x00\x05hello", other, b"\x00" * 100, b"GET / HTTP/1.1\r\n"):
        assert sniff_tls(records + tail) == facts


@settings(max_examples=300)
@given(
    case=st.sampled_from(REAL_HELLOS),
    cut=st.integers(0, 600),
    tail=st.binary(min_size=1, max_size=300),
)
def test_a_real_hello_cut_anywhere_with_a_random_tail(
    case: tuple[bytes, TlsHello], cut: int, tail: bytes
) -> None:
    """mitmproxy's test_tls_fuzz.py: whatever follows a prefix, nothing raises; whatever follows
    the whole hello, the facts stay."""
    records, facts = case
    check_result(records[:cut] + tail)
    assert sniff_tls(records + tail) == facts


def test_a_real_hello_in_one_byte_records_cut_at_every_offset() -> None:
    records, facts = REAL_HELLOS[0]
    split = as_records(handshake_of(records), [1])
    assert len(split) == 6 * len(handshake_of(records))
    for cut in range(len(split)):
        assert sniff_tls(split[:cut]) is NEED_MORE, cut
    assert sniff_tls(split) == facts


@settings(max_examples=200, deadline=None)
@given(
    case=st.sampled_from(REAL_HELLOS),
    sizes=st.lists(st.integers(1, 600), min_size=1, max_size=20),
    version=st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x00", b"\x03\x04"]),
    data=st.data(),
)
def test_a_real_hello_in_records_of_any_size_and_tcp_segments(
    case: tuple[bytes, TlsHello], sizes: list[int], version: bytes, data: st.DataObject
) -> None:
    records, facts = case
    split = as_records(handshake_of(records), sizes, version)
    cuts = data.draw(st.lists(st.integers(0, len(split) - 1), max_size=30), label="tcp cuts")
    for cut in sorted(cuts):
        assert sniff_tls(split[:cut]) is NEED_MORE, cut
    assert sniff_tls(split) == facts


# --- large hellos, names, GREASE, versions, ECH -------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        [padding(2100)],
        [key_shares(3, 1216)],  # about what X25519MLKEM768 and friends take
        [key_shares(40, 300), padding(1000)],
    ],
    ids=["padding", "post-quantum-key-shares", "many-key-shares"],
)
def test_a_large_hello_in_one_record_and_in_several(extra: list[tuple[int, bytes]]) -> None:
    hello = Hello(extra_after=extra)
    facts = TlsHello("www.example.test", ("h2", "http/1.1"), "1.3", ech=False)
    assert len(hello.build()[0]) > 2000
    for sizes in ([1 << 14], [512], [1000, 7, 1], [3], [1]):
        records = hello.records(sizes)
        if len(records) > MAX_SNIFF_BYTES:  # complete, but not within the sniff buffer
            assert sniff_tls(records) == NotThis("too large")
            continue
        assert sniff_tls(records) == facts
        assert sniff_tls(records[:-1]) is NEED_MORE
        assert sniff_tls(records[: len(records) // 2]) is NEED_MORE


def test_a_hello_that_just_fits_the_sniff_buffer_and_one_that_does_not() -> None:
    base = len(Hello().records())
    fits = Hello(extra_after=[padding(MAX_SNIFF_BYTES - base - 4)]).records()
    assert len(fits) == MAX_SNIFF_BYTES
    assert isinstance(sniff_tls(fits), TlsHello)
    too_big = Hello(extra_after=[padding(MAX_SNIFF_BYTES - base - 3)]).records()
    # Known as soon as the handshake header arrives: no need to wait for 16 KiB.
    assert sniff_tls(too_big[:9]) == NotThis("too large")
    assert sniff_tls(too_big) == NotThis("too large")


def test_sixteen_kib_without_a_complete_hello_is_too_large() -> None:
    """A hello that fits, but whose one-byte records take more than the buffer holds."""
    records = Hello(extra_after=[padding(3000)]).records([1])
    assert len(records) > MAX_SNIFF_BYTES
    assert sniff_tls(records[: MAX_SNIFF_BYTES - 1]) is NEED_MORE
    assert sniff_tls(records[:MAX_SNIFF_BYTES]) == NotThis("too large")
    assert sniff_tls(records[: MAX_SNIFF_BYTES + 5000]) == NotThis("too large")


@pytest.mark.parametrize(
    ("raw", "sni"),
    [
        (b"WWW.Example.Test.", "www.example.test"),
        (b"example.test..", "example.test."),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("bücher.example".encode(), "b\\xc3\\xbccher.example"),
        (b"evil\r\nx: y\x00\x1b[31m", "evil\\x0d\\x0ax: y\\x00\\x1b[31m"),
        (b"back\\x41slash", "back\\x5cx41slash"),
        (b"\xff" * 100, "\\xff" * 63),  # 252 characters: a 64th escape would pass 255
        (b"a" * 300, "a" * 255),
        (b"a" * 254 + b"\x80", "a" * 254),
        (b".", ""),
    ],
)
def test_server_names_are_lowered_escaped_and_bounded(raw: bytes, sni: str) -> None:
    assert sniff_tls(Hello(sni=[(0, raw)]).records()) == TlsHello(
        sni, ("h2", "http/1.1"), "1.3", ech=False
    )


def unescape(text: str) -> bytes:
    """The bytes a sniffed name was escaped from (the backslash is always escaped, so every
    backslash starts an escape)."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]), text.encode("ascii"))


def offered_model(legacy: int, versions: Sequence[int]) -> str:
    names = {0x0304: "1.3", 0x0303: "1.2", 0x0302: "1.1", 0x0301: "1.0"}
    tls = [v for v in versions if v >> 8 == 3]
    other = [v for v in versions if v >> 8 != 3 and v not in GREASE]
    best = max(tls) if tls else max(other) if other else legacy
    return names.get(best, f"0x{best:04x}")


@settings(max_examples=300, deadline=None)
@given(
    name=st.binary(min_size=1, max_size=60),
    alpn=st.lists(st.binary(min_size=1, max_size=20) | st.sampled_from(GREASE_ALPN), max_size=6),
    versions=st.lists(st.integers(0, 0xFFFF) | st.sampled_from(GREASE), min_size=1, max_size=8),
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
)
def test_built_hellos_give_back_what_they_carry(
    name: bytes, alpn: list[bytes], versions: list[int], sizes: list[int]
) -> None:
    """Any name and ALPN bytes come back (escaped: unescaping gives the bytes sent), GREASE left
    out, and the offered version is the highest TLS version, in any records."""
    hello = Hello(sni=[(0, name)], alpn=alpn or None, versions=versions)
    facts = sniff_tls(hello.records(sizes))
    assert isinstance(facts, TlsHello)
    lowered = name.lower()
    assert facts.sni is not None
    assert unescape(facts.sni) == (lowered[:-1] if lowered.endswith(b".") else lowered)
    assert [unescape(a) for a in facts.alpn] == [a for a in alpn if a not in GREASE_ALPN]
    assert facts.offered_version == offered_model(0x0303, versions)


def test_a_server_name_list_without_a_host_name_gives_no_sni() -> None:
    facts = sniff_tls(Hello(sni=[(7, b"not-a-host-name")]).records())
    assert isinstance(facts, TlsHello)
    assert facts.sni is None
    facts = sniff_tls(Hello(sni=[(7, b"other"), (0, b"www.example.test")]).records())
    assert isinstance(facts, TlsHello)
    assert facts.sni == "www.example.test"


def test_alpn_names_are_escaped_and_grease_left_out() -> None:
    alpn = [b"\x1a\x1a", b"h2", b"\xfa\xfa", b"caf\xc3\xa9\n", b"\x0a\x0a\x0a", b"\x0b\x0b"]
    facts = sniff_tls(Hello(alpn=alpn).records())
    assert isinstance(facts, TlsHello)
    assert facts.alpn == ("h2", "caf\\xc3\\xa9\\x0a", "\\x0a\\x0a\\x0a", "\\x0b\\x0b")


def test_grease_everywhere() -> None:
    """GREASE cipher suites, extensions (first and last, as Chrome), groups, versions, ALPN."""
    hello = Hello(
        cipher_suites=[GREASE[3], 0x1301, GREASE[9], 0xC02F],
        extra=[
            (GREASE[2], b""),
            (10, b"\x00\x06" + GREASE[5].to_bytes(2, "big") + b"\x00\x1d\x00\x17"),
        ],
        alpn=[GREASE[7].to_bytes(2, "big"), b"h2"],
        versions=[GREASE[4], 0x0304, 0x0303],
        extra_after=[key_shares(2, 32), (GREASE[12], b"\x00")],
    )
    assert sniff_tls(hello.records()) == TlsHello("www.example.test", ("h2",), "1.3", ech=False)


@pytest.mark.parametrize(
    ("legacy", "versions", "offered"),
    [
        (0x0303, [0x0304, 0x0303], "1.3"),
        (0x0303, [0x0303], "1.2"),
        (0x0303, [0x0302, 0x0301], "1.1"),
        (0x0303, [0x0301], "1.0"),
        (0x0303, [0x0303, 0x0304], "1.3"),  # the order offered does not matter
        (0x0303, [0x7F1C], "0x7f1c"),  # a TLS 1.3 draft alone is named in hex
        (0x0303, [0x7F1C, 0x0304], "1.3"),  # and does not outrank a real version
        (0x0303, [0x0305, 0x0304], "0x0305"),
        (0x0303, [GREASE[0]], "1.2"),  # only GREASE: legacy_version decides
        (0x0303, None, "1.2"),
        (0x0302, None, "1.1"),
        (0x0301, None, "1.0"),
        (0x0300, None, "0x0300"),
    ],
)
def test_the_highest_offered_version(legacy: int, versions: list[int] | None, offered: str) -> None:
    facts = sniff_tls(Hello(legacy_version=legacy, versions=versions).records())
    assert isinstance(facts, TlsHello)
    assert facts.offered_version == offered


def test_a_hello_without_extensions() -> None:
    """TLS 1.0 to 1.2 allow the extensions block to be left out altogether."""
    hello = Hello(legacy_version=0x0301, session_id=b"", extensions=False)
    assert sniff_tls(hello.records()) == TlsHello(None, (), "1.0", ech=False)


def test_ech_offered() -> None:
    hello = Hello(sni=[(0, b"public.example")], extra_after=[(0xFE0D, bytes(200))])
    assert sniff_tls(hello.records()) == TlsHello(
        "public.example", ("h2", "http/1.1"), "1.3", ech=True
    )


# --- what is not a ClientHello ------------------------------------------------------------------

GOOD = Hello().records()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "not a TLS handshake record"),
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", "not a TLS handshake record"),
        (b"\x80\x2e\x01\x03\x01", "not a TLS handshake record"),  # SSLv2-compatible hello
        (b"\x15\x03\x03\x00\x02\x02\x28", "not a TLS handshake record"),  # an alert
        (b"\x16\x02", "record version is not 3.x"),
        (b"\x16\x03\x01\x00\x00", "zero-length record"),
        (b"\x16\x03\x01\x40\x01\x01", "record longer than 2^14 bytes"),
        (b"\x16\x03\x01\x00\x04\x02", "the first handshake message is not a ClientHello"),
        (b"\x16\x03\x01\x00\x01\x00", "the first handshake message is not a ClientHello"),
        (GOOD[:5] + b"\x01\x00\x40\x00", "too large"),
        (
            as_records(GOOD[5:20], [1]) + b"\x14\x03\x03\x00\x01\x01",
            "a record that is not a handshake before the ClientHello is complete",
        ),
        (
            as_records(GOOD[5:20], [3]) + b"\x17",
            "a record that is not a handshake before the ClientHello is complete",
        ),
        (as_records(GOOD[5:20], [3]) + b"\x16\x02", "record version is not 3.x"),
        (as_records(GOOD[5:20], [3]) + b"\x16\x03\x03\x00\x00", "zero-length record"),
    ],
)
def test_not_a_client_hello(data: bytes, why: str) -> None:
    assert sniff_tls(data) == NotThis(why)


@pytest.mark.parametrize(
    ("hello", "why"),
    [
        (Hello(sni=[(0, b"a.example"), (0, b"b.example")]), "two host names"),
        (Hello(sni=[(0, b"")]), "empty server name"),
        (Hello(sni=[]), "server name list does not fill its extension"),
        (Hello(alpn=[b"h2", b""]), "empty ALPN name"),
        (Hello(alpn=[]), "ALPN list does not fill its extension"),
        (Hello(versions=[]), "supported versions do not fill their extension"),
        (Hello(extra=[(0, b"\x00\x04\x00\x00\x01x")]), "an extension is repeated"),
        (Hello(extra=[(16, b"\x00\x03\x02h2")]), "an extension is repeated"),
        (Hello(extra=[(0xFE0D, b""), (0xFE0D, b"")]), "an extension is repeated"),
        (Hello(session_id=bytes(33)), "session id longer than 32 bytes"),
        (Hello(cipher_suites=[]), "cipher suites length is zero or odd"),
    ],
)
def test_ambiguous_or_impossible_hellos(hello: Hello, why: str) -> None:
    assert sniff_tls(hello.records()) == NotThis(why)


LYING_HELLO = Hello(session_id=bytes(8), extra=[padding(5), (GREASE[1], b"")])


def lies_by_one() -> Iterator[tuple[bytes, str]]:
    """The hello with each length field in its body one more, or one less, than the truth."""
    message, lengths = LYING_HELLO.build()
    for offset, width in lengths:
        value = int.from_bytes(message[offset : offset + width], "big")
        for lie in (value + 1, value - 1) if value else (value + 1,):
            lying = message[:offset] + lie.to_bytes(width, "big") + message[offset + width :]
            yield lying, f"at {offset}: {lie} for {value}"


@pytest.mark.parametrize(
    "message", [m for m, _ in lies_by_one()], ids=[i for _, i in lies_by_one()]
)
def test_a_length_that_lies_by_one(message: bytes) -> None:
    """Every length field in the hello's body, one more or one less: never a hello."""
    assert isinstance(sniff_tls(as_records(message, [1 << 14])), NotThis)
    assert isinstance(sniff_tls(as_records(message, [5])), NotThis)


def test_a_handshake_length_that_lies() -> None:
    message = bytearray(Hello().build()[0])
    length = int.from_bytes(message[1:4], "big")
    longer = message[:1] + (length + 1).to_bytes(3, "big") + message[4:]
    assert sniff_tls(as_records(bytes(longer), [1 << 14])) is NEED_MORE  # waits for a byte more
    shorter = message[:1] + (length - 1).to_bytes(3, "big") + message[4:]
    assert isinstance(sniff_tls(as_records(bytes(shorter), [1 << 14])), NotThis)
    tiny = message[:1] + (10).to_bytes(3, "big") + message[4:14]
    assert sniff_tls(as_records(bytes(tiny), [1 << 14])) == NotThis(
        "ClientHello shorter than its fixed fields"
    )


# --- nothing raises -----------------------------------------------------------------------------

RESULT_TYPES = (TlsHello, NeedMore, NotThis)


def check_result(data: bytes) -> TlsHello | NeedMore | NotThis:
    result = sniff_tls(data)
    assert isinstance(result, RESULT_TYPES)
    if isinstance(result, TlsHello):
        assert result.sni is None or (len(result.sni) <= 255 and result.sni.isprintable())
        assert all(name.isprintable() and name.isascii() for name in result.alpn)
    return result


@settings(max_examples=500)
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(data: bytes) -> None:
    check_result(data)


@settings(max_examples=500)
@given(st.binary(max_size=2000))
@example(b"\x16\x03\x01\xff\xff")
@example(b"\x16\x03\x01\x00\x05\x01\xff\xff\xff")
def test_random_bytes_after_a_handshake_record_header_never_raise(tail: bytes) -> None:
    check_result(b"\x16\x03\x01" + tail)
    check_result(b"\x16\x03\x01" + len(tail).to_bytes(2, "big") + b"\x01" + tail)


@settings(max_examples=500)
@given(
    case=st.sampled_from([h for h, _ in REAL_HELLOS] + [GOOD, as_records(handshake_of(GOOD), [7])]),
    flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, 1 << 16),
)
def test_mutated_hellos_never_raise(case: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    mutated = bytearray(case)
    for at, byte in flips:
        mutated[at % len(mutated)] = byte
    check_result(bytes(mutated))
    check_result(bytes(mutated[: cut % (len(mutated) + 1)]))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(MAX_SNIFF_BYTES, MAX_SNIFF_BYTES + 4000))
def test_over_sixteen_kib_of_records_without_a_hello_is_not_this(seed: int, size: int) -> None:
    """Handshake records that never complete a hello (the announced length is a lie) are cut off
    at the sniff buffer's size, also when they are 1-byte records."""
    rng = random.Random(seed)
    stream = b"\x01\x00\x3f\xf0" + rng.randbytes(size)
    records = as_records(stream, [rng.choice([1, 2, 100, 1000])])[:size]
    assert check_result(records) == NotThis("too large")
