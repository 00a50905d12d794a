"""Datagram endpoints (issue 4, point 1), on the stock loop and on kloop.

create_datagram_endpoint with local_addr / remote_addr / family /
reuse_port / allow_broadcast / sock=, over IPv4, IPv6 and Unix datagram
sockets; sendto / abort / close / get_write_buffer_size; error_received for
ICMP port unreachable on a connected socket; empty and maximal datagrams;
1,000 datagrams in flight arrive in order on loopback.
"""

import asyncio
import os
import socket
import tempfile

import pytest

from util import pattern


@pytest.fixture(params=("asyncio", "kloop"))
def loop_name(request):
    from conftest import require_loop
    require_loop(request.param)
    return request.param


class DgProto(asyncio.DatagramProtocol):
    def __init__(self, loop, expect=None):
        self.loop = loop
        self.transport = None
        self.got = []
        self.errors = []
        self.lost = loop.create_future()
        self.expect = expect
        self.enough = loop.create_future()
        self.error_seen = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.got.append((data, addr))
        if self.expect is not None and len(self.got) >= self.expect and not self.enough.done():
            self.enough.set_result(None)

    def error_received(self, exc):
        self.errors.append(exc)
        if not self.error_seen.done():
            self.error_seen.set_result(exc)

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


def _has_ipv6():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"),
                                         (socket.AF_INET6, "::1")])
def test_echo_local_and_remote_addr(loop, family, host):
    """A server endpoint (local_addr) and a connected client (remote_addr)
    exchange datagrams; the server sees the client's address."""
    if family == socket.AF_INET6 and not _has_ipv6():
        pytest.skip("no IPv6 loopback on this host (binding ::1 failed)")

    async def main():
        lp = loop.loop
        srv_tr, srv = await lp.create_datagram_endpoint(
            lambda: DgProto(lp, expect=3), local_addr=(host, 0), family=family)
        saddr = srv_tr.get_extra_info("sockname")
        cli_tr, cli = await lp.create_datagram_endpoint(
            lambda: DgProto(lp, expect=1), remote_addr=saddr[:2], family=family)
        try:
            assert srv_tr.get_extra_info("socket").family == family
            assert cli_tr.get_extra_info("peername")[:2] == saddr[:2]
            for b in (b"one", b"two", b"three"):
                cli_tr.sendto(b)
            await asyncio.wait_for(srv.enough, 5)
            assert [d for d, _ in srv.got] == [b"one", b"two", b"three"]
            caddr = cli_tr.get_extra_info("sockname")
            assert srv.got[0][1][:2] == caddr[:2]
            srv_tr.sendto(b"back", srv.got[0][1])
            await asyncio.wait_for(cli.enough, 5)
            assert cli.got[0][0] == b"back"
            assert srv_tr.get_write_buffer_size() == 0
        finally:
            cli_tr.close()
            srv_tr.close()
        assert await cli.lost is None
        assert await srv.lost is None
        assert cli_tr.is_closing()

    loop.run(main())


def test_unix_datagram(loop):
    """AF_UNIX SOCK_DGRAM endpoints by path (local_addr and remote_addr)."""

    async def main():
        lp = loop.loop
        with tempfile.TemporaryDirectory() as d:
            spath = os.path.join(d, "srv")
            cpath = os.path.join(d, "cli")
            srv_tr, srv = await lp.create_datagram_endpoint(
                lambda: DgProto(lp, expect=2), local_addr=spath, family=socket.AF_UNIX)
            cli_tr, cli = await lp.create_datagram_endpoint(
                lambda: DgProto(lp, expect=1), local_addr=cpath, remote_addr=spath,
                family=socket.AF_UNIX)
            try:
                cli_tr.sendto(b"hello")
                # An empty datagram from a plain socket is delivered.
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
                    raw.bind(os.path.join(d, "raw"))
                    raw.sendto(b"", spath)
                await asyncio.wait_for(srv.enough, 5)
                # Two senders: their relative order is not defined (kloop's
                # sendto() is queued to the ring, the stock loop sends at once).
                assert sorted(srv.got) == [(b"", os.path.join(d, "raw")), (b"hello", cpath)]
                srv_tr.sendto(b"world", cpath)
                await asyncio.wait_for(cli.enough, 5)
                assert cli.got[0][0] == b"world"
            finally:
                cli_tr.close()
                srv_tr.close()
            await cli.lost
            await srv.lost

    loop.run(main())


