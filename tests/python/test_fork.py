"""fork(): a kloop loop inherited by a child is unusable there (a clear
RuntimeError), closing it in the child leaves the parent's loop intact, and
a new loop in the child works.

The stock loop is not parametrized here on purpose: asyncio's selector loop
keeps working after fork (its epoll fd is shared), which BRIEF.md 3.3 says
kloop must not imitate (an io_uring ring is not usable across fork)."""

import asyncio
import json
import os
import socket


async def _echo_roundtrip(loop, payload):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        await loop.sock_sendall(a, payload)
        got = b""
        while len(got) < len(payload):
            got += await loop.sock_recv(b, 65536)
        return got
    finally:
        a.close()
        b.close()


def _in_child(fn):
    """Run fn() in a forked child; return what it printed as JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            out = fn()
        except BaseException as exc:  # report, never return into pytest
            out = {"child_exception": f"{type(exc).__name__}: {exc}"}
            code = 1
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"child ended by signal {os.WTERMSIG(status)}"
    out = json.loads(data or b"{}")
    assert "child_exception" not in out, out["child_exception"]
    return out


def test_loop_used_in_forked_child_raises(kloop_module):
    loop = kloop_module.new_event_loop()
    try:
        assert loop.run_until_complete(_echo_roundtrip(loop, b"parent")) == b"parent"

        def child():
            out = {}
            coro = asyncio.sleep(0)
            try:
                loop.run_until_complete(coro)
                out["run"] = "ok"
            except BaseException as exc:
                out["run"] = [type(exc).__name__, str(exc)]
            finally:
                coro.close()
            try:
                loop.call_soon(print)
                loop.run_forever()
                out["run_forever"] = "ok"
            except BaseException as exc:
                out["run_forever"] = [type(exc).__name__]
            loop.close()
            out["closed"] = loop.is_closed()
            new = kloop_module.new_event_loop()
            try:
                out["new_loop"] = new.run_until_complete(_echo_roundtrip(new, b"child")).decode()
            finally:
                new.close()
            return out

        out = _in_child(child)
        assert out["run"][0] == "RuntimeError", out
        assert "fork" in out["run"][1]
        assert out["run_forever"] == ["RuntimeError"]
        assert out["closed"] is True
        assert out["new_loop"] == "child"
        # The child's close did not take the parent's ring with it.
        assert loop.run_until_complete(_echo_roundtrip(loop, b"again" * 1000)) == b"again" * 1000
    finally:
        loop.close()


def test_fork_while_streams_open(kloop_module):
    """A child forked while the parent has live transports can build its own
    loop; the parent's connection keeps working after the child exits."""
    loop = kloop_module.new_event_loop()

    async def open_pair():
        srv_conn = loop.create_future()

        async def handler(r, w):
            srv_conn.set_result((r, w))

        srv = await asyncio.start_server(handler, "127.0.0.1", 0)
        r, w = await asyncio.open_connection(*srv.sockets[0].getsockname())
        sr, sw = await srv_conn
        return srv, (r, w), (sr, sw)

    try:
        srv, (r, w), (sr, sw) = loop.run_until_complete(open_pair())

        def child():
            new = kloop_module.new_event_loop()
            try:
                return {"echo": new.run_until_complete(_echo_roundtrip(new, b"c")).decode()}
            finally:
                new.close()

        assert _in_child(child) == {"echo": "c"}

        async def talk():
            w.write(b"ping\n")
            assert await sr.readline() == b"ping\n"
            sw.write(b"pong\n")
            assert await r.readline() == b"pong\n"
            for x in (w, sw):
                x.close()
                await x.wait_closed()
            srv.close()
            await srv.wait_closed()

        loop.run_until_complete(asyncio.wait_for(talk(), 10))
    finally:
        loop.close()


def test_stock_loop_fork_reference():
    """For reference: the stock loop does work in a forked child (so the
    RuntimeError above is kloop's documented difference, not a test error)."""
    loop = asyncio.SelectorEventLoop()
    try:
        def child():
            return {"echo": loop.run_until_complete(_echo_roundtrip(loop, b"s")).decode()}

        assert _in_child(child) == {"echo": "s"}
    finally:
        loop.close()
