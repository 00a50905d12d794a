"""Python memory per idle connection: kloop's transports must not cost more
than the stock loop's (the engine's own memory per stream is checked by
the engine tests and measured by `benchmarks/run.py memory`)."""

import asyncio
import gc
import socket
import tracemalloc

from conftest import harness_for

N = 300


class _Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


def _python_bytes_per_connection(name):
    """tracemalloc growth per idle server connection (its client sockets
    included: they are the same on every loop)."""
    h = harness_for(name)
    loop = h.loop
    socks = []

    async def main():
        srv = await loop.create_server(_Echo, "127.0.0.1", 0, backlog=N)
        port = srv.sockets[0].getsockname()[1]
        try:
            # one connection first: lazily made state is not per connection
            warm = socket.create_connection(("127.0.0.1", port))
            await asyncio.sleep(0.05)
            warm.close()
            await asyncio.sleep(0.05)
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for _ in range(N):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                    s.setblocking(False)
                    socks.append(s)
                    await loop.sock_connect(s, ("127.0.0.1", port))
                for s in socks:
                    s.send(b"x")
                for s in socks:   # every connection echoed once, then idle
                    assert await loop.sock_recv(s, 1) == b"x"
                gc.collect()
                after = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            return (after - before) / N
        finally:
            for s in socks:
                s.close()
            srv.close()
            await srv.wait_closed()

    try:
        return h.run(main())
    finally:
        h.close()


def test_python_memory_per_idle_connection_not_above_asyncio():
    base = _python_bytes_per_connection("asyncio")
    ours = _python_bytes_per_connection("kloop")
    # Measured here: asyncio ~1.7 KiB, kloop ~1.75 KiB (3.0 KiB before its
    # transports used slots: past 30 attributes each got a dict of its own).
    assert ours <= base * 1.15, (
        f"kloop uses {ours:.0f} B of Python memory per idle connection, "
        f"asyncio {base:.0f} B")


def test_accepted_connections_share_equal_address_values():
    # The server side of every connection on one listener has the same
    # local address (and the peers the same host): kloop keeps one tuple
    # (one host string) for them instead of one per connection, without
    # changing what get_extra_info() answers.
    h = harness_for("kloop")
    loop = h.loop
    transports = []

    class Keep(asyncio.Protocol):
        def connection_made(self, transport):
            transports.append(transport)

    async def main():
        srv = await loop.create_server(Keep, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        socks = []
        try:
            for _ in range(3):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                s.setblocking(False)
                socks.append(s)
                await loop.sock_connect(s, ("127.0.0.1", port))
            while len(transports) < 3:
                await asyncio.sleep(0.01)
            names = [t.get_extra_info("sockname") for t in transports]
            peers = [t.get_extra_info("peername") for t in transports]
            for t in transports:
                sock = t.get_extra_info("socket")
                assert t.get_extra_info("sockname") == sock.getsockname() == ("127.0.0.1", port)
                assert t.get_extra_info("peername") == sock.getpeername()
            assert sorted(p[1] for p in peers) == sorted(s.getsockname()[1] for s in socks)
            assert names[0] is names[1] is names[2]
            assert peers[0][0] is peers[1][0] is peers[2][0]
        finally:
            for t in transports:
                t.close()
            for s in socks:
                s.close()
            srv.close()
            await srv.wait_closed()

    try:
        h.run(main())
    finally:
        h.close()
