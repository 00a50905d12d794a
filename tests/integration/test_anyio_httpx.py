"""anyio (asyncio backend) and httpx on each loop.

anyio reaches the loop through many doors: create_connection and
connect_accepted_socket (TCP), raw non-blocking sockets with add_reader/
add_writer (Unix sockets, wait_socket_readable/writable, fd passing),
create_datagram_endpoint (UDP), subprocess_exec (processes),
call_soon_threadsafe (threads). httpx goes through anyio's streams.

Note on Debian 12's anyio 3.6.2: UNIXSocketStream.send() resends the whole
buffer instead of the rest after a partial send(), so a Unix-socket write
larger than the socket's free buffer space is corrupted on every loop (seen
with the stock loop through httpx + uvicorn over a Unix socket). The Unix
tests here write less than that at a time.
"""

import asyncio
import hashlib
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading

import pytest

import integ_apps
import integ_util
from integ_fixtures import certs, loop_name  # noqa: F401  (fixtures)

anyio = pytest.importorskip("anyio", reason="anyio is not installed (Debian: python3-anyio)")
from anyio.streams.tls import TLSListener, TLSStream  # noqa: E402

EXPECTED_LOOP = {
    "asyncio": "asyncio.unix_events._UnixSelectorEventLoop",
    "kloop": "kloop.events.IouringProactorEventLoop",
    "uvloop": "uvloop.Loop",
}


@pytest.fixture
def tmpdir_short():
    d = tempfile.mkdtemp(prefix="kloop-anyio-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def echo_handler(stream):
    async with stream:
        try:
            async for chunk in stream:
                await stream.send(chunk)
        except anyio.BrokenResourceError:
            pass


async def exchange(stream, payload, piece=1 << 14):
    """Send `payload` in pieces and read the same number of bytes back."""
    got = bytearray()

    async def reader():
        while len(got) < len(payload):
            got.extend(await stream.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        for i in range(0, len(payload), piece):
            await stream.send(payload[i:i + piece])
    return bytes(got)


def test_tcp_streams(loop):
    payload = integ_util.pattern(4 << 20, seed=20)

    async def main():
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo_handler)
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                assert await exchange(stream, payload) == payload
                assert stream.extra(anyio.abc.SocketAttribute.remote_port) == port
            # 50 clients at once.
            results = []

            async def client(i):
                async with await anyio.connect_tcp("127.0.0.1", port) as s:
                    msg = b"client %d " % i * 100
                    results.append(await exchange(s, msg) == msg)

            async with anyio.create_task_group() as clients:
                for i in range(50):
                    clients.start_soon(client, i)
            assert results == [True] * 50
            tg.cancel_scope.cancel()

    loop.run(main())


def test_unix_streams_and_fd_passing(loop, tmpdir_short):
    path = os.path.join(tmpdir_short, "anyio.sock")
    payload = integ_util.pattern(2 << 20, seed=21)

    async def main():
        received_fds = []
        handler_done = anyio.Event()

        async def handler(stream):
            async with stream:
                msg, fds = await stream.receive_fds(100, 4)
                received_fds.extend(fds)
                await stream.send(msg)
                async for chunk in stream:
                    await stream.send(chunk)
            handler_done.set()

        listener = await anyio.create_unix_listener(path)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handler)
            async with await anyio.connect_unix(path) as stream:
                r, w = os.pipe()
                try:
                    await stream.send_fds(b"here is a pipe", [w])
                    assert await stream.receive() == b"here is a pipe"
                    assert len(received_fds) == 1
                    os.write(received_fds[0], b"through the passed fd")
                    assert os.read(r, 100) == b"through the passed fd"
                finally:
                    for fd in (r, w, *received_fds):
                        os.close(fd)
                assert await exchange(stream, payload, piece=1 << 13) == payload
            # anyio 3.6.2 calls set_result() on a cancelled future (an
            # "InvalidStateError" to the exception handler, on every loop)
            # when a raw-socket receive is cancelled as its fd turns
            # readable: let the handler see EOF and end before cancelling.
            with anyio.fail_after(10):
                await handler_done.wait()
            tg.cancel_scope.cancel()

    loop.run(main())


