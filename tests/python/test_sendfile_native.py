"""Native sendfile (issue 4, point 4), on the stock loop and on kloop.

loop.sock_sendfile and loop.sendfile with offset and count, a 64 MiB file
checked by its digest, the file position left as asyncio leaves it, and
the fallback (SendfileNotAvailableError without fallback; read+send with
it) for files that cannot be spliced or have no fileno().
"""

import asyncio
import errno
import hashlib
import io
import os
import socket

import pytest

from util import RecordingProtocol, check_bytes, connect_pair, pattern, read_all

MiB = 1024 * 1024


@pytest.fixture(params=("asyncio", "kloop"))
def loop_name(request):
    from conftest import require_loop
    require_loop(request.param)
    return request.param


def _uses_splice(loop):
    """kloop: the native path really is splice (the loop has the op)."""
    if loop.is_("kloop"):
        from kloop import _sendfile
        assert _sendfile.has_splice(loop.loop)


async def _sock_pair(lp, sndbuf=None):
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    a.setblocking(False)
    b.setblocking(True)
    return a, b


@pytest.mark.parametrize("offset,count", [(0, None), (7, None), (7, 1000),
                                          (300_000, 1), (1_000_000, 48_576), (999_999, 10)])
def test_sock_sendfile_offset_count_and_position(loop, tmp_path, offset, count):
    size = 1_048_576
    data = pattern(size, seed=3)
    path = tmp_path / "f"
    path.write_bytes(data)
    _uses_splice(loop)

    async def main():
        lp = loop.loop
        a, b = await _sock_pair(lp)
        try:
            with open(path, "rb") as f:
                f.seek(123)  # the call's offset wins over the position
                reader = lp.run_in_executor(None, read_all, b)
                n = await lp.sock_sendfile(a, f, offset, count, fallback=False)
                end = offset + (count if count else size - offset)
                end = min(end, size)
                assert n == end - offset
                # asyncio leaves the position after the last byte sent.
                assert f.tell() == (end if n else 123)
                a.shutdown(socket.SHUT_WR)
                got, err = await reader
            assert err is None
            check_bytes(got, data[offset:end])
        finally:
            a.close()
            b.close()

    loop.run(main())


def test_sock_sendfile_large_file_checksum(loop, tmp_path):
    """64 MiB through a socket with a small send buffer (the sender waits for
    writability many times); the receiver's SHA-256 matches."""
    size = 64 * MiB
    path = tmp_path / "big"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        block = pattern(MiB, seed=9)
        for i in range(64):
            chunk = block[i:] + block[:i]
            h.update(chunk)
            f.write(chunk)
    _uses_splice(loop)

    def digest(sock):
        d = hashlib.sha256()
        n = 0
        while True:
            b = sock.recv(1 << 20)
            if not b:
                return d.hexdigest(), n
            d.update(b)
            n += len(b)

    async def main():
        lp = loop.loop
        a, b = await _sock_pair(lp, sndbuf=65536)
        try:
            with open(path, "rb") as f:
                reader = lp.run_in_executor(None, digest, b)
                n = await lp.sock_sendfile(a, f, fallback=False)
                assert n == size
                assert f.tell() == size
                a.shutdown(socket.SHUT_WR)
                assert await reader == (h.hexdigest(), size)
        finally:
            a.close()
            b.close()

    loop.run(main(), timeout=120)


def test_transport_sendfile_offset_count(loop, tmp_path):
    size = 3 * MiB + 17
    data = pattern(size, seed=4)
    path = tmp_path / "t"
    path.write_bytes(data)
    _uses_splice(loop)

    async def main():
        lp = loop.loop
        tr, pr, peer = await connect_pair(lp, lambda: RecordingProtocol(lp), rcvbuf=65536)
        try:
            with open(path, "rb") as f:
                reader = lp.run_in_executor(None, read_all, peer, 2 * MiB + 5)
                n = await lp.sendfile(tr, f, offset=MiB, count=2 * MiB, fallback=False)
                assert n == 2 * MiB
                assert f.tell() == 3 * MiB
                tr.write(b"tail!")  # writing works again after sendfile
                got, err = await reader
            assert err is None
            assert got == data[MiB:3 * MiB] + b"tail!"
        finally:
            tr.close()
            peer.close()
        await pr.lost

    loop.run(main())