def test_sock_argument_and_reuse_port_and_broadcast(loop):
    async def main():
        lp = loop.loop
        # sock=: a socket made and bound by the caller.
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        tr, pr = await lp.create_datagram_endpoint(lambda: DgProto(lp, expect=1), sock=s)
        try:
            assert tr.get_extra_info("socket").fileno() == s.fileno()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
                peer.sendto(b"via sock=", s.getsockname())
                await asyncio.wait_for(pr.enough, 5)
            assert pr.got[0][0] == b"via sock="
        finally:
            tr.close()
        await pr.lost
        assert s.fileno() == -1  # the transport closed the caller's socket

        # reuse_port: two endpoints bound to the same port.
        t1, p1 = await lp.create_datagram_endpoint(
            lambda: DgProto(lp), local_addr=("127.0.0.1", 0), reuse_port=True)
        port = t1.get_extra_info("sockname")[1]
        t2, p2 = await lp.create_datagram_endpoint(
            lambda: DgProto(lp), local_addr=("127.0.0.1", port), reuse_port=True)
        try:
            for t in (t1, t2):
                sk = t.get_extra_info("socket")
                assert sk.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert t2.get_extra_info("sockname")[1] == port
        finally:
            t1.close()
            t2.close()
        await p1.lost
        await p2.lost

        # allow_broadcast sets SO_BROADCAST; a broadcast send is accepted.
        tb, pb = await lp.create_datagram_endpoint(
            lambda: DgProto(lp), local_addr=("0.0.0.0", 0), allow_broadcast=True)
        try:
            sk = tb.get_extra_info("socket")
            assert sk.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST) == 1
            tb.sendto(b"broadcast", ("255.255.255.255", 9))
            await asyncio.sleep(0.05)
            # Loopback-only hosts may refuse a broadcast route (ENETUNREACH):
            # that arrives through error_received, never as an exception.
            assert all(isinstance(e, OSError) for e in pb.errors)
        finally:
            tb.close()
        await pb.lost

    loop.run(main())


def test_icmp_port_unreachable_error_received(loop):
    """A connected UDP socket sending to a closed port gets
    ConnectionRefusedError through error_received(); the transport stays open
    and keeps working."""

    async def main():
        lp = loop.loop
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tmp:
            tmp.bind(("127.0.0.1", 0))
            dead = tmp.getsockname()
        tr, pr = await lp.create_datagram_endpoint(lambda: DgProto(lp), remote_addr=dead)
        try:
            tr.sendto(b"anyone?")
            exc = await asyncio.wait_for(pr.error_seen, 5)
            assert isinstance(exc, ConnectionRefusedError), repr(exc)
            assert not tr.is_closing()
            assert not pr.lost.done()
            # Still usable: the next send to a live peer goes through.
            tr.sendto(b"again")
            await asyncio.sleep(0.05)
        finally:
            tr.close()
        assert await pr.lost is None

    loop.run(main())


