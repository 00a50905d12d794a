"""Large bytes writes: kloop lends the bytes object to the engine instead of
copying it (kloop_stream_write_ref) and keeps it alive until the engine's
release record. The data must arrive as on every other loop; on kloop the
lent objects must be let go of once sent, aborted or the loop closed."""

import asyncio
import gc
import socket
import sys
import warnings

import pytest

from conftest import harness_for
from util import RecordingProtocol, connect_pair, pattern, read_all

FAMILIES = [socket.AF_INET, socket.AF_UNIX]
FAMILY_IDS = ["tcp", "unix"]


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_large_and_small_writes_interleave_in_order(loop, family):
    # Sizes on both sides of the lending threshold, in one stream.
    sizes = [1, 16384, (1 << 20) - 1, 1 << 20, 100, 65536, 7, (1 << 20) + 1, 300000, 5] * 3
    chunks = [pattern(n, seed=i) for i, n in enumerate(sizes)]
    expected = b"".join(chunks)

    async def main():
        tr, pr, peer = await connect_pair(
            loop.loop, lambda: RecordingProtocol(loop.loop), family=family,
            rcvbuf=32768, sndbuf=32768)
        try:
            for i, c in enumerate(chunks):
                tr.write(c if i % 4 else bytearray(c))   # bytes and not bytes
                if i % 7 == 0:
                    await asyncio.sleep(0)
            tr.close()
            data, err = await loop.loop.run_in_executor(None, read_all, peer)
        finally:
            peer.close()
        assert err is None
        assert len(data) == len(expected)
        assert data == expected
        assert await pr.lost is None

    loop.run(main())


def _kloop():
    h = harness_for("kloop")
    return h, h.loop._proactor


async def _until_released(proactor):
    """Wait up to a second for the engine's release records of every lent
    object; True when none is left."""
    for _ in range(100):
        if not proactor._lent:
            return True
        await asyncio.sleep(0.01)
    return not proactor._lent


def test_writes_below_1mib_are_sent_at_once_or_copied_never_kept():
    # A lent object lives until its send completes: a server answering many
    # streams with 100 KiB bodies held one per stream, and glibc trimmed and
    # regrew its heap under them as they were freed together (a brk and page
    # faults per answer). Below 1 MiB nothing is lent: the engine sends a
    # large write to an idle stream at once and copies what must wait.
    h, proactor = _kloop()
    bodies = [pattern(100 * 1024, seed=i) for i in range(22)]   # 2.2 MB

    async def main():
        tr, pr, peer = await connect_pair(
            h.loop, lambda: RecordingProtocol(h.loop), family=socket.AF_UNIX,
            rcvbuf=32768, sndbuf=32768)
        try:
            before = h.loop.get_stats()["direct_sends"]
            refs = [sys.getrefcount(b) for b in bodies]
            for b in bodies:
                tr.write(b)
            del b
            assert [sys.getrefcount(b) for b in bodies] == refs, "a write kept its bytes"
            assert not proactor._lent
            # The first went out at once, as far as the socket took it; the
            # rest queued behind what it left.
            assert h.loop.get_stats()["direct_sends"] - before == 1
            assert 0 < tr.get_write_buffer_size() < sum(map(len, bodies))
            total = sum(map(len, bodies))
            got, err = await h.loop.run_in_executor(None, read_all, peer, total)
            assert err is None and got == b"".join(bodies)
            tr.close()
            assert await pr.lost is None
        finally:
            peer.close()

    try:
        h.run(main())
    finally:
        h.close()


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_lent_bytes_are_kept_until_sent_then_released(family):
    h, proactor = _kloop()
    payload = pattern(1 << 20, seed=7)
    small = b"x" * 100

    async def main():
        tr, pr, peer = await connect_pair(
            h.loop, lambda: RecordingProtocol(h.loop), family=family,
            rcvbuf=32768, sndbuf=32768)
        try:
            refs = sys.getrefcount(payload)
            tr.write(payload)
            tr.write(small)
            assert len(proactor._lent) == 1, "a 1 MiB bytes write was not lent"
            assert sys.getrefcount(payload) == refs + 1, "the lent object is not kept alive"
            got, err = await h.loop.run_in_executor(
                None, read_all, peer, len(payload) + len(small))
            assert err is None and got == payload + small
            assert await _until_released(proactor), "sent bytes were never released"
            assert sys.getrefcount(payload) == refs
            assert tr.get_write_buffer_size() == 0
            tr.close()
            assert await pr.lost is None
        finally:
            peer.close()

    try:
        h.run(main())
    finally:
        h.close()


def test_aborted_lent_bytes_are_released():
    h, proactor = _kloop()
    payloads = [pattern(1 << 20, seed=i) for i in range(4)]

    async def main():
        tr, pr, peer = await connect_pair(
            h.loop, lambda: RecordingProtocol(h.loop), rcvbuf=32768, sndbuf=32768)
        try:
            refs = [sys.getrefcount(p) for p in payloads]
            for i in range(len(payloads)):
                tr.write(payloads[i])
            assert len(proactor._lent) == 4
            await asyncio.sleep(0.01)
            assert tr.get_write_buffer_size() > 0, "test needs data still queued"
            tr.abort()
            assert await pr.lost is None
            assert not proactor._lent, "abort kept lent bytes"
            assert [sys.getrefcount(p) for p in payloads] == refs
        finally:
            peer.close()

    try:
        h.run(main())
    finally:
        h.close()


def test_loop_close_lets_go_of_lent_bytes():
    h, proactor = _kloop()
    payload = pattern(4 << 20, seed=9)
    state = {}

    async def main():
        tr, pr, peer = await connect_pair(
            h.loop, lambda: RecordingProtocol(h.loop), rcvbuf=32768, sndbuf=32768)
        state["peer"] = peer
        state["refs"] = sys.getrefcount(payload)
        tr.write(payload)
        await asyncio.sleep(0.01)
        assert proactor._lent, "test needs lent bytes queued when the loop closes"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        try:
            h.run(main())
        finally:
            h.close()      # closes the loop with the transport's queue still full
            state["peer"].close()
        gc.collect()
    assert not proactor._lent
    assert sys.getrefcount(payload) == state["refs"]
    # The transport was never closed: like asyncio's, it says so (and its
    # socket does) when it is collected -- here, not in the next test.
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert sum(m.startswith("unclosed transport") for m in unclosed) == 1, unclosed
