"""Kernel TLS from Python: kloop's engine TLS on a kernel with the TLS ULP.

Run inside the qemu guest by the ktls stage of scripts/test.sh
(``scripts/ktls-vm.sh --host-root /usr/bin/python3 -m pytest ...``: the
guest boots Debian's kernel with tls.ko and mounts this machine's root
read-only). On a kernel without the TLS ULP every test skips with the
reason; with KLOOP_REQUIRE_KTLS=1 (set in the guest) that is a failure.
"""

import asyncio
import hashlib
import os
import socket
import ssl
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
os.environ.setdefault("KLOOP_LIBRARY", os.path.join(ROOT, "build", "libkloop", "libkloop.so"))

import kloop  # noqa: E402
from kloop import _ffi, transports  # noqa: E402

SOL_TLS, TLS_TX, TLS_RX = 282, 1, 2
VERSION = {ssl.TLSVersion.TLSv1_2: 0x0303, ssl.TLSVersion.TLSv1_3: 0x0304}


def _ulp_error():
    """None when a connected TCP socket takes the TLS ULP, else why not."""
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        with socket.create_connection(lsock.getsockname()) as c:
            try:
                c.setsockopt(socket.IPPROTO_TCP, 31, b"tls")  # TCP_ULP
            except OSError as exc:
                return f"setsockopt TCP_ULP tls: {exc}"
            return None
    finally:
        lsock.close()


@pytest.fixture(autouse=True)
def require_ktls():
    err = _ulp_error()
    if err is not None:
        why = f"kernel has no TLS ULP ({err})"
        if os.environ.get("KLOOP_REQUIRE_KTLS", "0") not in ("", "0"):
            pytest.fail(why + ", and KLOOP_REQUIRE_KTLS is set")
        pytest.skip(why)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    key, crt = str(d / "key.pem"), str(d / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", key, "-out", crt], check=True, capture_output=True)
    return key, crt


def contexts(certs, version):
    key, crt = certs
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(crt, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(crt)
    for ctx in (server, client):
        ctx.minimum_version = ctx.maximum_version = version
    return server, client


def key_version(sock, direction):
    """The TLS version the kernel holds for one direction, or None."""
    try:
        raw = sock.getsockopt(SOL_TLS, direction, 4)
    except OSError:
        return None
    return int.from_bytes(raw[:2], "little")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls12", "tls13"])
def test_engine_tls_is_offloaded_and_sendfile_splices(certs, tmp_path, version):
    sctx, cctx = contexts(certs, version)
    payload = os.urandom(512 * 1024)
    path = tmp_path / "file"
    path.write_bytes(payload)
    seen = {}

    async def main():
        loop = asyncio.get_running_loop()
        got = bytearray()
        done = loop.create_future()

        class Sink(asyncio.Protocol):
            def connection_made(self, tr):
                seen["server"] = tr

            def data_received(self, data):
                got.extend(data)

            def connection_lost(self, exc):
                if not done.done():
                    done.set_result(exc)

        srv = await loop.create_server(Sink, "127.0.0.1", 0, ssl=sctx)
        port = srv.sockets[0].getsockname()[1]
        tr, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port, ssl=cctx,
                                             server_hostname="localhost")
        assert isinstance(tr, transports.SSLEngineTransport), tr
        sock = tr.get_extra_info("socket")
        seen["tx"] = key_version(sock, TLS_TX)
        seen["rx"] = key_version(sock, TLS_RX)
        seen["bits"] = tr._ktls
        fallback = loop._sendfile_fallback

        async def no_fallback(*args, **kwargs):
            seen["fallback"] = True
            return await fallback(*args, **kwargs)

        loop._sendfile_fallback = no_fallback
        tr.write(b"head:")
        with open(path, "rb") as f:
            sent = await loop.sendfile(tr, f)
        tr.write(b":tail")
        tr.close()
        assert await asyncio.wait_for(done, 60) is None
        srv.close()
        await srv.wait_closed()
        return sent, bytes(got)

    sent, got = kloop.run(main())
    want = VERSION[version]
    assert seen["tx"] == want, seen
    assert seen["bits"] & _ffi.HANDSHAKE_KTLS_TX
    if version == ssl.TLSVersion.TLSv1_2:
        assert seen["rx"] == want and seen["bits"] & _ffi.HANDSHAKE_KTLS_RX, seen
    else:
        assert seen["rx"] is None, seen  # OpenSSL 3.0 keeps TLS 1.3 receiving
    assert "fallback" not in seen, "loop.sendfile read the file through Python"
    assert sent == len(payload)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(
        b"head:" + payload + b":tail").hexdigest()


def test_start_tls_in_place_then_a_stdlib_peer_reads_what_the_kernel_encrypted(certs):
    sctx, cctx = contexts(certs, ssl.TLSVersion.TLSv1_3)
    data = os.urandom(256 * 1024)

    # The loop is the TLS server on a connected socket: start_tls on a plain
    # kloop transport (in place), then write through the kernel.
    async def server_side():
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        port = lsock.getsockname()[1]
        result = {}

        def peer():
            with socket.create_connection(("127.0.0.1", port)) as raw:
                with cctx.wrap_socket(raw, server_hostname="localhost") as s:
                    buf = bytearray()
                    while len(buf) < len(data):
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        buf.extend(chunk)
                    result["digest"] = hashlib.sha256(buf).digest()
                    s.sendall(b"k")

        fut = loop.run_in_executor(None, peer)
        conn, _ = await loop.sock_accept(lsock)
        tr, pr = await loop.connect_accepted_socket(asyncio.Protocol, conn)
        tls = await loop.start_tls(tr, pr, sctx, server_side=True)
        assert isinstance(tls, transports.SSLEngineTransport), tls
        result["tx"] = key_version(tls.get_extra_info("socket"), TLS_TX)
        tls.write(data)
        await asyncio.wait_for(fut, 60)
        tls.abort()
        lsock.close()
        return result

    result = kloop.run(server_side())
    assert result["tx"] == 0x0304
    assert result["digest"] == hashlib.sha256(data).digest()