@pytest.mark.parametrize("size", [0, 1, 65507])
def test_datagram_sizes(loop, size):
    """Empty datagrams and the largest IPv4 UDP datagram (65507 bytes).

    transport.sendto(b"") is a no-op on both of asyncio's 3.11 datagram
    transports (``if not data: return``), so the empty datagram is sent by
    a plain socket; the endpoint must deliver it as b"" (the selector loop
    does)."""
    payload = pattern(size, seed=size)

    async def main():
        lp = loop.loop
        srv_tr, srv = await lp.create_datagram_endpoint(
            lambda: DgProto(lp, expect=2), local_addr=("127.0.0.1", 0))
        cli_tr, cli = await lp.create_datagram_endpoint(
            lambda: DgProto(lp), remote_addr=srv_tr.get_extra_info("sockname"))
        try:
            sk = srv_tr.get_extra_info("socket")
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            if size:
                cli_tr.sendto(payload)
            else:
                cli_tr.sendto(b"")  # dropped, as on the stock loop
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                    raw.sendto(b"", srv_tr.get_extra_info("sockname"))
            cli_tr.sendto(b"end")
            await asyncio.wait_for(srv.enough, 5)
            assert [d for d, _ in srv.got] == [payload, b"end"]
            assert cli_tr.get_write_buffer_size() == 0
        finally:
            cli_tr.close()
            srv_tr.close()
        await cli.lost
        await srv.lost

    loop.run(main())


def test_thousand_datagrams_in_order(loop):
    n = 1000

    async def main():
        lp = loop.loop
        srv_tr, srv = await lp.create_datagram_endpoint(
            lambda: DgProto(lp, expect=n), local_addr=("127.0.0.1", 0))
        srv_tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        cli_tr, cli = await lp.create_datagram_endpoint(
            lambda: DgProto(lp), remote_addr=srv_tr.get_extra_info("sockname"))
        try:
            for i in range(n):
                cli_tr.sendto(b"%06d" % i + b"." * 500)
            await asyncio.wait_for(srv.enough, 10)
            got = [int(d[:6]) for d, _ in srv.got]
            assert got == list(range(n))
        finally:
            cli_tr.close()
            srv_tr.close()
        await cli.lost
        await srv.lost

    loop.run(main())


def test_sendto_buffering_abort_and_close(loop):
    """sendto() queues when the socket is full (get_write_buffer_size grows,
    pause_writing above the high mark); abort() drops the queue and calls
    connection_lost(None); sendto after close is dropped without raising."""

    class FlowProto(DgProto):
        def __init__(self, lp):
            super().__init__(lp)
            self.paused = 0

        def pause_writing(self):
            self.paused += 1

        def resume_writing(self):
            pass

    async def main():
        lp = loop.loop
        # The destination never reads and has a tiny receive buffer; a Unix
        # datagram socket then blocks the sender (EAGAIN) instead of
        # dropping, so the transport has to buffer.
        with tempfile.TemporaryDirectory() as d:
            spath = os.path.join(d, "sink")
            sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sink.bind(spath)
            try:
                tr, pr = await lp.create_datagram_endpoint(
                    lambda: FlowProto(lp), remote_addr=spath, family=socket.AF_UNIX)
                tr.set_write_buffer_limits(high=8192)
                for _ in range(200):
                    tr.sendto(b"x" * 1000)
                assert tr.get_write_buffer_size() > 0
                assert pr.paused >= 1
                tr.abort()
                assert await asyncio.wait_for(pr.lost, 5) is None
                assert tr.is_closing()

                # close() with nothing queued, then sendto() is dropped.
                tr2, pr2 = await lp.create_datagram_endpoint(
                    lambda: DgProto(lp), remote_addr=spath, family=socket.AF_UNIX)
                tr2.close()
                tr2.sendto(b"after close")
                assert await asyncio.wait_for(pr2.lost, 5) is None
            finally:
                sink.close()

    loop.run(main())