def test_tls_streams(loop, certs):
    payload = integ_util.pattern(1 << 20, seed=22)

    async def main():
        tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = tcp.extra(anyio.abc.SocketAttribute.local_port)
        listener = TLSListener(tcp, certs.server_context(), standard_compatible=False)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo_handler)
            stream = await anyio.connect_tcp("127.0.0.1", port, ssl_context=certs.client_context(),
                                             tls_standard_compatible=False)
            async with stream:
                assert isinstance(stream, TLSStream)
                assert stream.extra(anyio.streams.tls.TLSAttribute.tls_version).startswith("TLS")
                assert await exchange(stream, payload) == payload
            # The wrong CA: the handshake fails with a certificate error.
            with pytest.raises(Exception) as info:
                await anyio.connect_tcp("127.0.0.1", port, ssl_context=ssl.create_default_context(),
                                        tls_standard_compatible=False)
            assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
            tg.cancel_scope.cancel()

    loop.run(main())


def test_udp(loop):
    async def main():
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as server:
            port = server.extra(anyio.abc.SocketAttribute.local_port)
            async with await anyio.create_connected_udp_socket(
                    "127.0.0.1", port, local_host="127.0.0.1") as client:
                for i in range(100):
                    await client.send(b"dgram %d" % i)
                    data, addr = await server.receive()
                    assert data == b"dgram %d" % i
                    await server.sendto(data.upper(), *addr)
                    assert await client.receive() == b"DGRAM %d" % i

    loop.run(main())


def test_subprocesses(loop):
    payload = integ_util.pattern(1 << 20, seed=23)

    async def main():
        result = await anyio.run_process([sys.executable, "-c", "print('hi from child')"])
        assert result.returncode == 0 and result.stdout == b"hi from child\n"
        with pytest.raises(Exception) as info:
            await anyio.run_process([sys.executable, "-c", "import sys; sys.exit(3)"])
        assert getattr(info.value, "returncode", None) == 3
        # 1 MiB through `cat`: stdin and stdout streamed at the same time.
        async with await anyio.open_process(["cat"]) as proc:
            got = bytearray()

            async def read_all():
                async for chunk in proc.stdout:
                    got.extend(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_all)
                for i in range(0, len(payload), 1 << 15):
                    await proc.stdin.send(payload[i:i + (1 << 15)])
                await proc.stdin.aclose()
            assert await proc.wait() == 0
        assert bytes(got) == payload
        # A process killed on a timeout.
        async with await anyio.open_process([sys.executable, "-c",
                                             "import time; time.sleep(60)"]) as proc:
            with anyio.move_on_after(0.3):
                await proc.wait()
            proc.kill()
            assert await proc.wait() == -9

    loop.run(main())


def test_wait_socket_readable_writable(loop):
    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        try:
            # Nothing to read: the wait is cancelled by a timeout...
            with anyio.move_on_after(0.2) as scope:
                await anyio.wait_socket_readable(a)
            assert scope.cancel_called
            # ... and the fd can be waited on again afterwards.
            async with anyio.create_task_group() as tg:
                async def later():
                    await anyio.sleep(0.1)
                    b.send(b"ping")

                tg.start_soon(later)
                with anyio.fail_after(5):
                    await anyio.wait_socket_readable(a)
            assert a.recv(10) == b"ping"
            with anyio.fail_after(5):
                await anyio.wait_socket_writable(a)
            # Fill the send buffer, then writable again once the peer reads.
            try:
                while True:
                    a.send(b"x" * 65536)
            except BlockingIOError:
                pass

            async def drain():
                await anyio.sleep(0.1)
                while True:
                    try:
                        if not b.recv(1 << 20):
                            break
                    except BlockingIOError:
                        break

            async with anyio.create_task_group() as tg:
                tg.start_soon(drain)
                with anyio.fail_after(5):
                    await anyio.wait_socket_writable(a)
            # Two tasks waiting on one socket: anyio refuses the second.
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.wait_socket_readable, a)
                await anyio.sleep(0.05)
                with pytest.raises(anyio.BusyResourceError):
                    await anyio.wait_socket_readable(a)
                b.send(b"wake")
            assert a.recv(10) == b"wake"
        finally:
            a.close()
            b.close()

    loop.run(main())


