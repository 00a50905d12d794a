"""Stress: receive buffers held by paused connections, connection churn,
many aborts with queued writes."""

import asyncio
import resource
import socket

import pytest

from util import RecordingProtocol, pattern


class Holder(asyncio.Protocol):
    """Pauses reading as soon as the first bytes arrive; collects all."""

    def __init__(self, loop, expect):
        self.data = bytearray()
        self.expect = expect
        self.first = loop.create_future()
        self.full = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data
        if not self.first.done():
            self.transport.pause_reading()
            self.first.set_result(None)
        if len(self.data) >= self.expect and not self.full.done():
            self.full.set_result(None)


@pytest.mark.slow
def test_paused_connections_do_not_starve_others(loop):
    """300 connections receive data and are paused with it unread (an
    io_uring loop may be holding receive buffers for them); a new connection
    must still echo, and after resume every byte of every connection arrives."""
    # More connections than kloop's default receive buffers (buf_count 256):
    # a loop that kept its buffers for paused streams would run dry.
    n, per_conn = 300, 200 * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= 2 * n + 256, f"RLIMIT_NOFILE {soft} too small"
    blob = pattern(per_conn, seed=21)

    async def main():
        holders = []
        srv = await loop.loop.create_server(
            lambda: holders.append(Holder(loop.loop, per_conn)) or holders[-1],
            "127.0.0.1", 0, backlog=n + 16)
        addr = srv.sockets[0].getsockname()
        clients = []
        try:
            for _ in range(n):
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                c.setblocking(False)
                clients.append(c)
                await loop.loop.sock_connect(c, addr)
            for c in clients:
                # Non-blocking send: as much as the socket buffers take now.
                c.send(blob[:65536])
            await asyncio.wait_for(asyncio.gather(*(h.first for h in holders)), 30)
            assert len(holders) == n

            # Everyone is paused with data pending. A fresh connection works.
            async def echo(r, w):
                w.write(await r.read(100))
                await w.drain()
                w.close()

            srv2 = await asyncio.start_server(echo, "127.0.0.1", 0)
            try:
                r, w = await asyncio.open_connection(*srv2.sockets[0].getsockname())
                w.write(b"still alive")
                assert await asyncio.wait_for(r.read(100), 10) == b"still alive"
                w.close()
                await w.wait_closed()
            finally:
                srv2.close()
                await srv2.wait_closed()

            # Send the rest, resume all, check everything.
            async def rest(c):
                await loop.loop.sock_sendall(c, blob[65536:])

            sends = asyncio.gather(*(rest(c) for c in clients))
            for h in holders:
                h.transport.resume_reading()
            await asyncio.wait_for(asyncio.gather(sends, *(h.full for h in holders)), 60)
            bad = [i for i, h in enumerate(holders) if bytes(h.data) != blob]
            assert not bad, f"{len(bad)} connections got wrong data"
        finally:
            for c in clients:
                c.close()
            for h in holders:
                h.transport.close()
            srv.close()
            await srv.wait_closed()

    loop.run(main(), timeout=120)


def test_connection_churn(loop):
    """3,000 connect/exchange/close cycles in a row: nothing accumulates
    (the fixture checks that no fd is left)."""
    rounds = 3000

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)
            self.transport.close()

    async def main():
        srv = await loop.loop.create_server(Echo, "127.0.0.1", 0, backlog=512)
        addr = srv.sockets[0].getsockname()
        try:
            for i in range(rounds):
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                c.setblocking(False)
                try:
                    await loop.loop.sock_connect(c, addr)
                    msg = b"%d" % i
                    await loop.loop.sock_sendall(c, msg)
                    got = b""
                    while True:
                        d = await loop.loop.sock_recv(c, 100)
                        if not d:
                            break
                        got += d
                    assert got == msg
                finally:
                    c.close()
        finally:
            srv.close()
            await srv.wait_closed()

    loop.run(main(), timeout=120)


def test_many_aborts_with_queued_writes(loop):
    """200 transports with megabytes queued are aborted in one go: each gets
    connection_lost(None) once, and the loop keeps working."""
    n = 200

    async def main():
        lst = socket.create_server(("127.0.0.1", 0), backlog=n + 16)
        lst.setblocking(False)
        peers, pairs = [], []
        try:
            for _ in range(n):
                acc = asyncio.ensure_future(loop.loop.sock_accept(lst))
                tr, pr = await loop.loop.create_connection(
                    lambda: RecordingProtocol(loop.loop), *lst.getsockname())
                peer, _ = await acc
                peers.append(peer)
                pairs.append((tr, pr))
            for tr, _ in pairs:
                tr.write(b"z" * (2 * 1024 * 1024))
            for tr, _ in pairs:
                tr.abort()
            excs = await asyncio.wait_for(asyncio.gather(*(pr.lost for _, pr in pairs)), 30)
            assert excs == [None] * n
            for _, pr in pairs:
                assert [e for e in pr.events if isinstance(e, tuple) and e[0] == "lost"] == [
                    ("lost", None)]
            assert await loop.loop.run_in_executor(None, sum, [1, 2]) == 3
        finally:
            for p in peers:
                p.close()
            lst.close()

    loop.run(main(), timeout=60)