def test_datagram_flow_control_resume_and_order(loop):
    """A Unix datagram sender blocked by a full receiver queues its
    datagrams (pause_writing above the high mark); when the receiver reads,
    the queue drains, resume_writing is called once and every datagram
    arrives once, in order."""

    class FlowProto(DgProto):
        def __init__(self, lp):
            super().__init__(lp)
            self.flow = []
            self.resumed = lp.create_future()

        def pause_writing(self):
            self.flow.append("pause")

        def resume_writing(self):
            self.flow.append("resume")
            if not self.resumed.done():
                self.resumed.set_result(None)

    # (kernel 6.18's io_uring sends such a datagram empty when it has to
    # wait: kloop sends Unix datagrams with send(2), see kloop/_datagram.py)
    n = 300

    async def main():
        lp = loop.loop
        with tempfile.TemporaryDirectory() as d:
            spath = os.path.join(d, "sink")
            sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sink.bind(spath)
            tr = None
            try:
                tr, pr = await lp.create_datagram_endpoint(
                    lambda: FlowProto(lp), remote_addr=spath, family=socket.AF_UNIX)
                tr.set_write_buffer_limits(high=16384, low=4096)
                for i in range(n):
                    tr.sendto(b"%05d" % i + b"." * 995)
                assert pr.flow == ["pause"]
                assert tr.get_write_buffer_size() > 16384

                def drain():
                    got = []
                    sink.settimeout(10)
                    while len(got) < n:
                        got.append(int(sink.recv(2000)[:5]))
                    return got

                got = await lp.run_in_executor(None, drain)
                assert got == list(range(n))
                await asyncio.wait_for(pr.resumed, 5)
                assert pr.flow == ["pause", "resume"]
                assert tr.get_write_buffer_size() == 0
                tr.close()
                assert await asyncio.wait_for(pr.lost, 5) is None
            finally:
                if tr is not None and not tr.is_closing():
                    tr.abort()
                    await asyncio.sleep(0)
                sink.close()

    loop.run(main())


