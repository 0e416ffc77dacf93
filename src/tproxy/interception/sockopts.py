"""Transparent sockets: the listener TPROXY delivers to, the upstream socket, and the abort.

Why the original destination is `getsockname()`: TPROXY does not rewrite the packet (unlike
REDIRECT/DNAT), it only assigns it to our listening socket. The accepted socket therefore keeps the
addresses the client used, and its local address *is* where the client was going. SO_ORIGINAL_DST
asks conntrack and is for REDIRECT only; on a transparent socket it can be wrong (HAProxy's
`sock_inet_get_dst` makes the same choice).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import socket
import struct
import termios

from tproxy.core.endpoint import Endpoint, IPAddress

# <linux/in.h>
IP_TRANSPARENT = 19
IP_BIND_ADDRESS_NO_PORT = 24
# <linux/in6.h>
IPV6_TRANSPARENT = 75
# <asm-generic/socket.h>
SO_MARK = 36

LINGER_RESET = struct.pack("ii", 1, 0)


class SocketSetupError(Exception):
    """A socket could not be set up as asked; the message is one sentence for the operator."""


def _set_transparent(sock: socket.socket, family: socket.AddressFamily) -> None:
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def open_listener(
    endpoint: Endpoint, *, transparent: bool = True, backlog: int = 4096, reuseport: bool = False
) -> socket.socket:
    """A non-blocking listening socket, with IP_TRANSPARENT for TPROXY to hand it connections
    (`transparent=False`: a plain one, for REDIRECT mode); `reuseport=True` sets SO_REUSEPORT
    before the bind, so that further sockets of this user can join its group.

    Raises:
        SocketSetupError: not permitted (needs CAP_NET_ADMIN), the port is in use, or the address
            is not one of this host's.
    """
    # A transparent socket may bind any address, so a typo would bind silently and never
    # receive a connection: insist on an address of this host (or the wildcard).
    if not endpoint.ip.is_unspecified and not is_local_address(endpoint.ip):
        raise SocketSetupError(_bind_error_text(endpoint, OSError(errno.EADDRNOTAVAIL, "")))
    sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if endpoint.family == socket.AF_INET6:
            # We listen on 0.0.0.0 and [::] side by side, as two sockets.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            if transparent:
                _set_transparent(sock, endpoint.family)
        except PermissionError:
            raise SocketSetupError(
                f"cannot listen transparently on {endpoint}: IP_TRANSPARENT needs root "
                "(CAP_NET_ADMIN)"
            ) from None
        try:
            sock.bind(endpoint.sockaddr)
        except OSError as exc:
            raise SocketSetupError(_bind_error_text(endpoint, exc)) from None
        # Accepted sockets inherit TCP_NODELAY from the listener: set once here, not per session.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_error_text(endpoint: Endpoint, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {endpoint}: the port is already in use by another program"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {endpoint}: the address is not configured on this host"
    if exc.errno == errno.EAFNOSUPPORT:
        return f"cannot listen on {endpoint}: IPv{endpoint.ip.version} is disabled on this host"
    return f"cannot listen on {endpoint}: {exc.strerror}"


def open_upstream_socket(dst_ip: str, spoof_ip: str | None, mark: int) -> socket.socket:
    """A non-blocking socket to connect to `dst_ip`, marked, optionally bound to the client's IP.

    With `spoof_ip` the socket is transparent and bound to that address with
    IP_BIND_ADDRESS_NO_PORT, so the kernel picks the source port at connect() time knowing the
    destination: without it, bind() picks a port for the address alone and every session of one
    client shares one port space with that client's TIME_WAITs.
    """
    family = socket.AF_INET6 if ":" in dst_ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if spoof_ip is not None and (":" in spoof_ip) == (family == socket.AF_INET6):
            _set_transparent(sock, family)
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((spoof_ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def prepare_client_socket(sock: socket.socket) -> None:
    """Accepted sockets come back blocking from accept(); make them non-blocking (TCP_NODELAY
    they inherit from the listener)."""
    sock.setblocking(False)


def abort_socket(sock: socket.socket) -> None:
    """Close so that the peer sees a reset (RST), never a clean FIN: SO_LINGER {1, 0}, close."""
    if sock.fileno() < 0:
        return
    # Already reset by the peer: then the close below is all that is left to do.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


def unacknowledged_bytes(sock: socket.socket) -> int:
    """Bytes written to a TCP socket that the peer has not acknowledged yet (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    count: int = struct.unpack("i", buf)[0]
    return count


# <netinet/tcp.h> enum tcp_state
TCP_CLOSE = 7


def reset_behind_eof(sock: socket.socket) -> bool:
    """Whether an EOF just read from `sock` was really a reset whose error another call consumed.

    A reset sets one pending error on the socket, and whichever syscall runs first reports it:
    when the other direction's write gets ECONNRESET, this direction's read then returns 0 as if
    the peer had sent FIN. Only valid while we have not sent FIN on `sock` ourselves: then a
    real FIN leaves the socket in CLOSE_WAIT, and a reset leaves it CLOSE.
    """
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return True
    return state == TCP_CLOSE


def is_local_address(ip: IPAddress) -> bool:
    """Whether `ip` is configured on this host (in this network namespace).

    In theory one would read the local routing table; in practice a plain (non-transparent) bind
    answers the same question in one syscall: it fails with EADDRNOTAVAIL for foreign addresses
    (unless net.ipv4.ip_nonlocal_bind is set, where this errs on the side of "local").
    """
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError:
            return False
    return True
