"""aiohttp's web server and client, on each loop, end to end.

In-process: the server (web.AppRunner) and the client (ClientSession) run
on the loop under test. In a child process: web.run_app() on that loop,
stopped by SIGTERM/SIGINT.
"""

import asyncio
import hashlib
import io
import os
import shutil
import signal
import ssl
import tempfile
import time

import pytest

import integ_apps
import integ_util
from integ_fixtures import certs, loop_name  # noqa: F401  (fixtures)

aiohttp = pytest.importorskip(
    "aiohttp", reason="aiohttp is not installed (Debian: python3-aiohttp)")

Served = integ_apps.AiohttpServed

EXPECTED_LOOP = {
    "asyncio": "asyncio.unix_events._UnixSelectorEventLoop",
    "kloop": "kloop.events.IouringProactorEventLoop",
    "uvloop": "uvloop.Loop",
}


@pytest.fixture(scope="module")
def static_dir():
    d = tempfile.mkdtemp(prefix="kloop-static-")
    with open(os.path.join(d, "big.bin"), "wb") as f:
        f.write(integ_util.pattern(5 << 20, seed=6))
    with open(os.path.join(d, "small.txt"), "w") as f:
        f.write("small file\n")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def record_sendfile(loop):
    """Count the loop's native sendfile calls (what loop.sendfile() uses)."""
    calls = []
    native = loop._sock_sendfile_native

    async def wrapper(sock, file, offset, count):
        try:
            n = await native(sock, file, offset, count)
        except BaseException as exc:
            calls.append(("raised", type(exc).__name__))
            raise
        calls.append(("sent", n))
        return n

    loop._sock_sendfile_native = wrapper
    return calls


def test_static_files_sendfile(loop, static_dir):
    loop.known_failure("uvloop", "uvloop 0.17 has no native sendfile: AttributeError "
                       "'Loop' object has no attribute '_sock_sendfile_native'")
    calls = record_sendfile(loop.loop)
    with open(os.path.join(static_dir, "big.bin"), "rb") as f:
        big = f.read()

    async def main():
        async with Served(integ_apps.make_aiohttp(static_dir)) as srv, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            async with s.get(srv.url + "/loop") as r:
                assert await r.text() == EXPECTED_LOOP[loop.name]
            # Several files in turn on one keep-alive connection: reading
            # resumes after each sendfile.
            for _ in range(3):
                async with s.get(srv.url + "/static/big.bin") as r:
                    assert r.status == 200
                    assert r.headers["Content-Length"] == str(len(big))
                    body = await r.read()
                    assert body == big
                async with s.get(srv.url + "/static/small.txt") as r:
                    assert await r.text() == "small file\n"
            # Ranges: sendfile from an offset.
            async with s.get(srv.url + "/static/big.bin",
                             headers={"Range": "bytes=1000000-2999999"}) as r:
                assert r.status == 206
                assert await r.read() == big[1000000:3000000]
            async with s.get(srv.url + "/static/big.bin",
                             headers={"Range": "bytes=-100"}) as r:
                assert await r.read() == big[-100:]
            async with s.head(srv.url + "/static/big.bin") as r:
                assert r.status == 200
                assert await r.read() == b""
                last_modified = r.headers["Last-Modified"]
            async with s.get(srv.url + "/static/big.bin",
                             headers={"If-Modified-Since": last_modified}) as r:
                assert r.status == 304
            async with s.get(srv.url + "/static/missing") as r:
                assert r.status == 404
            async with s.get(srv.url + "/") as r:
                assert await r.text() == "Hello, world!"

    loop.run(main())
    # Every file body went out through the loop's native sendfile.
    assert len(calls) == 8, calls  # 3 x 2 files, 2 ranges (HEAD sends none)
    assert all(kind == "sent" for kind, _ in calls), calls
    assert sum(n for _, n in calls) == 3 * (len(big) + 11) + 2000000 + 100


