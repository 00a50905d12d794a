"""Pipes (issue 4, point 2), on the stock loop and on kloop.

connect_read_pipe / connect_write_pipe on pipes, FIFOs, a pty and a
socketpair; EOF; broken pipe (reader gone: connection_lost with
BrokenPipeError, the process survives: no SIGPIPE death); pause/resume of
reading; write flow control; no busy loop while a pipe is idle.
"""

import asyncio
import os
import pty
import resource
import signal
import socket
import tempfile
import time
import tty

import pytest

from util import RecordingProtocol, check_bytes, pattern


@pytest.fixture(params=("asyncio", "kloop"))
def loop_name(request):
    from conftest import require_loop
    require_loop(request.param)
    return request.param


def _events_of(pr, kind):
    return [e for e in pr.events if isinstance(e, tuple) and e[0] == kind]


async def _wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def _pipe_pair(kind, tmpdir):
    """(read_file, write_file) of one kind: pipe, fifo, pty or socketpair."""
    if kind == "pipe":
        r, w = os.pipe()
    elif kind == "fifo":
        path = os.path.join(tmpdir, "fifo")
        os.mkfifo(path)
        r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        w = os.open(path, os.O_WRONLY)
    elif kind == "pty":
        w, r = pty.openpty()  # write to the master, read from the slave
        tty.setraw(r)
    elif kind == "socketpair":
        a, b = socket.socketpair()
        r, w = a.detach(), b.detach()
    else:
        raise ValueError(kind)
    return open(r, "rb", buffering=0), open(w, "wb", buffering=0)


KINDS = ("pipe", "fifo", "pty", "socketpair")


@pytest.mark.parametrize("kind", KINDS)
def test_read_and_write_pipe_kinds(loop, kind):
    """Data written through connect_write_pipe arrives intact through
    connect_read_pipe; closing the write side gives EOF on the read side
    (for a pty: the reader sees EIO/EOF when the master closes)."""
    size = 4096 if kind == "pty" else 256 * 1024
    payload = pattern(size, seed=len(kind))

    async def main():
        lp = loop.loop
        with tempfile.TemporaryDirectory() as d:
            rf, wf = _pipe_pair(kind, d)
            rtr, rpr = await lp.connect_read_pipe(lambda: RecordingProtocol(lp), rf)
            wtr, wpr = await lp.connect_write_pipe(lambda: RecordingProtocol(lp), wf)
            try:
                wtr.write(payload)
                await _wait_for(lambda: len(rpr.data) >= size)
                assert bytes(rpr.data) == payload
                wtr.close()
                assert await asyncio.wait_for(wpr.lost, 5) is None
                exc = await asyncio.wait_for(rpr.lost, 5)
                if kind == "pty":
                    # Reading a pty slave whose master is closed fails with
                    # EIO; both loops report it the same way (as EOF or as
                    # that error).
                    assert exc is None or isinstance(exc, OSError), repr(exc)
                else:
                    assert exc is None
                    assert "eof" in rpr.events
            finally:
                rtr.close()
                wtr.close()

    loop.run(main())


def test_write_pipe_broken_no_sigpipe(loop):
    """The reader goes away while the transport has queued data: the write
    fails with EPIPE, connection_lost gets BrokenPipeError, and the process
    is not killed by SIGPIPE (even with SIGPIPE's default action)."""

    async def main():
        lp = loop.loop
        rfd, wfd = os.pipe()
        wtr, wpr = await lp.connect_write_pipe(lambda: RecordingProtocol(lp),
                                               open(wfd, "wb", buffering=0))
        try:
            wtr.write(b"x" * (1 << 20))  # more than the pipe holds: queued
            assert wtr.get_write_buffer_size() > 0
            os.close(rfd)
            exc = await asyncio.wait_for(wpr.lost, 5)
            assert isinstance(exc, BrokenPipeError), repr(exc)
        finally:
            wtr.close()

    # Python ignores SIGPIPE at start-up; a library must not depend on that.
    old = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        loop.run(main())
    finally:
        signal.signal(signal.SIGPIPE, old)


def test_write_pipe_reader_closed_while_idle(loop):
    """With nothing queued, the write transport still notices that the
    reader went away (its reader on the write end fires) and closes:
    connection_lost(None) as asyncio's Unix loop reports it (there was no
    data to lose)."""

    async def main():
        lp = loop.loop
        rfd, wfd = os.pipe()
        wtr, wpr = await lp.connect_write_pipe(lambda: RecordingProtocol(lp),
                                               open(wfd, "wb", buffering=0))
        try:
            wtr.write(b"small")
            assert os.read(rfd, 100) == b"small"
            os.close(rfd)
            assert await asyncio.wait_for(wpr.lost, 5) is None
            assert wtr.is_closing()
        finally:
            wtr.close()

    loop.run(main())