def test_threads_and_cancellation(loop):
    async def main():
        # Work in threads, results back through call_soon_threadsafe.
        idents = await asyncio.gather(*(
            anyio.to_thread.run_sync(threading.get_ident) for _ in range(20)))
        assert threading.get_ident() not in idents

        def from_thread():
            return anyio.from_thread.run(anyio.sleep, 0.01) is None

        assert await anyio.to_thread.run_sync(from_thread)
        # Cancel scopes with deadlines.
        with anyio.move_on_after(0.1) as scope:
            await anyio.sleep(10)
        assert scope.cancel_called
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.1):
                await anyio.sleep(10)
        # A cancelled task group.
        done = []
        async with anyio.create_task_group() as tg:
            for i in range(10):
                async def sleeper(i=i):
                    await anyio.sleep(i * 0.01)
                    done.append(i)

                tg.start_soon(sleeper)
            await anyio.sleep(0.045)
            tg.cancel_scope.cancel()
        assert done == list(range(len(done))) and 0 < len(done) < 10

    loop.run(main())


# -- httpx ----------------------------------------------------------------------

httpx = pytest.importorskip("httpx", reason="httpx is not installed (Debian: python3-httpx)")


def test_httpx_tcp_tls_unix(loop, certs, tmpdir_short):
    aiohttp = pytest.importorskip(
        "aiohttp", reason="aiohttp is not installed (Debian: python3-aiohttp)")
    assert aiohttp
    body = integ_util.pattern(4 << 20, seed=24)
    path = os.path.join(tmpdir_short, "h.sock")

    async def main():
        async with integ_apps.AiohttpServed(integ_apps.make_aiohttp()) as plain, \
                integ_apps.AiohttpServed(integ_apps.make_aiohttp(),
                                         ssl_context=certs.server_context()) as tls, \
                integ_apps.AiohttpServed(integ_apps.make_aiohttp(), unix_path=path) as unix:
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.get(plain.url + "/loop")
                assert r.text == EXPECTED_LOOP[loop.name]
                r = await client.post(plain.url + "/upload", content=body)
                assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
                rs = await asyncio.gather(*(client.get(plain.url + "/") for _ in range(50)))
                assert {r.text for r in rs} == {"Hello, world!"}
            async with httpx.AsyncClient(verify=certs.client_context(), timeout=30) as client:
                r = await client.get(tls.url + "/loop")
                assert r.text == EXPECTED_LOOP[loop.name]
                r = await client.post(tls.url + "/upload", content=body)
                assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
                async with client.stream("GET", tls.url + "/stream",
                                         params={"n": 1000, "size": 1000}) as r:
                    assert len(await r.aread()) == 1_000_000
            async with httpx.AsyncClient(timeout=30) as client:
                # (httpx 0.23 over anyio lets the ssl module's error through.)
                with pytest.raises((httpx.ConnectError, ssl.SSLError)) as info:
                    await client.get(tls.url + "/")
                assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
            transport = httpx.AsyncHTTPTransport(uds=path)
            async with httpx.AsyncClient(transport=transport) as client:
                for _ in range(20):
                    r = await client.get(unix.url + "/")
                    assert r.text == "Hello, world!"
                small = body[:50000]  # see the module's note on anyio 3.6.2
                r = await client.post(unix.url + "/upload", content=small)
                assert r.json()["sha256"] == hashlib.sha256(small).hexdigest()

    loop.run(main())


def test_anyio_run_with_policy(loop_name):
    """anyio.run() makes its own loop: backend_options={"policy": ...} picks it."""
    import loops  # tests/conformance/loops.py (tests/conftest.py puts it on sys.path)

    async def main():
        await anyio.sleep(0.01)
        result = await anyio.run_process([sys.executable, "-c", "print(7)"])
        return integ_apps.loop_class(), result.stdout

    try:
        got = anyio.run(main, backend="asyncio",
                        backend_options={"policy": loops.make_policy(loop_name)})
    finally:
        asyncio.set_event_loop_policy(None)
    assert got == (EXPECTED_LOOP[loop_name], b"7\n")
