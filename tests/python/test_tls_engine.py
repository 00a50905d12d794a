"""TLS on kloop: the engine path (kloop_stream_start_tls) and the fallback
to asyncio's sslproto, each case run on the stock loop too (the reference).

Certificates are made at test time with python3-cryptography: a CA, a
server certificate for "localhost"/127.0.0.1, an expired one, one from a CA
the client does not trust, and a client certificate. Peers are the loop
under test itself or blocking stdlib ``ssl`` sockets in a thread. On kloop
every case asserts which path the connection took. uvloop is left out: it
has its own TLS implementation, and these cases pin sslproto's behaviour.
"""

import asyncio
import datetime
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

import util
from conftest import PYTHON_DIR, require_loop
from util import RecordingProtocol

cryptography = pytest.importorskip(
    "cryptography", reason="python3-cryptography makes the test certificates")


@pytest.fixture(params=("asyncio", "kloop"))
def loop_name(request):
    require_loop(request.param)
    return request.param


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(str(tmp_path_factory.mktemp("certs")))


class Certs:
    """PEM files in `directory`; attributes are paths."""

    def __init__(self, directory):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        import ipaddress

        now = datetime.datetime.utcnow()
        day = datetime.timedelta(days=1)

        def key():
            return ec.generate_private_key(ec.SECP256R1())

        def name(cn):
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def cert(subject_key, cn, issuer_key, issuer_cn, ca=False, sans=(), start=None,
                 end=None, client=False):
            b = (x509.CertificateBuilder()
                 .subject_name(name(cn)).issuer_name(name(issuer_cn))
                 .public_key(subject_key.public_key())
                 .serial_number(x509.random_serial_number())
                 .not_valid_before(start or now - day)
                 .not_valid_after(end or now + 30 * day)
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            if sans:
                b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
            if client:
                b = b.add_extension(x509.ExtendedKeyUsage(
                    [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            return b.sign(issuer_key, hashes.SHA256())

        def write(fname, *objs):
            path = os.path.join(directory, fname)
            with open(path, "wb") as f:
                for o in objs:
                    if hasattr(o, "private_bytes"):
                        f.write(o.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
                    else:
                        f.write(o.public_bytes(serialization.Encoding.PEM))
            return path

        sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        ca_key, other_ca_key = key(), key()
        self.ca = write("ca.pem", cert(ca_key, "kloop test CA", ca_key, "kloop test CA",
                                       ca=True))
        skey = key()
        self.server = write("server.pem", skey,
                            cert(skey, "localhost", ca_key, "kloop test CA", sans=sans))
        ekey = key()
        self.expired = write("expired.pem", ekey,
                             cert(ekey, "localhost", ca_key, "kloop test CA", sans=sans,
                                  start=now - 60 * day, end=now - 30 * day))
        ukey = key()
        other_ca = cert(other_ca_key, "other CA", other_ca_key, "other CA", ca=True)
        self.untrusted = write("untrusted.pem", ukey,
                               cert(ukey, "localhost", other_ca_key, "other CA", sans=sans),
                               other_ca)
        ckey = key()
        self.client = write("client.pem", ckey,
                            cert(ckey, "kloop client", ca_key, "kloop test CA", client=True))

    def server_context(self, certfile=None, **kw):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certfile or self.server)
        for k, v in kw.items():
            setattr(ctx, k, v)
        return ctx

    def client_context(self, certfile=None, **kw):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca)
        if certfile:
            ctx.load_cert_chain(certfile)
        for k, v in kw.items():
            setattr(ctx, k, v)
        return ctx


class Peer:
    """A blocking peer in a thread: `serve(sock)` runs on the accepted
    connection (server peer). `result`/`error` after join()."""

    def __init__(self, serve, family=socket.AF_INET):
        self.lsock = util.listener(family)
        self.addr = self.lsock.getsockname()
        self.port = self.addr[1] if family == socket.AF_INET else None
        self.result = None
        self.error = None
        self._serve = serve
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.lsock.settimeout(30)
            conn, _ = self.lsock.accept()
            conn.settimeout(30)
            with conn:
                self.result = self._serve(conn)
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            self.lsock.close()

    def join(self, timeout=60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "peer thread still running"
        return self.result


def engine_path(harness, transport):
    """Assert which TLS implementation serves `transport` on kloop."""
    if harness.name != "kloop":
        return
    from kloop import transports
    assert isinstance(transport, transports.TLSTransport), \
        f"kloop took sslproto: {transport!r}"


def sslproto_path(harness, transport):
    if harness.name != "kloop":
        return
    from asyncio import sslproto
    assert isinstance(transport, sslproto._SSLProtocolTransport), \
        f"kloop did not take sslproto: {transport!r}"


def bio_handshake(sock, ctx, server_side=True):
    """A TLS handshake on a blocking socket through memory BIOs, so that the
    test can write raw records afterwards. Returns (sslobj, outgoing BIO)."""
    obj, _, out = _bio_handshake(sock, ctx, server_side)
    return obj, out


def _bio_handshake(sock, ctx, server_side):
    """bio_handshake(), also returning the incoming BIO:
    (sslobj, incoming BIO, outgoing BIO)."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=server_side,
                       server_hostname=None if server_side else "localhost")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if out.pending:
                sock.sendall(out.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("EOF during the handshake")
            inc.write(data)
    if out.pending:
        sock.sendall(out.read())
    return obj, inc, out


def drain_until_eof(sock):
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


async def echo_server(loop, ctx, unix_path=None, **kw):
    """An echo server on the loop (TCP on 127.0.0.1, or Unix at unix_path);
    returns (server, port or None, list of transports)."""
    made = []

    class Echo(asyncio.Protocol):
        def connection_made(self, tr):
            self.tr = tr
            made.append(tr)

        def data_received(self, data):
            self.tr.write(data)

    if unix_path is not None:
        srv = await loop.create_unix_server(Echo, unix_path, ssl=ctx, **kw)
        return srv, None, made
    srv = await loop.create_server(Echo, "127.0.0.1", 0, ssl=ctx, **kw)
    return srv, srv.sockets[0].getsockname()[1], made


async def wait_for_data(pr, n):
    while len(pr.data) < n:
        if pr.lost.done():
            raise AssertionError(f"connection lost after {len(pr.data)} bytes: {pr.events}")
        await asyncio.sleep(0.005)


# -- the engine path: loop to loop, loop to stdlib --------------------------

def test_client_server_echo(loop, certs):
    async def main():
        lp = loop.loop
        cctx = certs.client_context()
        srv, port, made = await echo_server(lp, certs.server_context())
        tr, pr = await lp.create_connection(lambda: RecordingProtocol(lp), "127.0.0.1", port,
                                            ssl=cctx, server_hostname="localhost")
        engine_path(loop, tr)
        assert pr.events == ["made"]
        assert isinstance(tr.get_extra_info("ssl_object"), ssl.SSLObject)
        assert tr.get_extra_info("peercert")["subject"] == ((("commonName", "localhost"),),)
        assert tr.get_extra_info("cipher")[1] == "TLSv1.3"
        assert tr.get_extra_info("compression") is None
        assert tr.get_extra_info("sslcontext") is cctx
        assert tr.get_extra_info("peername") == ("127.0.0.1", port)
        assert tr.get_extra_info("socket") is not None
        assert tr.get_write_buffer_limits() == (128 * 1024, 512 * 1024)
        assert not tr.can_write_eof()
        with pytest.raises(NotImplementedError):
            tr.write_eof()
        tr.write(b"hello ")
        tr.writelines([b"over ", bytearray(b"tls")])
        await wait_for_data(pr, 14)
        assert bytes(pr.data) == b"hello over tls"
        engine_path(loop, made[0])
        assert made[0].get_extra_info("peercert") is None
        tr.close()
        assert await pr.lost is None
        # sslproto calls eof_received() once the peer's close_notify answers
        # ours.
        assert pr.events == ["made", "data", "eof", ("lost", None)]
        tr.write(b"dropped")   # after close(): dropped, as sslproto does
        srv.close()
        await srv.wait_closed()
    loop.run(main())


def test_buffered_protocol_from_stdlib_server(loop, certs):
    payload = util.pattern(3 << 20, seed=7)

    def serve(conn):
        with certs.server_context().wrap_socket(conn, server_side=True) as s:
            s.sendall(payload)
            s.unwrap()

    peer = Peer(serve)

    class Buffered(asyncio.BufferedProtocol):
        def __init__(self):
            self.buf = bytearray(1000)
            self.got = bytearray()
            self.events = []
            self.lost = loop.loop.create_future()

        def connection_made(self, tr):
            self.events.append("made")

        def get_buffer(self, n):
            # (sslproto loses data with a bytearray here: it reads into
            # buf[offset:], a copy)
            return memoryview(self.buf)

        def buffer_updated(self, n):
            self.got += self.buf[:n]

        def eof_received(self):
            self.events.append("eof")

        def connection_lost(self, exc):
            self.events.append(("lost", exc))
            self.lost.set_result(None)

    async def main():
        tr, pr = await loop.loop.create_connection(
            Buffered, "127.0.0.1", peer.port, ssl=certs.client_context(),
            server_hostname="localhost")
        engine_path(loop, tr)
        await pr.lost
        util.check_bytes(bytes(pr.got), payload)
        assert pr.events == ["made", "eof", ("lost", None)]
    loop.run(main())
    peer.join()
    assert peer.error is None, peer.error


def test_server_with_stdlib_client_alpn_and_resumption(loop, certs):
    sctx = certs.server_context()
    sctx.set_alpn_protocols(["h2", "http/1.1"])
    infos = []

    async def handle(reader, writer):
        obj = writer.get_extra_info("ssl_object")
        infos.append((type(writer.transport), obj.selected_alpn_protocol(),
                      obj.session_reused))
        writer.write((await reader.readline()).upper())
        await writer.drain()
        writer.close()

    def client(port, result):
        try:
            ctx = certs.client_context()
            ctx.set_alpn_protocols(["http/1.1"])
            session = None
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                    with ctx.wrap_socket(raw, server_hostname="localhost",
                                         session=session) as s:
                        s.sendall(b"ping\n")
                        got = b""
                        while not got.endswith(b"\n"):
                            chunk = s.recv(100)
                            if not chunk:
                                break
                            got += chunk
                        result.append((got, s.selected_alpn_protocol(), s.session_reused))
                        session = s.session
        except BaseException as exc:
            result.append(exc)

    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=sctx)
        port = srv.sockets[0].getsockname()[1]
        result = []
        t = threading.Thread(target=client, args=(port, result))
        t.start()
        while t.is_alive():
            await asyncio.sleep(0.01)
        srv.close()
        await srv.wait_closed()
        return result
    result = loop.run(main())
    assert result == [(b"PING\n", "http/1.1", False), (b"PING\n", "http/1.1", True)]
    assert [i[1:] for i in infos] == [("http/1.1", False), ("http/1.1", True)]
    if loop.name == "kloop":
        from kloop import transports
        assert all(i[0] is transports.TLSTransport for i in infos)


# -- handshake failures -------------------------------------------------------

@pytest.mark.parametrize("case", ["hostname", "expired", "untrusted"])
def test_certificate_verify_failures(loop, certs, case):
    certfile = {"hostname": certs.server, "expired": certs.expired,
                "untrusted": certs.untrusted}[case]
    hostname = "example.com" if case == "hostname" else "localhost"
    want = {"hostname": (62, "Hostname mismatch, certificate is not valid for 'example.com'."),
            "expired": (10, "certificate has expired"),
            "untrusted": (19, "self-signed certificate in certificate chain")}[case]

    async def main():
        lp = loop.loop
        srv, port, made = await echo_server(lp, certs.server_context(certfile))
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await lp.create_connection(asyncio.Protocol, "127.0.0.1", port,
                                       ssl=certs.client_context(), server_hostname=hostname)
        await asyncio.sleep(0.05)
        assert made == []
        srv.close()
        await srv.wait_closed()
        return info.value
    exc = loop.run(main())
    assert (exc.verify_code, exc.verify_message) == want
    assert (exc.library, exc.reason, exc.errno) == ("SSL", "CERTIFICATE_VERIFY_FAILED", 1)
    assert str(exc).startswith(f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                               f"{want[1]} (_ssl.c:")


@pytest.mark.parametrize("with_cert", [True, False])
def test_client_certificate_required(loop, certs, with_cert):
    sctx = certs.server_context(verify_mode=ssl.CERT_REQUIRED)
    sctx.load_verify_locations(certs.ca)
    seen = []

    async def handle(reader, writer):
        seen.append((type(writer.transport), writer.get_extra_info("peercert")["subject"]))
        writer.write(b"hi")
        await writer.drain()
        writer.close()

    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=sctx)
        try:
            await client(srv.sockets[0].getsockname()[1])
        finally:
            srv.close()
            await srv.wait_closed()

    async def client(port):
        cctx = certs.client_context(certs.client if with_cert else None)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx,
                                                       server_hostname="localhost")
        engine_path(loop, writer.transport)
        try:
            if with_cert:
                assert await reader.read() == b"hi"
            else:
                # TLS 1.3: the client's handshake is over before the server
                # checks. sslproto's server aborts without sending its
                # alert (the client sees EOF); the engine sends the alert.
                try:
                    assert await reader.read() == b""
                except ssl.SSLError as exc:
                    assert exc.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED", exc
        finally:
            writer.close()
            await asyncio.sleep(0.05)
    loop.run(main())
    if with_cert:
        assert [s[1] for s in seen] == [((("commonName", "kloop client"),),)]
        if loop.name == "kloop":
            from kloop import transports
            assert seen[0][0] is transports.TLSTransport
    else:
        assert seen == []


def test_peer_sends_garbage(loop, certs):
    def serve(conn):
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        drain_until_eof(conn)

    peer = Peer(serve)

    async def main():
        with pytest.raises(ssl.SSLError) as info:
            await loop.loop.create_connection(asyncio.Protocol, "127.0.0.1", peer.port,
                                              ssl=certs.client_context(),
                                              server_hostname="localhost")
        return info.value
    exc = loop.run(main())
    peer.join()
    assert type(exc) is ssl.SSLError
    assert (exc.library, exc.reason) == ("SSL", "WRONG_VERSION_NUMBER")


def test_garbage_to_server(loop, certs):
    async def main():
        srv, port, made = await echo_server(loop.loop, certs.server_context())
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.0\r\n\r\n")
        data = await r.read()   # the server answers with an alert, then closes
        w.close()
        await w.wait_closed()
        srv.close()
        await srv.wait_closed()
        return data, made
    data, made = loop.run(main())
    assert made == []
    assert data[:1] in (b"", b"\x15")   # nothing, or an alert record


def test_eof_during_handshake(loop, certs):
    def serve(conn):
        conn.recv(4096)   # the ClientHello; then close without a word

    peer = Peer(serve)

    async def main():
        with pytest.raises(ConnectionResetError):
            await loop.loop.create_connection(asyncio.Protocol, "127.0.0.1", peer.port,
                                              ssl=certs.client_context(),
                                              server_hostname="localhost")
    loop.run(main())
    peer.join()


# -- how a connection ends ----------------------------------------------------

@pytest.mark.parametrize("how", ["close_notify", "no_close_notify", "truncated"])
def test_peer_ends_connection(loop, certs, how):
    def serve(conn):
        obj, out = bio_handshake(conn, certs.server_context())
        obj.write(b"bye")
        conn.sendall(out.read())
        if how == "close_notify":
            try:
                obj.unwrap()
            except ssl.SSLWantReadError:
                pass
            conn.sendall(out.read())
        elif how == "truncated":
            obj.write(b"x" * 1000)
            record = out.read()
            conn.sendall(record[:len(record) // 2])
        conn.shutdown(socket.SHUT_WR)
        drain_until_eof(conn)

    peer = Peer(serve)

    async def main():
        tr, pr = await loop.loop.create_connection(
            lambda: RecordingProtocol(loop.loop), "127.0.0.1", peer.port,
            ssl=certs.client_context(), server_hostname="localhost")
        engine_path(loop, tr)
        exc = await pr.lost
        return pr, exc
    pr, exc = loop.run(main())
    peer.join()
    assert peer.error is None, peer.error
    assert exc is None
    assert bytes(pr.data) == b"bye"
    # sslproto calls eof_received() with and without close_notify.
    assert pr.events == ["made", "data", "eof", ("lost", None)]


@pytest.mark.skipif(shutil.which("openssl") is None,
                    reason="the openssl command line tool (Debian's openssl, installed by "
                           "scripts/setup.sh) is the client that asks to renegotiate")
def test_client_renegotiation_is_refused(loop, certs):
    """A TLS 1.2 client asking to renegotiate (openssl s_client's "R" command;
    Python's ssl module cannot ask) is refused as OpenSSL 3.0 refuses it by
    default: what came before arrives intact, the client's renegotiation
    fails, and the server's connection is lost with the client's alert."""
    async def main():
        lp = loop.loop
        made = []

        class Echo(RecordingProtocol):
            def connection_made(self, tr):
                super().connection_made(tr)
                made.append(self)

            def data_received(self, data):
                super().data_received(data)
                self.transport.write(data)

        srv = await lp.create_server(lambda: Echo(lp), "127.0.0.1", 0,
                                     ssl=certs.server_context())
        port = srv.sockets[0].getsockname()[1]
        client = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2",
            "-servername", "localhost", "-CAfile", certs.ca,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            client.stdin.write(b"before\n")
            seen = b""
            while b"before" not in seen.rpartition(b"---")[2]:   # the echo, after the banner
                chunk = await asyncio.wait_for(client.stdout.read(4096), 10)
                assert chunk, seen
                seen += chunk
            client.stdin.write(b"R\n")
            rest = await asyncio.wait_for(client.stdout.read(), 10)
            await asyncio.wait_for(client.wait(), 10)
        finally:
            if client.returncode is None:
                client.kill()
                await client.wait()
        pr, = made
        exc = await asyncio.wait_for(pr.lost, 10)
        srv.close()
        await srv.wait_closed()
        return pr, exc, rest
    pr, exc, rest = loop.run(main())
    engine_path(loop, pr.transport)
    assert b"RENEGOTIATING" in rest and b"no renegotiation" in rest, rest
    assert bytes(pr.data) == b"before\n"
    assert isinstance(exc, ssl.SSLError), exc
    assert exc.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE", exc
    assert pr.events == ["made", "data", ("lost", "SSLError")], pr.events


def test_handshake_timeout(loop, certs):
    stop = threading.Event()

    def serve(conn):
        stop.wait(30)

    peer = Peer(serve)

    async def main():
        with pytest.raises(ConnectionAbortedError) as info:
            await loop.loop.create_connection(asyncio.Protocol, "127.0.0.1", peer.port,
                                              ssl=certs.client_context(),
                                              server_hostname="localhost",
                                              ssl_handshake_timeout=0.3)
        return info.value
    try:
        exc = loop.run(main())
    finally:
        stop.set()
    peer.join()
    assert str(exc) == ("SSL handshake is taking longer than 0.3 seconds: "
                        "aborting the connection")


def test_shutdown_timeout(loop, certs):
    stop = threading.Event()

    def serve(conn):
        with certs.server_context().wrap_socket(conn, server_side=True) as s:
            s.sendall(b"x")
            assert s.recv(10) == b""   # the client's close_notify; no answer
            stop.wait(30)

    peer = Peer(serve)

    async def main():
        tr, pr = await loop.loop.create_connection(
            lambda: RecordingProtocol(loop.loop), "127.0.0.1", peer.port,
            ssl=certs.client_context(), server_hostname="localhost",
            ssl_shutdown_timeout=0.3)
        engine_path(loop, tr)
        await wait_for_data(pr, 1)
        t0 = loop.loop.time()
        tr.close()
        exc = await pr.lost
        return exc, loop.loop.time() - t0
    try:
        exc, elapsed = loop.run(main())
    finally:
        stop.set()
    peer.join()
    assert peer.error is None, peer.error
    assert type(exc) is TimeoutError and str(exc) == "SSL shutdown timed out"
    assert 0.25 < elapsed < 5


# -- volume -------------------------------------------------------------------

def test_256_mib_both_ways(loop, certs):
    total = 256 << 20
    block = util.pattern(1 << 20, seed=3)
    want = hashlib.sha256()
    for i in range(total // len(block)):
        want.update(block)
    want = want.hexdigest()

    async def handle(reader, writer):
        h = hashlib.sha256()
        n = 0
        while n < total:
            data = await reader.read(1 << 20)
            if not data:
                break
            h.update(data)
            n += len(data)
        writer.write(f"{n} {h.hexdigest()}\n".encode())
        for _ in range(total // len(block) // 4):   # 64 MiB back
            writer.write(block)
            await writer.drain()
        writer.close()

    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=certs.server_context())
        port = srv.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=certs.client_context(), server_hostname="localhost")
        engine_path(loop, writer.transport)
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
        line = await reader.readline()
        h = hashlib.sha256()
        n = 0
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            h.update(data)
            n += len(data)
        writer.close()
        await writer.wait_closed()
        srv.close()
        await srv.wait_closed()
        return line, n, h.hexdigest()
    line, n, back = loop.run(main(), timeout=240)
    assert line == f"{total} {want}\n".encode()
    expect = hashlib.sha256(block * (total // len(block) // 4)).hexdigest()
    assert (n, back) == (total // 4, expect)


# -- start_tls ------------------------------------------------------------------

def test_start_tls_server_side_in_place(loop, certs):
    """SMTP-style: a plain exchange, then the server upgrades."""
    def client(conn_port, result):
        try:
            with socket.create_connection(("127.0.0.1", conn_port), timeout=30) as raw:
                raw.sendall(b"STARTTLS\r\n")
                assert raw.recv(100) == b"220 go ahead\r\n"
                # A hello sent at once can come back from the same poll as
                # the "STARTTLS" before start_tls() runs: kloop then leaves
                # the upgrade to sslproto (see _not_movable), which this
                # case is not about.
                time.sleep(0.1)
                with certs.client_context().wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(b"hello\r\n")
                    result.append(s.recv(100))
                    s.unwrap()
        except BaseException as exc:
            result.append(exc)

    async def main():
        lp = loop.loop
        done = lp.create_future()

        class Smtp(asyncio.Protocol):
            def connection_made(self, tr):
                self.tr = tr
                self.events = []

            def data_received(self, data):
                self.events.append(data)
                if data == b"STARTTLS\r\n":
                    self.tr.write(b"220 go ahead\r\n")
                    lp.create_task(self.upgrade())
                else:
                    self.tls.write(data.upper())

            async def upgrade(self):
                old = self.tr
                self.tls = await lp.start_tls(old, self, certs.server_context(),
                                              server_side=True)
                engine_path(loop, self.tls)
                if loop.name == "kloop":
                    with pytest.raises(RuntimeError):
                        old.write(b"plain")
                assert self.tls.get_extra_info("cipher")[1] == "TLSv1.3"

            def eof_received(self):
                self.events.append("eof")

            def connection_lost(self, exc):
                done.set_result(exc)

        srv = await lp.create_server(Smtp, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        result = []
        t = threading.Thread(target=client, args=(port, result))
        t.start()
        exc = await done
        while t.is_alive():
            await asyncio.sleep(0.01)
        srv.close()
        await srv.wait_closed()
        return result, exc
    result, exc = loop.run(main())
    assert result == [b"HELLO\r\n"]
    assert exc is None


def test_start_tls_client_side_in_place(loop, certs):
    def serve(conn):
        assert conn.recv(100) == b"STARTTLS\r\n"
        conn.sendall(b"220 go ahead\r\n")
        with certs.server_context().wrap_socket(conn, server_side=True) as s:
            s.sendall(s.recv(100).upper())
            s.unwrap()

    peer = Peer(serve)

    async def main():
        lp = loop.loop
        tr, pr = await lp.create_connection(lambda: RecordingProtocol(lp), "127.0.0.1",
                                            peer.port)
        tr.write(b"STARTTLS\r\n")
        await wait_for_data(pr, 14)
        assert bytes(pr.data) == b"220 go ahead\r\n"
        del pr.data[:]
        new = await lp.start_tls(tr, pr, certs.client_context(), server_hostname="localhost")
        engine_path(loop, new)
        assert new.get_protocol() is pr
        new.write(b"ping")
        await wait_for_data(pr, 4)
        exc = await pr.lost
        new.close()
        return bytes(pr.data), exc, pr.events
    data, exc, events = loop.run(main())
    peer.join()
    assert peer.error is None, peer.error
    assert (data, exc) == (b"PING", None)
    assert events == ["made", "data", "eof", ("lost", None)]


# -- the fallback to sslproto -----------------------------------------------------

@pytest.mark.parametrize("why", ["sni_callback", "keylog", "env"])
def test_fallback_to_sslproto(loop, certs, why, tmp_path, monkeypatch):
    sctx = certs.server_context()
    cctx = certs.client_context()
    sni = []
    if why == "sni_callback":
        sctx.sni_callback = lambda obj, name, ctx: sni.append(name)
    elif why == "keylog":
        cctx.keylog_filename = str(tmp_path / "keys.log")
    else:
        monkeypatch.setenv("KLOOP_TLS", "sslproto")

    async def main():
        lp = loop.loop
        srv, port, made = await echo_server(lp, sctx)
        tr, pr = await lp.create_connection(lambda: RecordingProtocol(lp), "127.0.0.1", port,
                                            ssl=cctx, server_hostname="localhost")
        tr.write(b"abc")
        await wait_for_data(pr, 3)
        if why == "sni_callback":
            sslproto_path(loop, made[0])
            engine_path(loop, tr)
        else:
            sslproto_path(loop, tr)
            if why == "env":
                sslproto_path(loop, made[0])
            else:
                engine_path(loop, made[0])
        tr.close()
        await pr.lost
        srv.close()
        await srv.wait_closed()
    loop.run(main())
    if why == "sni_callback":
        assert sni == ["localhost"]
    if why == "keylog":
        assert "CLIENT_TRAFFIC_SECRET_0" in (tmp_path / "keys.log").read_text()


def test_fallback_reason_is_logged(kloop_module, certs, caplog, monkeypatch):
    import logging
    monkeypatch.setenv("KLOOP_TLS", "sslproto")
    caplog.set_level(logging.DEBUG, logger="kloop")
    loop = kloop_module.new_event_loop()
    try:
        async def main():
            srv, port, made = await echo_server(loop, certs.server_context())
            tr, pr = await loop.create_connection(lambda: RecordingProtocol(loop),
                                                  "127.0.0.1", port, ssl=certs.client_context(),
                                                  server_hostname="localhost")
            tr.close()
            await pr.lost
            srv.close()
            await srv.wait_closed()
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert any("TLS through asyncio's sslproto: KLOOP_TLS=sslproto" in r.getMessage()
               for r in caplog.records)


def _malloc_in_use():
    """Bytes the C heap has handed out (glibc's mallinfo2)."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def test_idle_tls_connections_give_back_openssl_buffers(kloop_module, certs):
    # Python's contexts set SSL_MODE_RELEASE_BUFFERS; on the engine path
    # OpenSSL's record buffers (about 17 KiB each way) stay while a
    # connection is in use and are freed once the loop has been idle.
    loop = kloop_module.new_event_loop()
    conns = 16
    try:
        async def main():
            srv, port, made = await echo_server(loop, certs.server_context())
            cctx = certs.client_context()
            pairs = []
            for _ in range(conns):
                pairs.append(await loop.create_connection(
                    lambda: RecordingProtocol(loop), "127.0.0.1", port, ssl=cctx,
                    server_hostname="localhost"))
            for tr, pr in pairs:
                tr.write(b"x" * 1024)
            for tr, pr in pairs:
                await wait_for_data(pr, 1024)
            from kloop import transports
            assert isinstance(pairs[0][0], transports.TLSTransport), pairs[0][0]
            busy = _malloc_in_use()
            await asyncio.sleep(0.35)
            idle = _malloc_in_use()
            # The connections work on after it.
            for tr, pr in pairs:
                tr.write(b"y" * 1024)
            for tr, pr in pairs:
                await wait_for_data(pr, 2048)
                assert bytes(pr.data) == b"x" * 1024 + b"y" * 1024
            for tr, pr in pairs:
                tr.close()
                await pr.lost
            srv.close()
            await srv.wait_closed()
            return busy, idle
        busy, idle = loop.run_until_complete(main())
    finally:
        loop.close()
    # 2 * conns SSLs (client and server ends), each with a read and a
    # write buffer: count at least one of the two.
    assert busy - idle >= 2 * conns * 16384, (busy, idle)


def _openssl_hands_plaintext(transport, server_side):
    """Whether OpenSSL gives the engine's BIO plaintext records for the
    engine (or the kernel) to seal, and reads the peer's records from it as
    plaintext: (BIO_get_ktls_send, BIO_get_ktls_recv)."""
    import ctypes
    import _ssl
    from kloop import _tls
    ptr = _tls.ssl_pointer(transport.get_extra_info("ssl_object"), server_side)
    assert isinstance(ptr, int), ptr
    lib = ctypes.CDLL(_ssl.__file__)  # libssl's symbols, as _ssl resolves them
    for name in ("SSL_get_wbio", "SSL_get_rbio"):
        getattr(lib, name).restype = ctypes.c_void_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.BIO_ctrl.restype = ctypes.c_long
    lib.BIO_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    BIO_CTRL_GET_KTLS_SEND = 73
    BIO_CTRL_GET_KTLS_RECV = 76
    return (lib.BIO_ctrl(lib.SSL_get_wbio(ptr), BIO_CTRL_GET_KTLS_SEND, 0, None) == 1,
            lib.BIO_ctrl(lib.SSL_get_rbio(ptr), BIO_CTRL_GET_KTLS_RECV, 0, None) == 1)


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
@pytest.mark.parametrize("disable", ["", "tls_seal"])
def test_engine_seals_and_opens_records_where_the_kernel_cannot(kloop_module, certs, monkeypatch,
                                                                version, disable):
    # Without kernel TLS the engine takes the keys from OpenSSL (TLS 1.3's
    # receive key from the key log) and seals and opens the records itself;
    # KLOOP_DISABLE=tls_seal leaves them to OpenSSL.
    monkeypatch.setenv("KLOOP_DISABLE", disable)
    loop = kloop_module.new_event_loop()
    try:
        async def main():
            v = getattr(ssl.TLSVersion, version)
            sctx = certs.server_context(minimum_version=v, maximum_version=v)
            srv, port, made = await echo_server(loop, sctx)
            tr, pr = await loop.create_connection(
                lambda: RecordingProtocol(loop), "127.0.0.1", port,
                ssl=certs.client_context(), server_hostname="localhost")
            msg = bytes(range(256)) * 400  # several records
            tr.write(b"small")
            tr.write(msg)
            await wait_for_data(pr, 5 + len(msg))
            assert bytes(pr.data) == b"small" + msg
            assert tr.get_extra_info("ssl_object").version() == version.replace("_", ".")
            kernel = "ktls" in loop._proactor.caps()["enabled"]
            sides = (_openssl_hands_plaintext(tr, False),
                     _openssl_hands_plaintext(made[0], True))
            tr.close()
            await pr.lost
            srv.close()
            await srv.wait_closed()
            return kernel, sides
        kernel, sides = loop.run_until_complete(main())
    finally:
        loop.close()
    want = kernel or not disable
    assert [send for send, _ in sides] == [want, want], (kernel, sides)
    if not kernel:
        assert [recv for _, recv in sides] == [not disable, not disable], sides


# -- the layout assumption ------------------------------------------------------

def test_ssl_pointer_layout_is_proven(kloop_module, certs):
    from kloop import _tls
    ctx = certs.client_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost")
    ptr = _tls.ssl_pointer(obj, False)
    assert isinstance(ptr, int) and ptr, ptr
    # The side asked for is checked through libssl.
    assert "SSL_is_server" in _tls.ssl_pointer(obj, True)
    # A wrong offset is caught before any foreign pointer is followed...
    bad = _tls.ssl_pointer(obj, False, sslsocket_ctx=_tls.SSLSOCKET_CTX + 8)
    assert bad.startswith("layout check failed"), bad
    # ...and where it would point at something else, by libssl's answers.
    bad = _tls.ssl_pointer(obj, False, sslsocket_ssl=_tls.SSLSOCKET_SSL - 8)
    assert bad.startswith("layout check failed"), bad
    bad = _tls.ssl_pointer(obj, False, sslcontext_ctx=_tls.SSLCONTEXT_CTX + 8)
    assert bad.startswith("layout check failed"), bad
    srv = certs.server_context().wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert isinstance(_tls.ssl_pointer(srv, True), int)


def test_unsafe_contexts(kloop_module, certs, tmp_path):
    from kloop import _tls
    assert _tls.unsafe_context(certs.client_context()) is None
    ctx = certs.client_context()
    ctx.options &= ~ssl.OP_NO_COMPRESSION
    assert "compression" in _tls.unsafe_context(ctx)
    ctx = certs.client_context()
    ctx.post_handshake_auth = True
    assert "post_handshake_auth" in _tls.unsafe_context(ctx)
    ctx = certs.client_context()
    ctx._msg_callback = lambda *a: None
    assert "_msg_callback" in _tls.unsafe_context(ctx)
    ctx = certs.client_context()
    ctx.keylog_filename = str(tmp_path / "k")
    assert "keylog" in _tls.unsafe_context(ctx)


def test_info_reports_engine_tls(kloop_module):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    out = subprocess.run([sys.executable, "-m", "kloop", "info", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    info = json.loads(out.stdout)
    tls = info["tls"]
    assert tls["engine"]["available"] is True, tls
    assert tls["engine"]["libkloop"]["ssl_new_addr"] == tls["engine"]["python"]["ssl_new_addr"]
    assert tls["layout"] == "ok"
    assert tls["mode"] == "auto"
    text = subprocess.run([sys.executable, "-m", "kloop", "info"], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert "engine TLS   available" in text


def test_unix_sockets_and_accepted_socket(loop, certs, tmp_path):
    path = str(tmp_path / "tls.sock")

    async def main():
        lp = loop.loop
        made = []

        class Echo(asyncio.Protocol):
            def connection_made(self, tr):
                self.tr = tr
                made.append(tr)

            def data_received(self, data):
                self.tr.write(data)

        srv = await lp.create_unix_server(Echo, path, ssl=certs.server_context())
        tr, pr = await lp.create_unix_connection(lambda: RecordingProtocol(lp), path,
                                                 ssl=certs.client_context(),
                                                 server_hostname="localhost")
        engine_path(loop, tr)
        tr.write(b"unix")
        await wait_for_data(pr, 4)
        engine_path(loop, made[0])
        tr.close()
        await pr.lost
        srv.close()
        await srv.wait_closed()

        # connect_accepted_socket(ssl=...): the server side of a socket
        # accepted elsewhere.
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        (tr2, pr2), (tr3, pr3) = await asyncio.gather(
            lp.connect_accepted_socket(Echo, a, ssl=certs.server_context()),
            lp.create_connection(lambda: RecordingProtocol(lp), sock=b,
                                 ssl=certs.client_context(), server_hostname="localhost"))
        engine_path(loop, tr2)
        engine_path(loop, tr3)
        tr3.write(b"pair")
        await wait_for_data(pr3, 4)
        tr3.close()
        await pr3.lost
        tr2.close()
        await asyncio.sleep(0.2)
        assert bytes(pr.data) == b"unix" and bytes(pr3.data) == b"pair"
    loop.run(main())


# -- regressions found by CPython's suites on the engine path ---------------

def test_sendfile_fallback_while_protocol_is_paused(loop, certs, tmp_path):
    # loop.sendfile() over TLS takes asyncio's fallback, whose protocol
    # inherits the paused state and waits for resume_writing(): a transport
    # that forgot the pause on set_protocol() left it waiting for ever.
    data = os.urandom(256 * 1024 + 1)
    path = tmp_path / "payload"
    path.write_bytes(data)

    async def main():
        lp = loop.loop
        got = bytearray()
        done = lp.create_future()

        class Sink(asyncio.Protocol):
            def data_received(self, chunk):
                got.extend(chunk)

            def connection_lost(self, exc):
                if not done.done():
                    done.set_result(exc)

        srv = await lp.create_server(Sink, "127.0.0.1", 0, ssl=certs.server_context())
        port = srv.sockets[0].getsockname()[1]
        tr, _ = await lp.create_connection(asyncio.Protocol, "127.0.0.1", port,
                                           ssl=certs.client_context(),
                                           server_hostname="localhost")
        engine_path(loop, tr)
        tr.set_write_buffer_limits(high=4096)
        tr.write(b"p" * 7000)  # above the high mark
        with open(path, "rb") as f:
            sent = await asyncio.wait_for(lp.sendfile(tr, f), 20)
        tr.write(b"s" * 10)
        tr.close()
        assert await asyncio.wait_for(done, 20) is None
        srv.close()
        await srv.wait_closed()
        return sent, bytes(got)

    sent, got = loop.run(main())
    assert sent == len(data)
    assert got == b"p" * 7000 + data + b"s" * 10


def test_protocol_keeping_its_transport_is_freed_without_gc(loop, certs):
    # A protocol that stores its TLS transport forms a cycle until
    # connection_lost(); after it, plain reference counting must free both,
    # as CPython's test_create_connection_memory_leak checks. (Not asked of
    # plain transports: asyncio's own keep a bound method of themselves.)
    tls = True
    import gc
    import weakref

    async def main():
        lp = loop.loop
        srv, port, _ = await echo_server(lp, certs.server_context() if tls else None)

        class Keeper(asyncio.Protocol):
            def __init__(self):
                self.lost = lp.create_future()
                self.got = b""

            def connection_made(self, tr):
                self.tr = tr

            def data_received(self, data):
                self.got += data

            def connection_lost(self, exc):
                self.lost.set_result(exc)

        tr, pr = await lp.create_connection(
            Keeper, "127.0.0.1", port, ssl=certs.client_context() if tls else None,
            server_hostname="localhost" if tls else None)
        if tls:
            engine_path(loop, tr)
        tr.write(b"ping")
        while pr.got != b"ping":
            await asyncio.sleep(0.005)
        tr.close()
        await pr.lost
        refs = weakref.ref(tr), weakref.ref(pr)
        del tr, pr
        srv.close()
        await srv.wait_closed()
        return refs

    gc.disable()
    try:
        refs = loop.run(main())
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


def _read_all_tls(sock, obj, incoming, want):
    """Read plaintext through a memory-BIO SSLObject until `want` bytes or
    the peer's close_notify; returns (bytes read, close_notify seen)."""
    n = 0
    while n < want:
        try:
            n += len(obj.read(65536))
        except ssl.SSLWantReadError:
            data = sock.recv(65536)
            if not data:
                return n, False
            incoming.write(data)
        except ssl.SSLZeroReturnError:
            return n, True
    return n, False


def test_close_flushes_queued_data_before_close_notify(loop, certs):
    # What CPython's test_flush_before_shutdown checks through SSLProtocol's
    # private pause_writing(): data queued when close() is called all goes
    # out before close_notify.
    size = 4 << 20

    def serve(sock):
        obj, inc, out = _bio_handshake(sock, certs.server_context(), True)
        time.sleep(0.2)  # let the client queue everything and close
        got, _ = _read_all_tls(sock, obj, inc, size)
        extra, notified = 0, True
        try:
            obj.unwrap()  # our close_notify; done at once if the client's came
        except ssl.SSLWantReadError:
            sock.sendall(out.read())
            extra, notified = _read_all_tls(sock, obj, inc, 1)  # the client's
        return got, extra, notified

    peer = Peer(serve)

    async def main():
        lp = loop.loop
        tr, pr = await lp.create_connection(lambda: RecordingProtocol(lp), "127.0.0.1",
                                            peer.port, ssl=certs.client_context(),
                                            server_hostname="localhost")
        engine_path(loop, tr)
        tr.write(b"q" * size)
        tr.close()
        await asyncio.wait_for(pr.lost, 30)

    loop.run(main())
    result = peer.join()
    assert peer.error is None, repr(peer.error)
    got, extra, notified = result
    assert (got, extra, notified) == (size, 0, True)


@pytest.mark.parametrize("how", ["close_notify", "fin"])
def test_trailing_data_reaches_a_peer_that_already_closed(loop, certs, how):
    # What CPython's test_remote_shutdown_receives_trailing_data checks
    # through a test hook of SSLProtocol: the peer ends its side while data
    # is queued here; that data still arrives (before our close_notify, or
    # with none when the peer closed the connection).
    size = 1 << 20

    def serve(sock):
        obj, inc, out = _bio_handshake(sock, certs.server_context(), True)
        got, _ = _read_all_tls(sock, obj, inc, 4)
        obj.write(b"pong")
        sock.sendall(out.read())
        time.sleep(0.2)  # the client queues its data meanwhile
        if how == "close_notify":
            with pytest.raises(ssl.SSLWantReadError):
                obj.unwrap()
            sock.sendall(out.read())
        else:
            sock.shutdown(socket.SHUT_WR)
        return _read_all_tls(sock, obj, inc, size + 1)

    peer = Peer(serve)

    async def main():
        reader, writer = await asyncio.open_connection("127.0.0.1", peer.port,
                                                       ssl=certs.client_context(),
                                                       server_hostname="localhost")
        engine_path(loop, writer.transport)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"pong"
        writer.write(b"t" * size)
        try:
            assert await asyncio.wait_for(reader.read(), 30) == b""
        except (BrokenPipeError, ConnectionResetError):
            pass
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 30)
        except (BrokenPipeError, ConnectionResetError):
            pass

    loop.run(main())
    result = peer.join()
    assert peer.error is None, repr(peer.error)
    got, notified = result
    assert got == size
    assert notified == (how == "close_notify")
