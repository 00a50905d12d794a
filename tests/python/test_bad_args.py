"""Bad arguments raise the same exception types on kloop as on asyncio.

Each case makes one bad call on a fresh loop; the test runs it on the stock
loop and on kloop and compares the outcomes ("ok" or the exception's type).
"""

import asyncio
import socket
import tempfile

import pytest

from conftest import harness_for


class Ctx:
    """Fresh resources for one case; closed afterwards."""

    def __init__(self, loop):
        self.loop = loop
        self._close = []

    def add(self, obj):
        self._close.append(obj)
        return obj

    def pair(self, blocking=False):
        a, b = socket.socketpair()
        self.add(a)
        self.add(b)
        a.setblocking(blocking)
        b.setblocking(blocking)
        return a, b

    def tcp(self, blocking=False):
        s = self.add(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        s.setblocking(blocking)
        return s

    def udp(self):
        s = self.add(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))
        return s

    def listener(self):
        s = self.add(socket.create_server(("127.0.0.1", 0)))
        s.setblocking(False)
        return s

    def close(self):
        for obj in reversed(self._close):
            obj.close()


async def _proto_pair(ctx):
    a, b = ctx.pair()
    tr, pr = await ctx.loop.create_connection(asyncio.Protocol, sock=a)
    ctx._close.insert(0, tr)
    return tr, b


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# -- sock_* ------------------------------------------------------------------
@case
async def sock_recv_negative_size(ctx):
    a, b = ctx.pair()
    b.send(b"x")
    await ctx.loop.sock_recv(a, -1)


@case
async def sock_recv_size_not_int(ctx):
    a, b = ctx.pair()
    b.send(b"x")
    await ctx.loop.sock_recv(a, "10")


@case
async def sock_recv_zero_size(ctx):
    a, b = ctx.pair()
    b.send(b"x")
    assert await ctx.loop.sock_recv(a, 0) == b""


@case
async def sock_recv_blocking_socket_debug(ctx):
    ctx.loop.set_debug(True)
    a, b = ctx.pair(blocking=True)
    b.send(b"x")
    await ctx.loop.sock_recv(a, 1)


@case
async def sock_recv_not_a_socket(ctx):
    await ctx.loop.sock_recv(object(), 10)


@case
async def sock_recv_closed_socket(ctx):
    a, b = ctx.pair()
    a.close()
    await ctx.loop.sock_recv(a, 10)


@case
async def sock_recv_into_readonly_buffer(ctx):
    a, b = ctx.pair()
    b.send(b"x")
    await ctx.loop.sock_recv_into(a, b"immutable")


@case
async def sock_recv_into_not_a_buffer(ctx):
    a, b = ctx.pair()
    b.send(b"x")
    await ctx.loop.sock_recv_into(a, 42)


@case
async def sock_sendall_str(ctx):
    a, b = ctx.pair()
    await ctx.loop.sock_sendall(a, "text")


@case
async def sock_sendall_empty(ctx):
    a, b = ctx.pair()
    assert await ctx.loop.sock_sendall(a, b"") is None


@case
async def sock_sendall_blocking_socket_debug(ctx):
    ctx.loop.set_debug(True)
    a, b = ctx.pair(blocking=True)
    await ctx.loop.sock_sendall(a, b"x")


@case
async def sock_connect_refused(ctx):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    await ctx.loop.sock_connect(ctx.tcp(), ("127.0.0.1", port))


@case
async def sock_connect_bad_port(ctx):
    await ctx.loop.sock_connect(ctx.tcp(), ("127.0.0.1", 70000))


@case
async def sock_connect_bad_address_type(ctx):
    await ctx.loop.sock_connect(ctx.tcp(), "not an address")


@case
async def sock_connect_blocking_socket_debug(ctx):
    ctx.loop.set_debug(True)
    lst = ctx.listener()
    await ctx.loop.sock_connect(ctx.tcp(blocking=True), lst.getsockname())


@case
async def sock_accept_not_listening(ctx):
    await ctx.loop.sock_accept(ctx.tcp())


@case
async def sock_accept_udp(ctx):
    await ctx.loop.sock_accept(ctx.udp())


@case
async def sock_sendto_negative_port(ctx):
    await ctx.loop.sock_sendto(ctx.udp(), b"x", ("127.0.0.1", -1))


@case
async def sock_sendto_str(ctx):
    u = ctx.udp()
    await ctx.loop.sock_sendto(u, "text", u.getsockname())


@case
async def sock_recvfrom_negative_size(ctx):
    u = ctx.udp()
    u.sendto(b"x", u.getsockname())
    await ctx.loop.sock_recvfrom(u, -5)


@case
async def sock_sendfile_text_file(ctx):
    lst = ctx.listener()
    s = ctx.tcp()
    await ctx.loop.sock_connect(s, lst.getsockname())
    with tempfile.TemporaryFile("w+") as f:
        f.write("text")
        f.seek(0)
        await ctx.loop.sock_sendfile(s, f)