def test_sock_send_unix_datagram_full_receiver(loop):
    """loop.sock_sendall()/sock_sendto() on a Unix datagram socket whose
    receiver is full wait and then send the datagram intact."""
    # On kernel 6.18 an io_uring send on a full AF_UNIX SOCK_DGRAM receiver
    # that has to wait goes out EMPTY (result 0); kloop sends those sockets'
    # datagrams with send(2) once the ring reports them writable.

    async def main():
        lp = loop.loop
        with tempfile.TemporaryDirectory() as d:
            spath = os.path.join(d, "sink")
            sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sink.bind(spath)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.setblocking(False)
            try:
                s.connect(spath)
                n = 40
                sent = []

                async def send_all():
                    for i in range(n):
                        data = b"%05d" % i + b"." * 995
                        if i % 2:
                            await lp.sock_sendall(s, data)
                        else:
                            sent.append(await lp.sock_sendto(s, data, spath))

                sender = asyncio.ensure_future(send_all())
                await asyncio.sleep(0.1)  # the receiver is full by now

                def drain():
                    sink.settimeout(10)
                    return [sink.recv(2000) for _ in range(n)]

                got = await lp.run_in_executor(None, drain)
                await asyncio.wait_for(sender, 10)
                assert [len(g) for g in got] == [1000] * n
                assert [int(g[:5]) for g in got] == list(range(n))
                assert sent == [1000] * (n // 2)
            finally:
                s.close()
                sink.close()

    loop.run(main())


def test_kloop_udp_echo_needs_at_most_one_ring_operation_per_datagram():
    # kloop's datagram transport is the stock loop's selector transport on
    # the ring's readiness (a poll): datagrams move by recvfrom/sendto, not
    # by a receive and a send operation each, which cost a future and a
    # buffer per datagram and ran slower than the stock loop.
    import threading
    from conftest import harness_for
    import kloop
    h = harness_for("kloop")
    n = 300

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(data, addr)

    def client(addr, out):
        # a blocking client in a thread: only the server uses the ring
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(5)
            c.connect(addr)
            for i in range(n):
                c.send(b"%d" % i)
                out.append(c.recv(100) == b"%d" % i)

    async def main():
        loop = h.loop
        tr, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        try:
            await asyncio.sleep(0.01)
            before = kloop.get_stats(loop)["sqes"]
            ok = []
            th = threading.Thread(target=client, args=(tr.get_extra_info("sockname"), ok))
            th.start()
            while th.is_alive():
                await asyncio.sleep(0.001)
            used = kloop.get_stats(loop)["sqes"] - before
        finally:
            tr.close()
        assert ok == [True] * n
        return used

    try:
        used = h.run(main())
    finally:
        h.close()
    assert used <= n + 50, f"{used} io_uring operations for {n} echoed datagrams"


def _queued_udp_pair(n):
    """A bound UDP socket with `n` datagrams already waiting in it, and the
    sender (both plain sockets; the caller closes the sender)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.setblocking(False)
    snd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):
        snd.sendto(b"d%d" % i, srv.getsockname())
    return srv, snd


def test_kloop_reads_a_run_of_datagrams_per_wakeup():
    # The stock transport reads one datagram per readiness report, so each
    # one costs a trip through the loop (on kloop: a poll completion and a
    # re-arm on the ring). kloop's reads until the socket is empty, up to
    # _datagram.READ_BURST, as libuv does: 10 waiting datagrams all arrive
    # before a callback scheduled by the first of them runs.
    from conftest import harness_for
    from kloop import _datagram
    h = harness_for("kloop")
    n = 10
    assert n <= _datagram.READ_BURST

    class Proto(asyncio.DatagramProtocol):
        def __init__(self):
            self.events = []
            self.done = h.loop.create_future()

        def datagram_received(self, data, addr):
            self.events.append(data)
            if len(self.events) == 1:
                h.loop.call_soon(self.events.append, "callback")
            if len([e for e in self.events if e != "callback"]) == n:
                self.done.set_result(None)

    async def main():
        srv, snd = _queued_udp_pair(n)
        try:
            tr, proto = await h.loop.create_datagram_endpoint(Proto, sock=srv)
            try:
                await asyncio.wait_for(proto.done, 5)
                await asyncio.sleep(0)
            finally:
                tr.close()
        finally:
            snd.close()
        return proto.events

    try:
        events = h.run(main())
    finally:
        h.close()
    assert events == [b"d%d" % i for i in range(n)] + ["callback"]


def test_close_in_datagram_received_stops_reading(loop):
    """A transport closed by datagram_received() gets no further datagram,
    even with more waiting in the socket."""

    class Proto(DgProto):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            self.transport.close()

    async def main():
        lp = loop.loop
        srv, snd = _queued_udp_pair(5)
        try:
            tr, proto = await lp.create_datagram_endpoint(lambda: Proto(lp), sock=srv)
            assert await asyncio.wait_for(proto.lost, 5) is None
            await asyncio.sleep(0.05)
        finally:
            snd.close()
        assert [d for d, _ in proto.got] == [b"d0"]

    loop.run(main())


def test_unix_datagram_larger_than_udp_allows(loop):
    """A 150 KiB Unix datagram arrives whole (the stock transport reads up
    to 256 KiB per datagram), and a small one after it is not mixed in."""
    big = pattern(150 * 1024)

    async def main():
        lp = loop.loop
        with tempfile.TemporaryDirectory() as d:
            spath = os.path.join(d, "srv")
            srv_tr, srv = await lp.create_datagram_endpoint(
                lambda: DgProto(lp, expect=2), local_addr=spath, family=socket.AF_UNIX)
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                    raw.setblocking(False)  # a full buffer fails, not hangs
                    raw.sendto(big, spath)
                    raw.sendto(b"tail", spath)
                await asyncio.wait_for(srv.enough, 5)
            finally:
                srv_tr.close()
            await srv.lost
        assert [len(g) for g, _ in srv.got] == [len(big), 4]
        assert srv.got[0][0] == big and srv.got[1][0] == b"tail"

    loop.run(main())
