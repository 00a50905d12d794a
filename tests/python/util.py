"""Small helpers for kloop's Python tests (no test in here)."""

import asyncio
import hashlib
import socket
import threading


def listener(family=socket.AF_INET, rcvbuf=None):
    """A blocking listening socket on loopback (or an abstract Unix name)."""
    if family == socket.AF_INET:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        addr = ("127.0.0.1", 0)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr = "\0kloop-test-%d-%d" % (threading.get_ident() & 0xFFFFFF, id(s))
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind(addr)
    s.listen(128)
    return s


async def connect_pair(loop, protocol_factory, *, family=socket.AF_INET, rcvbuf=None, sndbuf=None):
    """Connect a transport of `loop` to a plain blocking peer socket.

    Returns (transport, protocol, peer). The caller closes all three.
    `rcvbuf` shrinks the peer's receive buffer, `sndbuf` the transport's
    send buffer, so that flow control kicks in with little data.
    """
    lsock = listener(family, rcvbuf=rcvbuf)
    try:
        if family == socket.AF_INET:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, lsock.getsockname())
            tr, pr = await loop.create_connection(protocol_factory, sock=sock)
        except BaseException:
            sock.close()
            raise
        peer, _ = lsock.accept()
        peer.setblocking(True)
        return tr, pr, peer
    finally:
        lsock.close()


def read_all(sock, limit=None):
    """Blocking: read from sock until EOF (or `limit` bytes); return (bytes, error)."""
    chunks = []
    n = 0
    err = None
    try:
        while limit is None or n < limit:
            b = sock.recv(1 << 20)
            if not b:
                break
            chunks.append(b)
            n += len(b)
    except OSError as exc:
        err = exc
    return b"".join(chunks), err


def pattern(n, seed=0):
    """n deterministic pseudo-random bytes (cheap to make, easy to compare)."""
    out = bytearray()
    block = hashlib.sha256(b"kloop-%d" % seed).digest()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(block + i.to_bytes(8, "little")).digest() * 64
        i += 1
    return bytes(out[:n])


class RecordingProtocol(asyncio.Protocol):
    """Records callbacks; `lost` is a future with connection_lost's argument."""

    def __init__(self, loop):
        self.loop = loop
        self.transport = None
        self.events = []
        self.data = bytearray()
        self.lost = loop.create_future()
        self.eof = loop.create_future()
        self.eof_result = None
        self.in_write = False

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def data_received(self, data):
        self.data += data
        if not self.events or self.events[-1] != "data":
            self.events.append("data")

    def eof_received(self):
        self.events.append("eof")
        if not self.eof.done():
            self.eof.set_result(None)
        return self.eof_result

    def pause_writing(self):
        self.events.append(("pause", self.transport.get_write_buffer_size(), self.in_write))

    def resume_writing(self):
        self.events.append(("resume", self.transport.get_write_buffer_size(), self.in_write))

    def connection_lost(self, exc):
        self.events.append(("lost", type(exc).__name__ if exc else None))
        if not self.lost.done():
            self.lost.set_result(exc)

    def write(self, data):
        self.in_write = True
        try:
            self.transport.write(data)
        finally:
            self.in_write = False


def check_bytes(got, want):
    """Assert got == want with a short message: pytest's own diff of two
    large byte strings takes minutes."""
    if got == want:
        return
    n = min(len(got), len(want))
    i = 0
    step = 1 << 16
    while i < n and got[i:i + step] == want[i:i + step]:
        i += step
    while i < n and got[i] == want[i]:
        i += 1
    raise AssertionError(
        f"bytes differ: got {len(got)} bytes, want {len(want)}; first difference at "
        f"offset {i}: {bytes(got[i:i + 16])!r} != {bytes(want[i:i + 16])!r}")
