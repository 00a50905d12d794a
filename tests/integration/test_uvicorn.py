"""uvicorn serving Starlette and FastAPI apps, on each loop, end to end.

The server is a child process (serve_uvicorn.py) running uvicorn on the
loop under test; the client (httpx, websockets) runs on the same kind of
loop in the test process. Each server answers /loop with its loop's class,
and its log must stay free of tracebacks and errors.
"""

import asyncio
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

import integ_util
from integ_fixtures import certs, loop_name  # noqa: F401  (fixtures)

httpx = pytest.importorskip("httpx", reason="httpx is not installed (Debian: python3-httpx)")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (Debian: python3-uvicorn)")
pytest.importorskip("starlette", reason="Starlette is not installed (Debian: python3-starlette)")

EXPECTED_LOOP = {
    "asyncio": "asyncio.unix_events._UnixSelectorEventLoop",
    "kloop": "kloop.events.IouringProactorEventLoop",
    "uvloop": "uvloop.Loop",
}
STARLETTE = "integ_apps:starlette_app"
FASTAPI = "integ_apps:fastapi_app"
# Lines in a server's log that mean something went wrong in it.
BAD_LOG = re.compile(r"Traceback|ERROR|Exception in|exception was never retrieved|Unclosed")


class UvicornServer(integ_util.PythonServer):
    def __init__(self, loop, app=STARLETTE, http="auto", ws="auto", uds=None, certs=None):
        self.loop_name = loop
        args = ["serve_uvicorn.py", "--loop", loop, "--app", app, "--http", http, "--ws", ws]
        if certs is not None:
            args += ["--ssl-certfile", certs.cert, "--ssl-keyfile", certs.key]
        if uds:
            self.port = None
            self.url = "http://localhost"
            args += ["--uds", uds]
            addresses = [uds]
        else:
            self.port = integ_util.free_port()
            scheme = "https" if certs is not None else "http"
            self.url = f"{scheme}://127.0.0.1:{self.port}"
            args += ["--port", str(self.port)]
            addresses = [("127.0.0.1", self.port)]
        super().__init__(args, addresses, f"uvicorn ({app}, {http}, ws={ws}) on {loop}")
        self._log_offset = 0

    def new_log(self):
        with open(self.log, "rb") as f:
            f.seek(self._log_offset)
            text = f.read().decode("utf-8", "replace")
        self._log_offset += len(text.encode("utf-8"))
        return text

    def check_log(self):
        text = self.new_log()
        bad = [line for line in text.splitlines() if BAD_LOG.search(line)]
        assert not bad, f"{self.what} logged errors:\n{text}"


class ServerSet:
    """uvicorn servers started on first use, shared by a module's tests."""

    def __init__(self):
        self.servers = {}
        self.used = []

    def get(self, loop, app=STARLETTE, http="auto", ws="auto"):
        key = (loop, app, http, ws)
        if key not in self.servers:
            self.servers[key] = UvicornServer(loop, app, http, ws)
        srv = self.servers[key]
        self.used.append(srv)
        return srv

    def stop_all(self):
        failures = []
        for srv in self.servers.values():
            status = srv.stop()
            text = srv.new_log()
            if status != 0 or "Finished server process" not in text:
                failures.append(f"{srv.what}: exit status {status} after SIGTERM; log:\n{text}")
            srv.cleanup()
        self.servers.clear()
        assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def _server_set():
    s = ServerSet()
    try:
        yield s
    finally:
        s.stop_all()


@pytest.fixture
def servers(_server_set):
    _server_set.used = []
    yield _server_set
    for srv in _server_set.used:
        srv.check_log()