@case
async def sock_sendfile_datagram_socket(ctx):
    with tempfile.TemporaryFile() as f:
        f.write(b"data")
        f.seek(0)
        await ctx.loop.sock_sendfile(ctx.udp(), f)


@case
async def sock_sendfile_negative_offset(ctx):
    lst = ctx.listener()
    s = ctx.tcp()
    await ctx.loop.sock_connect(s, lst.getsockname())
    with tempfile.TemporaryFile() as f:
        f.write(b"data")
        await ctx.loop.sock_sendfile(s, f, -1)


@case
async def sock_sendfile_count_zero(ctx):
    lst = ctx.listener()
    s = ctx.tcp()
    await ctx.loop.sock_connect(s, lst.getsockname())
    with tempfile.TemporaryFile() as f:
        f.write(b"data")
        await ctx.loop.sock_sendfile(s, f, 0, 0)


# -- create_* ----------------------------------------------------------------
@case
async def create_connection_host_and_sock(ctx):
    await ctx.loop.create_connection(asyncio.Protocol, "127.0.0.1", 1, sock=ctx.tcp())


@case
async def create_connection_no_host_no_sock(ctx):
    await ctx.loop.create_connection(asyncio.Protocol)


@case
async def create_connection_refused(ctx):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    await ctx.loop.create_connection(asyncio.Protocol, "127.0.0.1", port)


@case
async def create_connection_udp_sock(ctx):
    await ctx.loop.create_connection(asyncio.Protocol, sock=ctx.udp())


@case
async def create_connection_ssl_handshake_timeout_without_ssl(ctx):
    await ctx.loop.create_connection(asyncio.Protocol, "127.0.0.1", 1, ssl_handshake_timeout=1)


@case
async def create_connection_server_hostname_without_ssl(ctx):
    await ctx.loop.create_connection(asyncio.Protocol, "127.0.0.1", 1, server_hostname="x")


@case
async def create_connection_bad_host(ctx):
    await ctx.loop.create_connection(asyncio.Protocol, "no-such-host.invalid", 80)


@case
async def create_server_host_and_sock(ctx):
    await ctx.loop.create_server(asyncio.Protocol, "127.0.0.1", 0, sock=ctx.listener())


@case
async def create_server_udp_sock(ctx):
    await ctx.loop.create_server(asyncio.Protocol, sock=ctx.udp())


@case
async def create_server_port_in_use(ctx):
    lst = ctx.listener()
    await ctx.loop.create_server(asyncio.Protocol, "127.0.0.1", lst.getsockname()[1])


@case
async def create_unix_connection_no_path(ctx):
    await ctx.loop.create_unix_connection(asyncio.Protocol)


@case
async def create_unix_connection_missing_path(ctx):
    await ctx.loop.create_unix_connection(asyncio.Protocol, "/nonexistent/kloop.sock")


@case
async def create_unix_server_tcp_sock(ctx):
    await ctx.loop.create_unix_server(asyncio.Protocol, sock=ctx.listener())


@case
async def create_datagram_endpoint_tcp_sock(ctx):
    await ctx.loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=ctx.tcp())


@case
async def create_datagram_endpoint_reuse_address(ctx):
    await ctx.loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0), reuse_address=True)


@case
async def connect_accepted_socket_udp(ctx):
    await ctx.loop.connect_accepted_socket(asyncio.Protocol, ctx.udp())


# -- transports ----------------------------------------------------------------
@case
async def transport_write_str(ctx):
    tr, _ = await _proto_pair(ctx)
    tr.write("text")


@case
async def transport_write_int(ctx):
    tr, _ = await _proto_pair(ctx)
    tr.write(42)


@case
async def transport_writelines_str(ctx):
    tr, _ = await _proto_pair(ctx)
    tr.writelines(["text"])


@case
async def transport_write_after_write_eof(ctx):
    tr, _ = await _proto_pair(ctx)
    tr.write_eof()
    tr.write(b"x")


@case
async def transport_write_after_close(ctx):
    tr, _ = await _proto_pair(ctx)
    tr.close()
    tr.write(b"x")


@case
async def transport_limits_low_above_high(ctx):
    tr, _ = await _proto_pair(ctx)
    tr.set_write_buffer_limits(high=10, low=20)


@case
async def transport_limits_negative(ctx):
    tr, _ = await _proto_pair(ctx)
    tr.set_write_buffer_limits(high=-1)


@case
async def transport_set_protocol_none(ctx):
    tr, _ = await _proto_pair(ctx)
    tr.set_protocol(None)
    tr.close()


@case
async def datagram_sendto_str(ctx):
    tr, _ = await ctx.loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    ctx._close.insert(0, tr)
    tr.sendto("text", tr.get_extra_info("sockname"))


