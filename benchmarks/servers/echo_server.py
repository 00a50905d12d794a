"""Echo servers for the benchmark driver, one per asyncio API style.

usage: echo_server.py --loop {asyncio,uvloop,kloop} --kind KIND
                      [--host H] [--port P | --unix PATH]
                      [--certfile CERT --keyfile KEY]

KIND is one of
  protocol   asyncio.Protocol: data_received() -> transport.write()
  streams    asyncio.start_server: await reader.read() -> writer.write();
             await writer.drain()
  buffered   asyncio.BufferedProtocol: recv into get_buffer(), write a copy
  sock       loop.sock_accept / sock_recv / sock_sendall on plain sockets
  http       minimal HTTP/1.1 keep-alive server (asyncio.Protocol): every
             request gets a fixed 200 response written in two pieces
             (headers, then body)
  churn      asyncio.Protocol that echoes what its first data_received()
             gets, then closes the transport (one message per connection:
             the connect/accept/close churn of `run.py churn`)
  readline   asyncio.start_server: a request is --lines lines (default 5),
             each read with `await reader.readline()`; the lines are then
             written back as one piece and drained
  udp        asyncio.DatagramProtocol on a UDP socket:
             datagram_received() -> transport.sendto(data, addr)

With --certfile/--keyfile the protocol, streams, buffered and http servers
take ssl= (an ssl.SSLContext with that certificate; protocol versions and
ciphers are left to the client and OpenSSL's defaults). At the first
connection the server prints one line "TLSINFO {json}" on stdout: the type
of the transport the loop handed to the protocol (asyncio's sslproto gives
asyncio.sslproto._SSLProtocolTransport, uvloop its own, kloop either
asyncio's or its engine's) and the negotiated cipher.

Every loop gets exactly the same code; only the event loop differs. Accepted
sockets get TCP_NODELAY explicitly, because the loops disagree on when they
set it themselves (asyncio only for sockets whose proto is IPPROTO_TCP,
uvloop always). The listening socket is made here, with IPPROTO_TCP and a
4096 backlog, and passed as sock= to every loop.

Prints "READY <port|path>" on stdout once listening. SIGINT/SIGTERM stop it.
Runs with Debian's /usr/bin/python3; kloop needs PYTHONPATH pointing at the
checkout's python/ directory.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import sys

READ_SIZE = 65536


def _nodelay(sock):
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass


# True while a TLS server has not yet said which transport it was given.
REPORT_TLS = False


def _report_transport(transport):
    """Print, once per server, which transport the loop gave the protocol."""
    global REPORT_TLS
    REPORT_TLS = False
    t = type(transport)
    cipher = transport.get_extra_info("cipher")
    info = {"transport": f"{t.__module__}.{t.__qualname__}",
            "cipher": cipher[0] if cipher else None,
            "version": cipher[1] if cipher else None}
    print("TLSINFO " + json.dumps(info), flush=True)


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport):
        self.transport = transport
        _nodelay(transport.get_extra_info("socket"))
        if REPORT_TLS:
            _report_transport(transport)

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        self.transport = None


class EchoBufferedProtocol(asyncio.BufferedProtocol):
    __slots__ = ("transport", "buf", "view")

    def connection_made(self, transport):
        self.transport = transport
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)
        _nodelay(transport.get_extra_info("socket"))
        if REPORT_TLS:
            _report_transport(transport)

    def get_buffer(self, sizehint):
        return self.view

    def buffer_updated(self, nbytes):
        # A copy: the buffer is reused by the next receive, and a transport
        # may keep a reference to what it could not send at once.
        self.transport.write(self.buf[:nbytes])

    def connection_lost(self, exc):
        self.transport = None


HTTP_HEAD = (b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/plain\r\n"
             b"Content-Length: 13\r\n\r\n")
HTTP_BODY = b"Hello, World!"


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, just enough for wrk: requests without a body,
    answered in order, each response written as two pieces."""

    __slots__ = ("transport", "pending")

    def connection_made(self, transport):
        self.transport = transport
        self.pending = b""
        _nodelay(transport.get_extra_info("socket"))
        if REPORT_TLS:
            _report_transport(transport)

    def data_received(self, data):
        if self.pending:
            data = self.pending + data
        start = 0
        write = self.transport.write
        while True:
            end = data.find(b"\r\n\r\n", start)
            if end < 0:
                break
            write(HTTP_HEAD)
            write(HTTP_BODY)
            start = end + 4
        self.pending = data[start:]

    def connection_lost(self, exc):
        self.transport = None