def test_streaming_and_large_bodies(loop):
    body = integ_util.pattern(10 << 20, seed=7)

    async def main():
        async with Served(integ_apps.make_aiohttp()) as srv, aiohttp.ClientSession() as s:
            # 10 MB up, from a file object (streamed by the client).
            async with s.post(srv.url + "/upload", data=io.BytesIO(body)) as r:
                got = await r.json()
            assert got == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}

            # Chunked upload from an async generator.
            async def gen():
                for i in range(0, len(body), 1 << 17):
                    yield body[i:i + (1 << 17)]

            async with s.post(srv.url + "/upload", data=gen()) as r:
                got = await r.json()
            assert got["sha256"] == hashlib.sha256(body).hexdigest()
            # A streamed response, 3,000 chunks, read as it comes.
            n = 0
            async with s.get(srv.url + "/stream", params={"n": "3000", "size": "1000"}) as r:
                assert r.headers.get("Transfer-Encoding") == "chunked"
                buf = bytearray()
                async for part in r.content.iter_any():
                    buf += part
                n = len(buf)
            assert n == 3_000_000
            assert all(buf[i * 1000:i * 1000 + 8] == b"%08d" % i for i in range(3000))
            # Chunks 0.2 s apart arrive 0.2 s apart.
            stamps = []
            async with s.get(srv.url + "/stream",
                             params={"n": "4", "size": "100", "delay": "0.2"}) as r:
                async for _ in r.content.iter_chunked(100):
                    stamps.append(time.monotonic())
            assert len(stamps) == 4 and stamps[-1] - stamps[0] > 0.3

    loop.run(main())


def test_websockets(loop):
    async def main():
        async with Served(integ_apps.make_aiohttp()) as srv, aiohttp.ClientSession() as s:
            async with s.ws_connect(srv.url + "/ws", max_msg_size=8 << 20) as ws:
                for i in range(300):
                    await ws.send_str(f"t{i}")
                    assert await ws.receive_str() == f"t{i}"
                big = integ_util.pattern(4 << 20, seed=8)
                await ws.send_bytes(big)
                assert await ws.receive_bytes() == big
                for i in range(500):
                    await ws.send_bytes(b"%d" % i)
                assert [await ws.receive_bytes() for _ in range(500)] == [
                    b"%d" % i for i in range(500)]
                await ws.ping()
            async with s.ws_connect(srv.url + "/ws") as ws:
                await ws.send_str("close-please")
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.CLOSE
                assert ws.close_code == 4001 or msg.data == 4001

    loop.run(main())


def test_client_connection_pool(loop):
    async def main():
        async with Served(integ_apps.make_aiohttp()) as srv:
            conn = aiohttp.TCPConnector(limit=8)
            async with aiohttp.ClientSession(connector=conn) as s:
                async def one():
                    async with s.get(srv.url + "/peer") as r:
                        return (await r.json())["port"]

                ports = await asyncio.gather(*(one() for _ in range(300)))
                # 300 requests shared at most 8 connections, reused.
                assert 1 < len(set(ports)) <= 8
                again = await asyncio.gather(*(one() for _ in range(50)))
                assert set(again) <= set(ports)
            # A session over a Unix socket.
            d = tempfile.mkdtemp(prefix="kloop-aiohttp-")
            try:
                path = os.path.join(d, "s.sock")
                async with Served(integ_apps.make_aiohttp(), unix_path=path) as usrv, \
                        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path)) as s:
                    for _ in range(20):
                        async with s.get(usrv.url + "/") as r:
                            assert await r.text() == "Hello, world!"
                    body = integ_util.pattern(3 << 20, seed=9)
                    async with s.post(usrv.url + "/upload", data=io.BytesIO(body)) as r:
                        assert (await r.json())["sha256"] == hashlib.sha256(body).hexdigest()
            finally:
                shutil.rmtree(d, ignore_errors=True)

    loop.run(main())


