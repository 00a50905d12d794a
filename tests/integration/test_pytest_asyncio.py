"""pytest-asyncio running a small suite on each loop.

The suite (SUITE below) is written to a temporary directory with a
conftest.py that selects the loop in one of the two ways a project would:

* "fixture": it overrides pytest-asyncio's ``event_loop`` fixture to
  return ``kloop.new_event_loop()``;
* "policy":  it calls ``kloop.install()``, and pytest-asyncio's own
  ``event_loop`` fixture asks the policy for a new loop.

The suite runs in a child pytest (warnings are errors there too); its
first test checks the class of the running loop.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import integ_util
from integ_fixtures import loop_name  # noqa: F401  (fixture)

pytest.importorskip("pytest_asyncio",
                    reason="pytest-asyncio is not installed (Debian: python3-pytest-asyncio)")

EXPECTED_LOOP = {
    "asyncio": "asyncio.unix_events._UnixSelectorEventLoop",
    "kloop": "kloop.events.IouringProactorEventLoop",
    "uvloop": "uvloop.Loop",
}

PYTEST_INI = """\
[pytest]
asyncio_mode = strict
filterwarnings =
    error
"""

CONFTEST = {
    "fixture": '''\
import asyncio
import os

import pytest


@pytest.fixture
def event_loop():
    """Every async test of this suite runs on the loop SUITE_LOOP names."""
    if os.environ["SUITE_LOOP"] == "kloop":
        import kloop
        loop = kloop.new_event_loop()
    elif os.environ["SUITE_LOOP"] == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    yield loop
    loop.close()
''',
    "policy": '''\
import os

if os.environ["SUITE_LOOP"] == "kloop":
    import kloop
    kloop.install()          # pytest-asyncio's event_loop fixture asks the policy
elif os.environ["SUITE_LOOP"] == "uvloop":
    import uvloop
    uvloop.install()
''',
}

SUITE = '''\
import asyncio
import os
import socket
import sys

import pytest
import pytest_asyncio


@pytest_asyncio.fixture
async def echo_server():
    async def handle(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_runs_on_the_chosen_loop(event_loop):
    loop = asyncio.get_running_loop()
    assert loop is event_loop
    cls = type(loop)
    assert f"{cls.__module__}.{cls.__qualname__}" == os.environ["SUITE_EXPECTED_LOOP"]


@pytest.mark.asyncio
async def test_streams_through_an_async_fixture(echo_server):
    reader, writer = await asyncio.open_connection(*echo_server)
    payload = bytes(range(256)) * 4096
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    got = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert got == payload


@pytest.mark.asyncio
async def test_subprocess():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; print(sys.stdin.read().upper())",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate(b"shout")
    assert (out, proc.returncode) == (b"SHOUT\\n", 0)


@pytest.mark.asyncio
async def test_timeouts_and_cancellation():
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.sleep(10), 0.05)
    task = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
async def test_threads():
    assert await asyncio.to_thread(sum, range(1000)) == 499500


@pytest.mark.asyncio
async def test_unused_tcp_port_and_sock_calls(unused_tcp_port):
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", unused_tcp_port))
    lsock.listen()
    lsock.setblocking(False)
    csock = socket.socket()
    csock.setblocking(False)
    try:
        accept = asyncio.ensure_future(loop.sock_accept(lsock))
        await loop.sock_connect(csock, ("127.0.0.1", unused_tcp_port))
        conn, _ = await accept
        with conn:
            await loop.sock_sendall(csock, b"hello")
            assert await loop.sock_recv(conn, 5) == b"hello"
    finally:
        csock.close()
        lsock.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("n", [1, 10, 100])
async def test_parametrized(n):
    results = await asyncio.gather(*(asyncio.sleep(0.001, result=i) for i in range(n)))
    assert results == list(range(n))
'''

SUITE_TESTS = 9  # tests in SUITE, counting each parameter


@pytest.mark.parametrize("mode", ["fixture", "policy"])
def test_pytest_asyncio_suite(loop_name, mode):
    d = tempfile.mkdtemp(prefix="kloop-pytest-asyncio-")
    try:
        with open(os.path.join(d, "pytest.ini"), "w") as f:
            f.write(PYTEST_INI)
        with open(os.path.join(d, "conftest.py"), "w") as f:
            f.write(CONFTEST[mode])
        with open(os.path.join(d, "test_suite.py"), "w") as f:
            f.write(SUITE)
        env = integ_util.child_env()
        env["SUITE_LOOP"] = loop_name
        env["SUITE_EXPECTED_LOOP"] = EXPECTED_LOOP[loop_name]
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "asyncio",
             "--rootdir", d, d],
            cwd=d, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=120)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert f"{SUITE_TESTS} passed" in out, out
    finally:
        shutil.rmtree(d, ignore_errors=True)
