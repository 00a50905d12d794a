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