def test_client_tls_with_test_ca(loop, certs):
    body = integ_util.pattern(5 << 20, seed=10)

    async def main():
        async with Served(integ_apps.make_aiohttp(), ssl_context=certs.server_context()) as srv:
            ctx = certs.client_context()
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ctx, limit=4)) as s:
                async with s.get(srv.url + "/loop") as r:
                    assert await r.text() == EXPECTED_LOOP[loop.name]
                # A response too long to be read at once keeps its connection.
                async with s.get(srv.url + "/stream", params={"n": "500", "size": "1000"}) as r:
                    sslobj = r.connection.transport.get_extra_info("ssl_object")
                    assert sslobj is not None and sslobj.version().startswith("TLS")
                    assert len(await r.read()) == 500_000
                rs = await asyncio.gather(*(s.get(srv.url + "/") for _ in range(40)))
                assert [await r.text() for r in rs] == ["Hello, world!"] * 40
                for r in rs:
                    r.release()
                async with s.post(srv.url + "/upload", data=io.BytesIO(body)) as r:
                    assert (await r.json())["sha256"] == hashlib.sha256(body).hexdigest()
                async with s.get(srv.url + "/stream", params={"n": "2000", "size": "1000"}) as r:
                    assert len(await r.read()) == 2_000_000
                async with s.ws_connect(srv.url.replace("https", "wss") + "/ws") as ws:
                    await ws.send_str("over tls")
                    assert await ws.receive_str() == "over tls"
            # Without the test CA the certificate is refused.
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await s.get(srv.url + "/")

    loop.run(main())


async def connect_proxy(seen):
    """A minimal HTTP CONNECT proxy on the running loop; `seen` gets targets."""

    async def pipe(reader, writer):
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = request.split(b"\r\n", 1)[0].split(b" ", 2)
            assert method == b"CONNECT", request
            host, port = target.decode().rsplit(":", 1)
            seen.append(target.decode())
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_client_https_through_connect_proxy(loop, certs):
    """HTTPS through an HTTP proxy: CONNECT, then loop.start_tls() on the
    proxy connection."""
    loop.known_failure("uvloop", "uvloop 0.17's transports lack _start_tls_compatible: "
                       "aiohttp 3.8 warns that TLS in TLS is not supported (RuntimeWarning)")

    async def main():
        seen = []
        proxy, proxy_url = await connect_proxy(seen)
        try:
            async with Served(integ_apps.make_aiohttp(),
                              ssl_context=certs.server_context()) as srv:
                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(ssl=certs.client_context())) as s:
                    async with s.get(srv.url + "/loop", proxy=proxy_url) as r:
                        assert await r.text() == EXPECTED_LOOP[loop.name]
                    async with s.get(srv.url + "/stream", params={"n": "500", "size": "1000"},
                                     proxy=proxy_url) as r:
                        assert r.connection.transport.get_extra_info("ssl_object") is not None
                        assert len(await r.read()) == 500_000
                    body = integ_util.pattern(2 << 20, seed=11)
                    async with s.post(srv.url + "/upload", data=io.BytesIO(body),
                                      proxy=proxy_url) as r:
                        assert (await r.json())["sha256"] == hashlib.sha256(body).hexdigest()
                    with pytest.raises(aiohttp.ClientConnectorCertificateError):
                        await s.get(srv.url + "/", proxy=proxy_url,
                                    ssl=ssl.create_default_context())
            assert seen and all(t == f"127.0.0.1:{srv.port}" for t in seen)
        finally:
            proxy.close()
            await proxy.wait_closed()

    loop.run(main())


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_run_app_signals(loop_name, static_dir, sig):
    """web.run_app(app, loop=...) serves, then a signal runs the shutdown
    and cleanup hooks and run_app returns; the process exits with 0."""
    port = integ_util.free_port()
    srv = integ_util.PythonServer(
        ["serve_aiohttp.py", "--loop", loop_name, "--port", str(port), "--static", static_dir],
        [("127.0.0.1", port)], f"aiohttp run_app on {loop_name}")
    try:
        import urllib.request

        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/loop", timeout=10) as r:
            assert r.read().decode() == EXPECTED_LOOP[loop_name]
        with urllib.request.urlopen(base + "/static/big.bin", timeout=10) as r:
            assert len(r.read()) == 5 << 20
        srv.proc.send_signal(getattr(signal, sig))
        status = srv.proc.wait(20)
        text = srv.output()
        assert status == 0, text
        assert "hook: on_shutdown" in text and "hook: on_cleanup" in text, text
        assert "run_app returned" in text, text
        assert "Traceback" not in text and "Error" not in text, text
        assert not integ_util.can_connect(("127.0.0.1", port))
    finally:
        srv.cleanup()
