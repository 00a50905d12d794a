"""A message that waits in the socket whole reaches data_received() in one
call, as on the stock loop (which reads up to 256 KiB at a time). kloop's
engine receives into 64 KiB buffers, so such a message comes out of one
poll as several DATA records; the engine marks the run
(KLOOP_COMPLETION_DATA_NEXT) and the loop joins it into one bytes object
(one copy, one protocol call, one write for an echo)."""

import asyncio
import socket

import pytest

from util import connect_pair, pattern

# (family, size): each larger than one 64 KiB receive buffer, small enough to
# fit in the socket's receive buffer while the loop is not running.
CASES = [(socket.AF_UNIX, 160 * 1024), (socket.AF_INET, 100 * 1024)]


class ChunkProtocol(asyncio.Protocol):
    def __init__(self, loop):
        self.chunks = []
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.chunks.append(data)

    def connection_lost(self, exc):
        self.lost.set_result(exc)


@pytest.mark.parametrize("family,size", CASES, ids=["unix-160k", "tcp-100k"])
def test_message_waiting_whole_in_the_socket_arrives_in_one_call(loop, family, size):
    tr, pr, peer = loop.run(connect_pair(loop.loop, lambda: ChunkProtocol(loop.loop),
                                         family=family))
    try:
        msg = pattern(size, seed=3)
        # The loop is not running: the whole message is in the socket before
        # the loop's next poll.
        peer.sendall(msg)

        async def collect():
            while sum(map(len, pr.chunks)) < size:
                await asyncio.sleep(0.005)

        loop.run(collect(), timeout=10)
        assert b"".join(pr.chunks) == msg
        assert all(type(c) is bytes for c in pr.chunks)
        assert [len(c) for c in pr.chunks] == [size]
        tr.close()
        assert loop.run(pr.lost) is None
    finally:
        peer.close()


def test_runs_of_two_streams_in_one_poll_stay_apart(loop):
    # Two connections with a message each waiting: each protocol gets its own
    # bytes, whole, however the records of the two streams interleave.
    pairs = [loop.run(connect_pair(loop.loop, lambda: ChunkProtocol(loop.loop),
                                   family=socket.AF_UNIX)) for _ in range(2)]
    try:
        msgs = [pattern(150 * 1024, seed=11), pattern(130 * 1024, seed=12)]
        for (_, _, peer), m in zip(pairs, msgs):
            peer.sendall(m)

        async def collect():
            while any(sum(map(len, pr.chunks)) < len(m) for (_, pr, _), m in zip(pairs, msgs)):
                await asyncio.sleep(0.005)

        loop.run(collect(), timeout=10)
        for (tr, pr, _), m in zip(pairs, msgs):
            assert b"".join(pr.chunks) == m
            assert [len(c) for c in pr.chunks] == [len(m)]
            tr.close()
            assert loop.run(pr.lost) is None
    finally:
        for _, _, peer in pairs:
            peer.close()


def test_bytes_that_waited_while_paused_come_in_pieces_of_bounded_size(loop):
    # While reading is paused the engine keeps what the kernel had already
    # received; on resume that can be a run of megabytes. The stock loop
    # reads at most 256 KiB per data_received(); kloop ends a joined piece
    # with the record that takes it to 256 KiB or more, so a piece is at
    # most 256 KiB plus one 64 KiB receive buffer.
    size = 3 * 1024 * 1024
    tr, pr, peer = loop.run(connect_pair(loop.loop, lambda: ChunkProtocol(loop.loop),
                                         family=socket.AF_UNIX))
    try:
        msg = pattern(size, seed=5)

        async def main():
            tr.pause_reading()
            sender = loop.loop.run_in_executor(None, peer.sendall, msg)
            await asyncio.sleep(0.3)      # the peer fills what it can
            for _ in range(100):
                tr.resume_reading()
                await asyncio.sleep(0.01)
                tr.pause_reading()
                if sender.done():
                    break
            tr.resume_reading()
            await sender
            while sum(map(len, pr.chunks)) < size:
                await asyncio.sleep(0.005)

        loop.run(main(), timeout=30)
        assert b"".join(pr.chunks) == msg
        assert max(len(c) for c in pr.chunks) <= (256 + 64) * 1024
        assert len(pr.chunks) >= size // ((256 + 64) * 1024)
        tr.close()
        assert loop.run(pr.lost) is None
    finally:
        peer.close()


class ChunkBufferedProtocol(asyncio.BufferedProtocol):
    """Records each buffer_updated() size; its buffer has `bufsize` bytes."""

    def __init__(self, loop, bufsize):
        self.buf = bytearray(bufsize)
        self.sizes = []
        self.data = bytearray()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, nbytes):
        self.sizes.append(nbytes)
        self.data += self.buf[:nbytes]

    def connection_lost(self, exc):
        self.lost.set_result(exc)


@pytest.mark.parametrize("bufsize", [256 * 1024, 48 * 1024], ids=["256k-buffer", "48k-buffer"])
def test_buffered_protocol_gets_a_waiting_message_in_full_buffers(loop, bufsize):
    # A BufferedProtocol's buffer is filled from as many of the run's
    # records as it takes, as the stock loop's recv_into() fills it from
    # the socket: a 160 KiB message that waits whole takes one
    # buffer_updated() with a 256 KiB buffer, and full 48 KiB buffers (the
    # last one partly) with a 48 KiB one, not one call per 64 KiB record.
    size = 160 * 1024
    tr, pr, peer = loop.run(connect_pair(loop.loop,
                                         lambda: ChunkBufferedProtocol(loop.loop, bufsize),
                                         family=socket.AF_UNIX))
    try:
        msg = pattern(size, seed=7)
        peer.sendall(msg)

        async def collect():
            while len(pr.data) < size:
                await asyncio.sleep(0.005)

        loop.run(collect(), timeout=10)
        assert bytes(pr.data) == msg
        full, last = divmod(size, bufsize)
        assert pr.sizes == [bufsize] * full + ([last] if last else [])
        tr.close()
        assert loop.run(pr.lost) is None
    finally:
        peer.close()