def have(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


async def check_loop(client, srv):
    r = await client.get(srv.url + "/loop")
    assert r.status_code == 200
    assert r.text == EXPECTED_LOOP[srv.loop_name]


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_keepalive_and_concurrency(loop, servers, http):
    if http == "httptools" and not have("httptools"):
        pytest.skip("httptools is not installed (Debian: python3-httptools)")
    srv = servers.get(loop.name, http=http)

    async def main():
        # One connection, 200 requests on it: the server sees one peer port.
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as client:
            await check_loop(client, srv)
            ports = set()
            for _ in range(200):
                r = await client.get(srv.url + "/peer")
                assert r.status_code == 200
                assert r.headers.get("connection", "keep-alive") != "close"
                ports.add(r.json()["port"])
            assert len(ports) == 1
        # 100 concurrent requests on up to 50 connections.
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as client:
            rs = await asyncio.gather(*(client.get(srv.url + "/") for _ in range(100)))
            assert [r.status_code for r in rs] == [200] * 100
            assert {r.text for r in rs} == {"Hello, world!"}
            ports = await asyncio.gather(*(client.get(srv.url + "/peer") for _ in range(100)))
            assert len({p.json()["port"] for p in ports}) > 1

    loop.run(main())


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_10mb_bodies(loop, servers, http):
    if http == "httptools" and not have("httptools"):
        pytest.skip("httptools is not installed (Debian: python3-httptools)")
    srv = servers.get(loop.name, http=http)
    body = integ_util.pattern(10 << 20, seed=3)

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            # A 10 MB request body, sent in one piece and sent chunked.
            r = await client.post(srv.url + "/upload", content=body)
            assert r.status_code == 200
            assert r.json()["size"] == len(body)
            assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
            assert r.json()["chunks"] > 1  # it arrived in pieces, as it should

            async def chunks():
                for i in range(0, len(body), 1 << 16):
                    yield body[i:i + (1 << 16)]

            r = await client.post(srv.url + "/upload", content=chunks())
            assert r.json()["size"] == len(body)
            assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
            # A 10 MB response body.
            r = await client.get(srv.url + "/blob", params={"size": 10 << 20})
            assert r.status_code == 200
            assert len(r.content) == 10 << 20
            assert r.content[:64] == hashlib.sha256(b"blob").digest() * 2

    loop.run(main())


def test_streaming_response(loop, servers):
    srv = servers.get(loop.name)

    async def main():
        async with httpx.AsyncClient(timeout=30) as client:
            # 2,000 chunks of 1,000 bytes, in order.
            got = bytearray()
            async with client.stream("GET", srv.url + "/stream",
                                     params={"n": 2000, "size": 1000}) as r:
                assert r.status_code == 200
                assert r.headers["transfer-encoding"] == "chunked"
                async for part in r.aiter_bytes():
                    got += part
            assert len(got) == 2_000_000
            assert all(got[i * 1000:i * 1000 + 8] == b"%08d" % i for i in range(2000))
            # Chunks produced 0.2 s apart arrive as they are produced.
            times = []
            async with client.stream("GET", srv.url + "/stream",
                                     params={"n": 4, "size": 100, "delay": 0.2}) as r:
                async for _ in r.aiter_raw():
                    times.append(time.monotonic())
            # (Under load two chunks may share a read: only the spread counts.)
            assert len(times) >= 2
            assert times[-1] - times[0] > 0.3

    loop.run(main())


@pytest.mark.parametrize("ws", ["websockets", "wsproto"])
def test_websockets(loop, servers, ws):
    websockets = pytest.importorskip(
        "websockets", reason="websockets is not installed (Debian: python3-websockets)")
    if ws == "wsproto" and not have("wsproto"):
        pytest.skip("wsproto is not installed (Debian: python3-wsproto)")
    srv = servers.get(loop.name, ws=ws)
    uri = srv.url.replace("http://", "ws://") + "/ws"

    async def main():
        async with websockets.connect(uri, max_size=4 << 20) as conn:
            for i in range(200):
                await conn.send(f"text {i}")
                assert await conn.recv() == f"text {i}"
            big = integ_util.pattern(2 << 20, seed=4)
            await conn.send(big)
            assert await conn.recv() == big
            # Many messages in flight at once.
            for i in range(500):
                await conn.send(b"%d" % i)
            assert [await conn.recv() for _ in range(500)] == [b"%d" % i for i in range(500)]
            await conn.ping()
        # The server closes with a code of its own.
        async with websockets.connect(uri) as conn:
            await conn.send("close-please")
            with pytest.raises(websockets.ConnectionClosed) as info:
                await conn.recv()
            assert info.value.code == 4001

    loop.run(main())


def test_unix_socket(loop):
    d = tempfile.mkdtemp(prefix="kloop-uds-")
    path = os.path.join(d, "uvicorn.sock")
    srv = UvicornServer(loop.name, uds=path)
    try:
        async def main():
            transport = httpx.AsyncHTTPTransport(uds=path)
            async with httpx.AsyncClient(transport=transport) as client:
                await check_loop(client, srv)
                for _ in range(50):
                    r = await client.get(srv.url + "/")
                    assert r.text == "Hello, world!"
                body = integ_util.pattern(20000, seed=5)
                r = await client.post(srv.url + "/upload", content=body)
                assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
            # A large body through aiohttp's Unix connector: anyio 3.6.2
            # (Debian 12), under httpx, corrupts a Unix-socket send that the
            # kernel takes in part (UNIXSocketStream.send() sends `item`
            # again instead of the rest, `view`), on every loop.
            try:
                import aiohttp
            except ImportError:
                return
            async with aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=path)) as session:
                body = integ_util.pattern(3 << 20, seed=5)
                async with session.post(srv.url + "/upload", data=io.BytesIO(body)) as r:
                    assert (await r.json())["sha256"] == hashlib.sha256(body).hexdigest()

        loop.run(main())
        assert srv.stop() == 0
        srv.check_log()
    finally:
        srv.cleanup()
        shutil.rmtree(d, ignore_errors=True)