def test_non_regular_file_falls_back(loop):
    """A pipe as the file: no native path (SendfileNotAvailableError with
    fallback=False), and the fallback fails as the stock loop's does. A file
    object without fileno() goes through the fallback (read + send)."""

    async def main():
        lp = loop.loop
        a, b = await _sock_pair(lp)
        r, w = os.pipe()
        try:
            os.write(w, b"through the fallback")
            os.close(w)
            w = None
            with open(r, "rb", closefd=False) as f:
                with pytest.raises(asyncio.SendfileNotAvailableError):
                    await lp.sock_sendfile(a, f, 0, 20, fallback=False)
            with open(r, "rb", buffering=0, closefd=False) as f:
                # The fallback reads and sends, then sets the position after
                # what it sent, which a pipe refuses: asyncio raises that
                # error after sending, and so must kloop.
                with pytest.raises(OSError) as info:
                    await lp.sock_sendfile(a, f, 0, 20, fallback=True)
                assert info.value.errno == errno.ESPIPE
            a.shutdown(socket.SHUT_WR)
            got, err = await lp.run_in_executor(None, read_all, b)
            assert got == b"through the fallback"
        finally:
            a.close()
            b.close()
            os.close(r)
            if w is not None:
                os.close(w)

        # A file object without fileno(): the same.
        a, b = await _sock_pair(lp)
        try:
            bio = io.BytesIO(b"0123456789")
            with pytest.raises(asyncio.SendfileNotAvailableError):
                await lp.sock_sendfile(a, bio, 2, 5, fallback=False)
            n = await lp.sock_sendfile(a, bio, 2, 5)
            assert n == 5
            assert bio.tell() == 7
            a.shutdown(socket.SHUT_WR)
            got, _ = await lp.run_in_executor(None, read_all, b)
            assert got == b"23456"
        finally:
            a.close()
            b.close()

    loop.run(main())


def test_sendfile_peer_gone_raises(loop, tmp_path):
    """The peer closes in the middle: after bytes were sent, the error is
    raised (not turned into a fallback); the position is where it stopped."""
    size = 16 * MiB
    path = tmp_path / "p"
    path.write_bytes(b"z" * size)

    async def main():
        lp = loop.loop
        a, b = await _sock_pair(lp, sndbuf=65536)
        try:
            with open(path, "rb") as f:
                def read_some_then_close():
                    got = 0
                    while got < MiB:
                        got += len(b.recv(65536))
                    b.close()
                    return got

                reader = lp.run_in_executor(None, read_some_then_close)
                with pytest.raises((BrokenPipeError, ConnectionResetError, ConnectionError)):
                    await lp.sock_sendfile(a, f, fallback=False)
                assert await reader >= MiB
                assert MiB <= f.tell() < size
        finally:
            a.close()
            b.close()

    loop.run(main())