async def _streams_client(reader, writer):
    _nodelay(writer.get_extra_info("socket"))
    if REPORT_TLS:
        _report_transport(writer.transport)
    try:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class ChurnProtocol(asyncio.Protocol):
    """One message per connection: echo it, then close (after the write is
    flushed, as transport.close() does)."""

    __slots__ = ("transport",)

    def connection_made(self, transport):
        self.transport = transport
        _nodelay(transport.get_extra_info("socket"))

    def data_received(self, data):
        self.transport.write(data)
        self.transport.close()

    def connection_lost(self, exc):
        self.transport = None


class EchoDatagramProtocol(asyncio.DatagramProtocol):
    __slots__ = ("transport",)

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


def _readline_client(lines):
    async def client(reader, writer):
        _nodelay(writer.get_extra_info("socket"))
        readline = reader.readline
        try:
            while True:
                request = [await readline() for _ in range(lines)]
                if not request[-1].endswith(b"\n"):
                    break  # EOF (possibly inside a request)
                writer.write(b"".join(request))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
    return client


async def _sock_client(loop, sock):
    try:
        while True:
            data = await loop.sock_recv(sock, READ_SIZE)
            if not data:
                break
            await loop.sock_sendall(sock, data)
    except ConnectionError:
        pass
    finally:
        sock.close()


def make_listener(args):
    if args.kind == "udp":
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((args.host, args.port))
        sock.setblocking(False)
        return sock
    if args.unix:
        try:
            os.unlink(args.unix)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.unix)
    else:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def new_loop(name):
    if name == "asyncio":
        return asyncio.new_event_loop()
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    if name == "kloop":
        import kloop

        return kloop.new_event_loop()
    raise SystemExit(f"unknown loop {name!r}")


def make_ssl_context(args):
    global REPORT_TLS
    if not args.certfile:
        return None
    import ssl

    REPORT_TLS = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.certfile, args.keyfile)
    return ctx


async def serve(args, stop):
    loop = asyncio.get_running_loop()
    lsock = make_listener(args)
    where = args.unix or lsock.getsockname()[1]
    tasks = set()
    udp_transport = None
    ssl_ctx = make_ssl_context(args)
    if ssl_ctx is not None and args.kind in ("sock", "udp"):
        raise SystemExit(f"--kind {args.kind} has no TLS variant")
    if args.kind == "protocol":
        server = await loop.create_server(EchoProtocol, sock=lsock, backlog=4096, ssl=ssl_ctx)
    elif args.kind == "buffered":
        server = await loop.create_server(EchoBufferedProtocol, sock=lsock, backlog=4096,
                                          ssl=ssl_ctx)
    elif args.kind == "http":
        server = await loop.create_server(HttpProtocol, sock=lsock, backlog=4096, ssl=ssl_ctx)
    elif args.kind == "streams":
        server = await asyncio.start_server(_streams_client, sock=lsock, limit=READ_SIZE * 4,
                                            backlog=4096, ssl=ssl_ctx)
    elif args.kind == "churn":
        server = await loop.create_server(ChurnProtocol, sock=lsock, backlog=4096, ssl=ssl_ctx)
    elif args.kind == "readline":
        server = await asyncio.start_server(_readline_client(args.lines), sock=lsock,
                                            limit=READ_SIZE * 4, backlog=4096, ssl=ssl_ctx)
    elif args.kind == "udp":
        server = None
        udp_transport, _ = await loop.create_datagram_endpoint(EchoDatagramProtocol,
                                                               sock=lsock)
    elif args.kind == "sock":
        server = None

        async def accept_loop():
            while True:
                conn, _ = await loop.sock_accept(lsock)
                conn.setblocking(False)
                _nodelay(conn)
                t = loop.create_task(_sock_client(loop, conn))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

        tasks.add(loop.create_task(accept_loop()))
    else:
        raise SystemExit(f"unknown kind {args.kind!r}")
    print(f"READY {where}", flush=True)
    await stop.wait()
    if server is not None:
        server.close()
    if udp_transport is not None:
        udp_transport.close()
    for t in list(tasks):
        t.cancel()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop", "kloop"])
    p.add_argument("--kind", default="protocol",
                   choices=["protocol", "streams", "buffered", "sock", "http", "churn",
                            "readline", "udp"])
    p.add_argument("--lines", type=int, default=5, help="readline: lines per request")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--unix")
    p.add_argument("--certfile", help="serve TLS with this certificate (PEM)")
    p.add_argument("--keyfile", help="private key of --certfile (PEM)")
    p.add_argument("--cpu", type=int, default=-1, help="pin to this CPU")
    p.add_argument("--profile", metavar="FILE",
                   help="run under cProfile and write its stats (pstats format) at exit")
    args = p.parse_args(argv)
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    try:
        loop = new_loop(args.loop)
    except Exception as exc:  # reported to the driver, which shows "n/a"
        print(f"UNAVAILABLE {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        loop.run_until_complete(serve(args, stop))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        loop.close()


if __name__ == "__main__":
    main()