def test_tls(loop, certs):
    """uvicorn with --ssl-certfile/--ssl-keyfile: TLS on the server's loop
    (asyncio's sslproto over the loop's transports), 10 MB each way, wss."""
    websockets = pytest.importorskip(
        "websockets", reason="websockets is not installed (Debian: python3-websockets)")
    srv = UvicornServer(loop.name, certs=certs)
    body = integ_util.pattern(10 << 20, seed=12)
    try:
        async def main():
            async with httpx.AsyncClient(verify=certs.client_context(), timeout=60) as client:
                await check_loop(client, srv)
                rs = await asyncio.gather(*(client.get(srv.url + "/") for _ in range(30)))
                assert {r.text for r in rs} == {"Hello, world!"}
                r = await client.post(srv.url + "/upload", content=body)
                assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
                r = await client.get(srv.url + "/blob", params={"size": 10 << 20})
                assert len(r.content) == 10 << 20
            async with websockets.connect(srv.url.replace("https://", "wss://") + "/ws",
                                          ssl=certs.client_context(), max_size=4 << 20) as conn:
                big = integ_util.pattern(3 << 20, seed=13)
                await conn.send(big)
                assert await conn.recv() == big

        loop.run(main())
        assert srv.stop() == 0
        srv.check_log()
    finally:
        srv.cleanup()