def test_concurrent_sendfiles_and_cancel(loop, tmp_path):
    """Several sendfiles at once on one loop (kloop: one pipe each), and a
    cancelled one leaves the others and the loop working."""
    data = pattern(2 * MiB, seed=5)
    path = tmp_path / "c"
    path.write_bytes(data)

    async def main():
        lp = loop.loop
        pairs = [await _sock_pair(lp, sndbuf=65536) for _ in range(4)]
        files = [open(path, "rb") for _ in range(4)]
        try:
            readers = [lp.run_in_executor(None, read_all, b, len(data)) for _, b in pairs[:3]]
            tasks = [asyncio.ensure_future(lp.sock_sendfile(a, f, fallback=False))
                     for (a, _), f in zip(pairs, files)]
            # The 4th peer never reads: its sendfile blocks; cancel it.
            await asyncio.sleep(0.05)
            tasks[3].cancel()
            with pytest.raises(asyncio.CancelledError):
                await tasks[3]
            assert await asyncio.gather(*tasks[:3]) == [len(data)] * 3
            for (a, _) in pairs[:3]:
                a.shutdown(socket.SHUT_WR)
            for r in readers:
                got, err = await r
                assert err is None and got == data
            # The loop still sends files afterwards.
            a, b = await _sock_pair(lp)
            try:
                reader = lp.run_in_executor(None, read_all, b)
                with open(path, "rb") as f:
                    assert await lp.sock_sendfile(a, f, 10, 100) == 100
                a.shutdown(socket.SHUT_WR)
                assert (await reader)[0] == data[10:110]
            finally:
                a.close()
                b.close()
        finally:
            for a, b in pairs:
                a.close()
                b.close()
            for f in files:
                f.close()

    loop.run(main())


def test_kloop_without_splice_uses_os_sendfile(kloop_module, tmp_path, monkeypatch):
    """kloop on a kernel without IORING_OP_SPLICE (forced with the loop's
    `disable` mask): the os.sendfile() path, with writability waits on the
    ring, gives the same results."""
    from conftest import open_fds
    from kloop import _ffi, _sendfile
    data = pattern(3 * MiB, seed=6)
    path = tmp_path / "n"
    path.write_bytes(data)
    calls = []
    real = os.sendfile

    def counting(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(os, "sendfile", counting)
    before = open_fds()
    lp = kloop_module.IouringProactorEventLoop(
        kloop_module.IouringProactor(config={"disable": _ffi.CAP_SPLICE}))

    async def main():
        a, b = await _sock_pair(lp, sndbuf=65536)
        try:
            with open(path, "rb") as f:
                reader = lp.run_in_executor(None, read_all, b)
                assert await lp.sock_sendfile(a, f, 5, 2 * MiB, fallback=False) == 2 * MiB
                assert f.tell() == 5 + 2 * MiB
                a.shutdown(socket.SHUT_WR)
                got, err = await reader
            assert err is None and got == data[5:5 + 2 * MiB]
        finally:
            a.close()
            b.close()

    try:
        assert not _sendfile.has_splice(lp)
        lp.run_until_complete(asyncio.wait_for(main(), 60))
        lp.run_until_complete(lp.shutdown_default_executor())
    finally:
        lp.close()
    assert calls
    leaked = {fd: t for fd, t in open_fds().items() if before.get(fd) != t}
    assert not leaked, leaked


def test_kloop_loop_closes_with_sendfile_in_flight(kloop_module, tmp_path):
    """Closing a loop while a splice sendfile waits for the socket ends at
    once (the cancelled wait does not start another splice) and closes the
    loop's pipes."""
    import gc
    import time
    from conftest import open_fds
    path = tmp_path / "inflight"
    path.write_bytes(b"q" * (8 * MiB))
    before = open_fds()
    lp = kloop_module.new_event_loop()
    seen = []
    lp.set_exception_handler(lambda loop, ctx: seen.append(ctx.get("message")))
    a, b = socket.socketpair()
    a.setblocking(False)
    f = open(path, "rb")
    try:
        task = lp.create_task(lp.sock_sendfile(a, f))
        lp.run_until_complete(asyncio.sleep(0.1))
        assert not task.done()  # the peer does not read: waiting for POLLOUT
        assert len(lp._kloop_splice_pipes.all) == 1
        t0 = time.monotonic()
        lp.close()
        assert time.monotonic() - t0 < 5
        assert lp._kloop_splice_pipes is None
    finally:
        a.close()
        b.close()
        f.close()
    del task
    gc.collect()
    leaked = {fd: t for fd, t in open_fds().items() if before.get(fd) != t}
    assert not leaked, leaked
