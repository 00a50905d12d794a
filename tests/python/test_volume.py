"""Volume: one big transfer, many concurrent connections."""

import asyncio
import hashlib
import os
import resource
import socket

import pytest

MiB = 1024 * 1024


class HashingServer(asyncio.Protocol):
    """Hashes everything it receives; on EOF answers '<count> <sha256>'."""

    def __init__(self):
        self.h = hashlib.sha256()
        self.n = 0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.h.update(data)
        self.n += len(data)

    def eof_received(self):
        self.transport.write(b"%d %s" % (self.n, self.h.hexdigest().encode()))
        self.transport.close()
        return True


class Sender(asyncio.Protocol):
    def __init__(self, loop):
        self.can_write = loop.create_future()
        self.can_write.set_result(None)
        self.loop = loop
        self.reply = bytearray()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def pause_writing(self):
        self.can_write = self.loop.create_future()

    def resume_writing(self):
        self.can_write.set_result(None)

    def data_received(self, data):
        self.reply += data

    def connection_lost(self, exc):
        self.lost.set_result(exc)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_256MiB_transfer_intact(loop, family, tmp_path):
    """256 MiB of distinct 1 MiB blocks arrive complete and in order."""
    total = 256 * MiB
    base = os.urandom(MiB)

    async def main():
        if family == "tcp":
            srv = await loop.loop.create_server(HashingServer, "127.0.0.1", 0)
            tr, pr = await loop.loop.create_connection(
                lambda: Sender(loop.loop), *srv.sockets[0].getsockname())
        else:
            path = str(tmp_path / "big.sock")
            srv = await loop.loop.create_unix_server(HashingServer, path)
            tr, pr = await loop.loop.create_unix_connection(lambda: Sender(loop.loop), path)
        try:
            h = hashlib.sha256()
            for i in range(total // MiB):
                # Each block differs (its index at the front) so that a
                # lost, doubled or reordered block changes the digest.
                block = i.to_bytes(8, "little") + base[8:]
                h.update(block)
                await pr.can_write
                tr.write(block)
            tr.write_eof()
            exc = await pr.lost
            assert exc is None
            assert bytes(pr.reply) == b"%d %s" % (total, h.hexdigest().encode())
        finally:
            tr.close()
            srv.close()
            await srv.wait_closed()

    loop.run(main(), timeout=120)


def _raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft, hard
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if new < need:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {need} needed", pytrace=False)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return soft, hard


@pytest.mark.slow
def test_2000_concurrent_connections_echo(loop):
    """2,000 connections open at once, each echoing its own message."""
    n_conns = 2000
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    _raise_nofile(2 * n_conns + 512)

    async def echo(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def client(i, addr, all_connected, results):
        reader, writer = await asyncio.open_connection(*addr)
        try:
            msg = b"conn %d " % i + bytes([i % 251]) * (i % 3000)
            all_connected[0] += 1
            if all_connected[0] == n_conns:
                all_connected[1].set_result(None)
            # Every client holds its connection until all are open.
            await all_connected[1]
            writer.write(msg)
            got = await reader.readexactly(len(msg))
            results[i] = got == msg
        finally:
            writer.close()
            await writer.wait_closed()

    async def main():
        srv = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=n_conns + 64)
        try:
            addr = srv.sockets[0].getsockname()
            results = [None] * n_conns
            all_connected = [0, loop.loop.create_future()]
            await asyncio.gather(*(client(i, addr, all_connected, results)
                                   for i in range(n_conns)))
            assert results.count(True) == n_conns
        finally:
            srv.close()
            await srv.wait_closed()

    try:
        loop.run(main(), timeout=120)
    finally:
        loop.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_nodelay_on_tcp_transports(loop):
    """Like asyncio, TCP transports have TCP_NODELAY set (server and client)."""

    async def main():
        accepted = loop.loop.create_future()

        class P(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.set_result(transport)

        srv = await loop.loop.create_server(P, "127.0.0.1", 0)
        try:
            tr, _ = await loop.loop.create_connection(
                asyncio.Protocol, *srv.sockets[0].getsockname())
            str_ = await accepted
            for t in (tr, str_):
                s = t.get_extra_info("socket")
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            tr.close()
            str_.close()
        finally:
            srv.close()
            await srv.wait_closed()

    loop.run(main())