def test_fastapi(loop, servers):
    pytest.importorskip("fastapi", reason="FastAPI is not installed (Debian: python3-fastapi)")
    websockets = pytest.importorskip(
        "websockets", reason="websockets is not installed (Debian: python3-websockets)")
    srv = servers.get(loop.name, app=FASTAPI)

    async def main():
        async with httpx.AsyncClient() as client:
            await check_loop(client, srv)
            r = await client.post(srv.url + "/items/7",
                                  json={"name": "box", "price": 2.5, "tags": ["a", "b"]})
            assert r.status_code == 200
            assert r.json() == {"id": 7, "name": "box", "total": 5.0}
            r = await client.get(srv.url + "/items/7")
            assert r.json() == {"name": "box", "price": 2.5, "tags": ["a", "b"]}
            r = await client.get(srv.url + "/items/8")
            assert r.status_code == 404
            r = await client.post(srv.url + "/items/9", json={"name": "no price"})
            assert r.status_code == 422
            assert r.json()["detail"][0]["loc"] == ["body", "price"]
            r = await client.get(srv.url + "/openapi.json")
            assert "/items/{item_id}" in r.json()["paths"]
        async with websockets.connect(srv.url.replace("http://", "ws://") + "/ws") as conn:
            for word in ("alpha", "beta", "x" * 100000):
                await conn.send(word)
                assert json.loads(await conn.recv()) == {
                    "echo": word, "len": len(word)}

    loop.run(main())


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_graceful_shutdown(loop, sig):
    """A signal stops accepting at once, lets the request in flight finish,
    runs the app's shutdown, and exits with status 0."""
    srv = UvicornServer(loop.name)
    try:
        async def main():
            async with httpx.AsyncClient(timeout=20) as client:
                await check_loop(client, srv)
                inflight = asyncio.ensure_future(client.get(srv.url + "/slow",
                                                            params={"t": 1.5}))
                await asyncio.sleep(0.5)
                assert not inflight.done()
                t0 = time.monotonic()
                srv.proc.send_signal(getattr(signal, sig))
                # Listening stops: new connections are refused.
                for _ in range(100):
                    await asyncio.sleep(0.05)
                    if not integ_util.can_connect(("127.0.0.1", srv.port)):
                        break
                else:
                    pytest.fail("still accepting connections 5 s after " + sig)
                r = await inflight
                assert (r.status_code, r.text) == (200, "slow done")
                return t0

        t0 = loop.run(main())
        status = srv.proc.wait(20)
        assert status == 0, srv.output()
        assert time.monotonic() - t0 < 10
        text = srv.new_log()
        assert "Shutting down" in text and "Finished server process" in text, text
        assert "Application shutdown complete" in text, text
        assert not [line for line in text.splitlines() if BAD_LOG.search(line)], text
    finally:
        srv.cleanup()