# -- callbacks, executors, readers -------------------------------------------
@case
async def call_soon_not_callable_debug(ctx):
    ctx.loop.set_debug(True)
    ctx.loop.call_soon(42)


@case
async def call_soon_coroutine_function_debug(ctx):
    ctx.loop.set_debug(True)

    async def f():
        pass

    ctx.loop.call_soon(f)


@case
async def call_later_bad_delay(ctx):
    ctx.loop.call_later("1", print)


@case
async def call_at_none(ctx):
    ctx.loop.call_at(None, print)


@case
async def call_soon_threadsafe_not_callable_debug(ctx):
    ctx.loop.set_debug(True)
    ctx.loop.call_soon_threadsafe(42)


@case
async def run_in_executor_coroutine_function_debug(ctx):
    ctx.loop.set_debug(True)

    async def f():
        pass

    await ctx.loop.run_in_executor(None, f)


@case
async def add_reader_negative_fd(ctx):
    ctx.loop.add_reader(-1, print)


@case
async def add_reader_bad_object(ctx):
    ctx.loop.add_reader("fd", print)


@case
async def add_writer_not_callable(ctx):
    a, b = ctx.pair()
    try:
        ctx.loop.add_writer(a, 42)
    finally:
        ctx.loop.remove_writer(a)


@case
async def remove_reader_unknown_fd(ctx):
    a, b = ctx.pair()
    assert ctx.loop.remove_reader(a) is False


@case
async def add_signal_handler_sigkill(ctx):
    ctx.loop.add_signal_handler(9, print)


@case
async def add_signal_handler_bad_signal(ctx):
    ctx.loop.add_signal_handler(12345, print)


@case
async def remove_signal_handler_bad_signal(ctx):
    ctx.loop.remove_signal_handler(12345)


@case
async def getaddrinfo_bad_host(ctx):
    await ctx.loop.getaddrinfo("no-such-host.invalid", 80)


@case
async def getnameinfo_bad_address(ctx):
    await ctx.loop.getnameinfo(("not-an-address", 80))


@case
async def subprocess_exec_shell_true(ctx):
    await ctx.loop.subprocess_exec(asyncio.SubprocessProtocol, "true", shell=True)


@case
async def subprocess_shell_bytes_list(ctx):
    await ctx.loop.subprocess_shell(asyncio.SubprocessProtocol, ["true"])


@case
async def subprocess_exec_missing_program(ctx):
    await ctx.loop.subprocess_exec(asyncio.SubprocessProtocol, "/nonexistent/kloop-program")


# -- the loop itself -----------------------------------------------------------
@case
async def run_until_complete_when_running(ctx):
    ctx.loop.run_until_complete(ctx.loop.create_future())


@case
async def run_forever_when_running(ctx):
    ctx.loop.run_forever()


@case
async def set_debug_value(ctx):
    ctx.loop.set_debug(1)
    assert ctx.loop.get_debug()


@case
async def create_task_not_coroutine(ctx):
    ctx.loop.create_task(42)


def outcome(loop_name, name):
    """Run CASES[name] on a fresh loop; return "ok" or the exception type name."""
    h = harness_for(loop_name)
    h.expect_errors()
    ctx = Ctx(h.loop)
    try:
        coro = CASES[name](ctx)
        try:
            h.run(coro, timeout=20)
        except asyncio.TimeoutError:
            return "timeout"
        except BaseException as exc:
            return type(exc).__name__
        return "ok"
    finally:
        ctx.close()
        h.close()


def _closed_loop_outcome(loop_name, method):
    h = harness_for(loop_name)
    h.close()
    try:
        method(h.loop)
    except BaseException as exc:
        return type(exc).__name__
    return "ok"


def _create_task_closing(loop):
    coro = asyncio.sleep(0)
    try:
        loop.create_task(coro).cancel()
    finally:
        coro.close()


CLOSED_LOOP_CALLS = {
    "call_soon": lambda lp: lp.call_soon(print),
    "call_later": lambda lp: lp.call_later(1, print),
    "call_soon_threadsafe": lambda lp: lp.call_soon_threadsafe(print),
    "run_forever": lambda lp: lp.run_forever(),
    "add_reader": lambda lp: lp.add_reader(0, print),
    "create_task": lambda lp: _create_task_closing(lp),
    "close_again": lambda lp: lp.close(),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_call_same_outcome_as_asyncio(name):
    expected = outcome("asyncio", name)
    got = outcome("kloop", name)
    assert got == expected, f"{name}: asyncio gives {expected}, kloop gives {got}"


@pytest.mark.parametrize("name", sorted(CLOSED_LOOP_CALLS))
def test_call_on_closed_loop_same_outcome_as_asyncio(name):
    expected = _closed_loop_outcome("asyncio", CLOSED_LOOP_CALLS[name])
    got = _closed_loop_outcome("kloop", CLOSED_LOOP_CALLS[name])
    assert got == expected, f"{name}: asyncio gives {expected}, kloop gives {got}"
