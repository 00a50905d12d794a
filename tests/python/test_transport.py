"""Stream transports: flow control, pause/resume reading, close, abort,
peer reset, half-close.  Each case runs on every loop of the `loop` fixture
and must behave as on the stock asyncio loop."""

import asyncio
import socket
import struct

import pytest

from util import RecordingProtocol, connect_pair, pattern, read_all

FAMILIES = [socket.AF_INET, socket.AF_UNIX]
FAMILY_IDS = ["tcp", "unix"]


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_write_flow_control_limits(loop, family):
    """pause_writing fires inside write() once the buffer exceeds `high`;
    resume_writing fires once it is back to `low` or below."""
    high, low = 256 * 1024, 64 * 1024
    chunk = b"w" * (64 * 1024)

    async def main():
        tr, pr, peer = await connect_pair(
            loop.loop, lambda: RecordingProtocol(loop.loop), family=family,
            rcvbuf=16384, sndbuf=16384)
        try:
            tr.set_write_buffer_limits(high=high, low=low)
            assert tr.get_write_buffer_limits() == (low, high)
            sent = 0
            sizes = []
            while not any(e[0] == "pause" for e in pr.events if isinstance(e, tuple)):
                pr.write(chunk)
                sent += len(chunk)
                sizes.append(tr.get_write_buffer_size())
                assert sent < 256 * 1024 * 1024, "pause_writing never called"
            pauses = [e for e in pr.events if isinstance(e, tuple) and e[0] == "pause"]
            assert len(pauses) == 1
            _, size_at_pause, in_write = pauses[0]
            assert in_write, "pause_writing must be called from within write()"
            assert size_at_pause > high
            # Before the write that paused, the buffer stayed at or below high.
            assert all(s <= high for s in sizes[:-1])

            # Let the peer drain everything; resume must come at <= low.
            reader = loop.loop.run_in_executor(None, read_all, peer, sent)
            for _ in range(2000):
                if any(isinstance(e, tuple) and e[0] == "resume" for e in pr.events):
                    break
                await asyncio.sleep(0.005)
            resumes = [e for e in pr.events if isinstance(e, tuple) and e[0] == "resume"]
            assert len(resumes) == 1, pr.events
            assert resumes[0][1] <= low
            assert not resumes[0][2]
            data, err = await reader
            assert err is None
            assert len(data) == sent and data == chunk * (sent // len(chunk))
            assert tr.get_write_buffer_size() == 0
        finally:
            tr.close()
            peer.close()
        assert await pr.lost is None

    loop.run(main())


def test_write_buffer_limits_defaults_and_errors(loop):
    async def main():
        tr, pr, peer = await connect_pair(loop.loop, lambda: RecordingProtocol(loop.loop))
        try:
            low, high = tr.get_write_buffer_limits()
            assert 0 <= low <= high
            tr.set_write_buffer_limits(high=1000)
            assert tr.get_write_buffer_limits() == (250, 1000)
            tr.set_write_buffer_limits(low=10)
            assert tr.get_write_buffer_limits() == (10, 40)
            with pytest.raises(ValueError):
                tr.set_write_buffer_limits(high=1, low=2)
        finally:
            tr.close()
            peer.close()
        await pr.lost

    loop.run(main())


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_pause_resume_reading_loses_nothing(loop, family):
    """Pausing after every data_received and resuming a little later
    delivers every byte, in order, and nothing while paused."""
    total = 8 * 1024 * 1024
    payload = pattern(total, seed=1)

    class Proto(RecordingProtocol):
        paused = False
        violations = 0
        pauses = 0

        def data_received(self, data):
            if self.paused:
                self.violations += 1
            super().data_received(data)
            self.transport.pause_reading()
            self.transport.pause_reading()  # idempotent
            assert not self.transport.is_reading()
            self.paused = True
            self.pauses += 1
            delay = 0 if self.pauses % 3 else 0.001
            self.loop.call_later(delay, self.resume)

        def resume(self):
            if self.transport.is_closing():
                return
            self.paused = False
            self.transport.resume_reading()
            self.transport.resume_reading()  # idempotent
            assert self.transport.is_reading()

    async def main():
        tr, pr, peer = await connect_pair(loop.loop, lambda: Proto(loop.loop), family=family)
        try:
            assert tr.is_reading()

            def send():
                mv = memoryview(payload)
                step = 7919
                for i in range(0, total, step):
                    peer.sendall(mv[i:i + step])
                peer.shutdown(socket.SHUT_WR)

            await loop.loop.run_in_executor(None, send)
            await pr.eof
        finally:
            tr.close()
            peer.close()
        await pr.lost
        assert pr.violations == 0
        assert len(pr.data) == total
        assert bytes(pr.data) == payload
        assert pr.pauses > 1

    loop.run(main())


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_close_flushes_pending_writes(loop, family):
    total = 16 * 1024 * 1024
    payload = pattern(total, seed=2)

    async def main():
        tr, pr, peer = await connect_pair(
            loop.loop, lambda: RecordingProtocol(loop.loop), family=family,
            rcvbuf=32768, sndbuf=32768)
        try:
            tr.write(payload)
            assert tr.get_write_buffer_size() > 0, "test needs data still queued at close()"
            tr.close()
            assert tr.is_closing()
            tr.close()  # a second close is a no-op
            data, err = await loop.loop.run_in_executor(None, read_all, peer)
        finally:
            peer.close()
        assert err is None
        assert len(data) == total
        assert data == payload
        assert await pr.lost is None
        assert pr.events[-1] == ("lost", None)

    loop.run(main())


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_abort_drops_pending_writes(loop, family):
    total = 16 * 1024 * 1024
    payload = pattern(total, seed=3)

    async def main():
        tr, pr, peer = await connect_pair(
            loop.loop, lambda: RecordingProtocol(loop.loop), family=family,
            rcvbuf=32768, sndbuf=32768)
        try:
            tr.write(payload)
            assert tr.get_write_buffer_size() > 0
            tr.abort()
            assert tr.is_closing()
            tr.write(b"ignored after abort")  # dropped, no exception
            exc = await pr.lost
            data, err = await loop.loop.run_in_executor(None, read_all, peer)
        finally:
            peer.close()
        assert exc is None
        assert len(data) < total
        # What did arrive is an intact prefix.
        assert data == payload[:len(data)]

    loop.run(main())


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_peer_reset_reaches_connection_lost(loop, family):
    """A peer that closes with SO_LINGER 0 (TCP RST; for Unix sockets a close
    with unread data) ends the transport with ConnectionResetError."""

    async def main():
        tr, pr, peer = await connect_pair(loop.loop, lambda: RecordingProtocol(loop.loop),
                                          family=family)
        tr.write(b"unread by the peer")
        await asyncio.sleep(0.05)
        if family == socket.AF_INET:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        exc = await pr.lost
        assert isinstance(exc, ConnectionResetError), repr(exc)
        assert tr.is_closing()
        assert pr.events[-1] == ("lost", "ConnectionResetError")

    loop.run(main())


def test_peer_reset_while_writing(loop):
    """Writing into a connection the peer reset ends it with an OSError
    (ConnectionResetError or BrokenPipeError) passed to connection_lost."""

    async def main():
        tr, pr, peer = await connect_pair(loop.loop, lambda: RecordingProtocol(loop.loop))
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tr.write(b"x")
        await asyncio.sleep(0.02)
        peer.close()
        for _ in range(400):
            if pr.lost.done():
                break
            tr.write(b"y" * 4096)
            await asyncio.sleep(0.005)
        exc = await pr.lost
        assert isinstance(exc, (ConnectionResetError, BrokenPipeError)), repr(exc)

    loop.run(main())


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_half_close(loop, family, tmp_path):
    """write_eof() reaches the server's eof_received(); the server, kept open
    by returning True, still answers; the client sees data, EOF, lost(None)."""

    class Server(RecordingProtocol):
        def eof_received(self):
            super().eof_received()
            self.transport.write(b"reply:" + bytes(self.data))
            self.transport.close()
            return True

    async def main():
        servers = []
        if family == socket.AF_INET:
            srv = await loop.loop.create_server(
                lambda: servers.append(Server(loop.loop)) or servers[-1], "127.0.0.1", 0)
        else:
            path = str(tmp_path / "half-close.sock")
            srv = await loop.loop.create_unix_server(
                lambda: servers.append(Server(loop.loop)) or servers[-1], path)
        try:
            addr = srv.sockets[0].getsockname()
            if family == socket.AF_INET:
                tr, cl = await loop.loop.create_connection(
                    lambda: RecordingProtocol(loop.loop), *addr)
            else:
                tr, cl = await loop.loop.create_unix_connection(
                    lambda: RecordingProtocol(loop.loop), addr)
            assert tr.can_write_eof()
            tr.write(b"request")
            tr.write_eof()
            tr.write_eof()  # twice is a no-op
            with pytest.raises(RuntimeError):
                tr.write(b"after eof")
            assert await cl.lost is None
            assert bytes(cl.data) == b"reply:request"
            assert cl.events == ["made", "data", "eof", ("lost", None)]
            assert await servers[0].lost is None
            assert servers[0].events == ["made", "data", "eof", ("lost", None)]
        finally:
            srv.close()
            await srv.wait_closed()

    loop.run(main())


def test_eof_received_false_closes(loop):
    """eof_received() returning a false value closes the transport."""

    async def main():
        tr, pr, peer = await connect_pair(loop.loop, lambda: RecordingProtocol(loop.loop))
        try:
            peer.sendall(b"bye")
            peer.shutdown(socket.SHUT_WR)
            assert await pr.lost is None
            assert pr.events == ["made", "data", "eof", ("lost", None)]
            assert bytes(pr.data) == b"bye"
            data, err = read_all(peer)
            assert data == b"" and err is None
        finally:
            peer.close()

    loop.run(main())


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_write_eof_flushes_queued_data_first(loop, family):
    """write_eof() after a large write: the peer gets every byte, then EOF,
    and can still answer on the half-closed connection."""
    total = 8 * 1024 * 1024
    payload = pattern(total, seed=6)

    async def main():
        tr, pr, peer = await connect_pair(loop.loop, lambda: RecordingProtocol(loop.loop),
                                          family=family, rcvbuf=32768, sndbuf=32768)
        try:
            tr.write(payload)
            assert tr.get_write_buffer_size() > 0
            tr.write_eof()
            data, err = await loop.loop.run_in_executor(None, read_all, peer)
            assert err is None and len(data) == total and data == payload
            peer.sendall(b"answer after your EOF")
            peer.shutdown(socket.SHUT_WR)
            assert await pr.lost is None
            assert bytes(pr.data) == b"answer after your EOF"
        finally:
            tr.close()
            peer.close()

    loop.run(main())


class PausingBufferedProto(asyncio.BufferedProtocol):
    """Pauses after every buffer_updated; no get_buffer while paused."""

    def __init__(self, loop):
        self.loop = loop
        self.data = bytearray()
        self.paused = False
        self.get_buffer_while_paused = 0
        self.updated_while_paused = 0
        self.lost = loop.create_future()
        self.eof = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        if self.paused:
            self.get_buffer_while_paused += 1
        self.buf = bytearray(4096)
        return self.buf

    def buffer_updated(self, nbytes):
        if self.paused:
            self.updated_while_paused += 1
        self.data += self.buf[:nbytes]
        self.transport.pause_reading()
        self.paused = True
        self.loop.call_soon(self.resume)

    def resume(self):
        if not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def eof_received(self):
        self.eof.set_result(None)

    def connection_lost(self, exc):
        self.lost.set_result(exc)


def test_pause_resume_reading_buffered_protocol(loop):
    total = 2 * 1024 * 1024
    payload = pattern(total, seed=7)

    async def main():
        tr, pr, peer = await connect_pair(loop.loop, lambda: PausingBufferedProto(loop.loop))
        try:
            await loop.loop.run_in_executor(None, peer.sendall, payload)
            peer.shutdown(socket.SHUT_WR)
            await pr.eof
        finally:
            tr.close()
            peer.close()
        assert await pr.lost is None
        assert bytes(pr.data) == payload
        assert (pr.get_buffer_while_paused, pr.updated_while_paused) == (0, 0), \
            "calls while paused: (get_buffer, buffer_updated)"

    loop.run(main())


def test_loop_close_with_live_transports_releases_everything(loop):
    """Closing a loop whose transports were never closed (some with queued
    writes, some with pending sock_recv) returns promptly, warns about the
    unclosed transports as asyncio does, and leaves no fd open once they are
    collected (the fixture checks the fds)."""
    import gc
    import time
    import warnings

    async def main():
        keep = []
        for i in range(10):
            tr, pr, peer = await connect_pair(loop.loop, lambda: RecordingProtocol(loop.loop),
                                              rcvbuf=16384, sndbuf=16384)
            tr.write(b"q" * (1024 * 1024))  # stays queued: the peer never reads
            keep.append((tr, peer))
        a, b = socket.socketpair()
        a.setblocking(False)
        pending = asyncio.ensure_future(loop.loop.sock_recv(a, 10))
        await asyncio.sleep(0.05)
        return keep, (a, b, pending)

    keep, (a, b, pending) = loop.loop.run_until_complete(main())
    pending.cancel()
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop.close()
        assert time.monotonic() - t0 < 5.0
        transports = [tr for tr, _ in keep]
        for _, peer in keep:
            peer.close()
        a.close()
        b.close()
        del keep, pending, transports
        for _ in range(3):
            gc.collect()
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)
                and "unclosed" in str(w.message)]
    assert len(unclosed) >= 10, [str(w.message) for w in caught]