def test_wrk_load(loop_name, servers):
    """A few seconds of wrk (keep-alive, 32 connections): no error of any kind."""
    wrk = integ_util.which("wrk")
    if wrk is None:
        pytest.skip("wrk is not installed (Debian: wrk)")
    srv = servers.get(loop_name)
    r = subprocess.run([wrk, "-t1", "-c32", "-d3s", "--timeout", "5s", srv.url + "/"],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    m = re.search(r"(\d+) requests in", out)
    assert m, out
    assert int(m.group(1)) > 300, out
    assert "Socket errors" not in out, out
    assert "Non-2xx" not in out, out
    # The server is still fine afterwards.
    with httpx.Client() as client:
        assert client.get(srv.url + "/loop").text == EXPECTED_LOOP[loop_name]


def gunicorn(loop_name, workers, *extra):
    if not have("gunicorn"):
        pytest.skip("gunicorn is not installed (Debian: gunicorn)")
    worker = {"asyncio": "AsyncioUvicornWorker", "kloop": "KloopUvicornWorker"}.get(loop_name)
    if worker is None:
        pytest.skip(f"no gunicorn worker class for {loop_name}")
    port = integ_util.free_port()
    srv = integ_util.PythonServer(
        ["-m", "gunicorn", "-k", f"kloop_uvicorn_worker.{worker}", "-w", str(workers),
         "-b", f"127.0.0.1:{port}", "--graceful-timeout", "10", *extra, STARLETTE],
        [("127.0.0.1", port)], f"gunicorn ({worker})")
    srv.url = f"http://127.0.0.1:{port}"
    return srv


def test_gunicorn_uvicorn_workers(loop_name):
    """gunicorn with 2 uvicorn workers on the loop (kloop_uvicorn_worker.py):
    both workers take connections from the shared listening socket, and
    SIGTERM stops them all cleanly."""
    workers = 2
    srv = gunicorn(loop_name, workers)
    try:
        url = srv.url
        pids = {}
        deadline = time.monotonic() + 8
        # Each worker boots on its own; ask on new connections until every
        # worker has answered (or the time is up: that fails below). Three
        # requests a round, two of them asking for the pid: a kernel that
        # hands connections to the workers in strict turn (kloop's accepts
        # queue up that way) would otherwise answer every "/pid" of an
        # even-length round from the same worker.
        with httpx.Client(headers={"connection": "close"}, timeout=10) as client:
            while len(pids) < workers and time.monotonic() < deadline:
                r = client.get(url + "/loop")
                assert r.status_code == 200
                assert r.text == EXPECTED_LOOP[loop_name]
                for _ in range(2):
                    pid = client.get(url + "/pid").text
                    pids[pid] = pids.get(pid, 0) + 1
            for _ in range(50):
                assert client.get(url + "/").text == "Hello, world!"
        assert len(pids) == workers, (pids, srv.output())
        assert srv.stop(signal.SIGTERM, timeout=20) == 0, srv.output()
        text = srv.output()
        assert text.count("Finished server process") == workers, text
        assert not [line for line in text.splitlines()
                    if BAD_LOG.search(line) and "Shutting down" not in line], text
    finally:
        srv.cleanup()


def test_gunicorn_worker_restarts(loop_name):
    """--max-requests: workers restart after 20 requests each while a client
    keeps coming. A worker that stops serving must leave the listening
    socket it shares with the others listening: no connection is refused."""
    srv = gunicorn(loop_name, 2, "--max-requests", "20")
    try:
        ok = 0
        refused = []
        reset = []
        deadline = time.monotonic() + 20
        with httpx.Client(headers={"connection": "close"}, timeout=10) as client:
            # Until 6 workers have been started (4 restarts), or 20 s.
            while time.monotonic() < deadline and srv.output().count("Booting worker") < 6:
                time.sleep(0.005)
                try:
                    r = client.get(srv.url + "/loop")
                except httpx.ConnectError as exc:
                    refused.append(f"{time.strftime('%H:%M:%S')} {exc!r}")
                    continue
                except httpx.TransportError as exc:
                    # A connection accepted by a worker that is stopping is
                    # closed unanswered: seen now and then on the stock loop.
                    reset.append(f"{time.strftime('%H:%M:%S')} {exc!r}")
                    continue
                assert r.text == EXPECTED_LOOP[loop_name]
                ok += 1
        text = srv.output()
        assert text.count("Booting worker") >= 6, text  # workers were restarted
        assert not refused, (f"{len(refused)} of {ok + len(refused) + len(reset)} "
                             "connections refused", refused[:3], text)
        assert len(reset) <= 10, (f"{len(reset)} requests reset", reset[:3], text)
        assert srv.stop(signal.SIGTERM, timeout=20) == 0, srv.output()
    finally:
        srv.cleanup()


def test_documented_cli_one_liner(loop_name):
    """docs/integrations.md's command line: kloop's policy installed before
    uvicorn's own CLI, `--loop asyncio` so that uvicorn keeps it."""
    if loop_name == "kloop":
        code = "import kloop, uvicorn.main; kloop.install(); uvicorn.main.main()"
    elif loop_name == "asyncio":
        code = "import uvicorn.main; uvicorn.main.main()"
    else:
        pytest.skip(f"no one-liner documented for {loop_name}")
    port = integ_util.free_port()
    srv = integ_util.PythonServer(
        ["-c", code, STARLETTE, "--loop", "asyncio", "--port", str(port)],
        [("127.0.0.1", port)], f"uvicorn CLI on {loop_name}")
    try:
        with httpx.Client() as client:
            r = client.get(f"http://127.0.0.1:{port}/loop")
        assert r.text == EXPECTED_LOOP[loop_name]
        assert srv.stop() == 0, srv.output()
    finally:
        srv.cleanup()