def test_read_pipe_pause_resume(loop):
    """While reading is paused nothing is delivered and nothing is lost;
    resume delivers what arrived in the meantime, in order."""

    async def main():
        lp = loop.loop
        rfd, wfd = os.pipe()
        rtr, rpr = await lp.connect_read_pipe(lambda: RecordingProtocol(lp),
                                              open(rfd, "rb", buffering=0))
        try:
            os.write(wfd, b"first")
            await _wait_for(lambda: bytes(rpr.data) == b"first")
            rtr.pause_reading()
            os.write(wfd, b"second")
            await asyncio.sleep(0.1)
            assert bytes(rpr.data) == b"first"
            rtr.resume_reading()
            await _wait_for(lambda: bytes(rpr.data) == b"firstsecond")
            os.close(wfd)
            wfd = None
            assert await asyncio.wait_for(rpr.lost, 5) is None
        finally:
            rtr.close()
            if wfd is not None:
                os.close(wfd)

    loop.run(main())


def test_write_pipe_flow_control(loop):
    """pause_writing above the high-water mark, resume_writing once the
    buffer drains below the low-water mark; everything arrives in order."""

    async def main():
        lp = loop.loop
        rfd, wfd = os.pipe()
        wtr, wpr = await lp.connect_write_pipe(lambda: RecordingProtocol(lp),
                                               open(wfd, "wb", buffering=0))
        try:
            wtr.set_write_buffer_limits(high=128 * 1024, low=16 * 1024)
            assert wtr.get_write_buffer_limits() == (16 * 1024, 128 * 1024)
            payload = pattern(1 << 20, seed=7)
            for i in range(0, len(payload), 65536):
                wpr.write(payload[i:i + 65536])
            assert len(_events_of(wpr, "pause")) == 1
            assert wtr.get_write_buffer_size() > 128 * 1024

            def drain():
                got = bytearray()
                while len(got) < len(payload):
                    got += os.read(rfd, 1 << 20)
                return bytes(got)

            got = await lp.run_in_executor(None, drain)
            check_bytes(got, payload)
            await _wait_for(lambda: _events_of(wpr, "resume"))
            assert wtr.get_write_buffer_size() == 0
            assert len(_events_of(wpr, "resume")) == 1
        finally:
            wtr.close()
            os.close(rfd)

    loop.run(main())


def test_idle_pipes_do_not_spin(loop):
    """An open read pipe and an open write pipe with nobody writing or
    reading: over 0.5 s the loop uses almost no CPU (no busy polling)."""

    async def main():
        lp = loop.loop
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        rtr, rpr = await lp.connect_read_pipe(lambda: RecordingProtocol(lp),
                                              open(r1, "rb", buffering=0))
        wtr, wpr = await lp.connect_write_pipe(lambda: RecordingProtocol(lp),
                                               open(w2, "wb", buffering=0))
        try:
            wtr.write(b"x")  # the write side has written once, then idles
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            c0 = resource.getrusage(resource.RUSAGE_THREAD)
            await asyncio.sleep(0.5)
            c1 = resource.getrusage(resource.RUSAGE_THREAD)
            wall = time.monotonic() - t0
            cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
            assert wall >= 0.5
            assert cpu < 0.05, f"{cpu:.3f} s of CPU in {wall:.3f} s idle"
            assert rpr.data == bytearray()
        finally:
            rtr.close()
            wtr.close()
            os.close(w1)
            os.close(r2)

    loop.run(main())


def test_kloop_read_pipe_is_an_engine_stream(loop):
    """On kloop a read pipe is read by the engine (an io_uring stream), not
    through add_reader(); a data_received() that raises is reported to the
    exception handler and reading goes on, as with asyncio's reader."""
    errors = loop.expect_errors()

    class Raising(RecordingProtocol):
        def data_received(self, data):
            super().data_received(data)
            if bytes(data).startswith(b"boom"):
                raise ZeroDivisionError("from data_received")

    async def main():
        lp = loop.loop
        rfd, wfd = os.pipe()
        rtr, rpr = await lp.connect_read_pipe(lambda: Raising(lp),
                                              open(rfd, "rb", buffering=0))
        try:
            if loop.is_("kloop"):
                assert type(rtr).__name__ == "_EngineReadPipeTransport"
                assert rfd not in lp._proactor._readers
            os.write(wfd, b"boom")
            await _wait_for(lambda: errors)
            os.write(wfd, b" and more")
            await _wait_for(lambda: bytes(rpr.data) == b"boom and more")
            assert not rtr.is_closing()
            os.close(wfd)
            wfd = None
            assert await asyncio.wait_for(rpr.lost, 5) is None
        finally:
            rtr.close()
            if wfd is not None:
                os.close(wfd)
        assert len(errors) == 1
        assert isinstance(errors[0]["exception"], ZeroDivisionError)

    loop.run(main())
