"""kloop's engine statistics: kloop.get_stats(loop) and the state added to
asyncio's slow-callback warnings in debug mode. kloop only: the stock loops
have no engine to report on."""

import asyncio
import logging
import time

import pytest

from conftest import require_loop


@pytest.fixture
def kloop_mod():
    require_loop("kloop")
    import kloop
    return kloop


def test_get_stats_counts_the_engine_work(kloop_mod):
    async def main():
        loop = asyncio.get_running_loop()
        before = kloop_mod.get_stats(loop)

        handler_done = asyncio.Event()

        async def echo(reader, writer):
            while data := await reader.read(1000):
                writer.write(data)
            writer.close()
            await writer.wait_closed()
            handler_done.set()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        during = loop.get_stats()
        for _ in range(20):
            writer.write(b"x" * 100)
            assert await reader.readexactly(100) == b"x" * 100
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(handler_done.wait(), 5)
        server.close()
        await server.wait_closed()
        after = loop.get_stats()
        return before, during, after

    before, during, after = kloop_mod.run(main())
    assert during["streams"] >= 2  # both ends of the connection are engine streams
    assert set(before) >= {"ops_in_flight", "streams", "buffers_in_use", "polls", "enters",
                           "sqes", "cqes", "completions", "cq_overflows", "enobufs", "direct_sends",
                           "buffers_released", "sqes_per_poll", "enters_per_poll"}
    assert after["polls"] > before["polls"]
    assert after["sqes"] > before["sqes"]
    assert after["completions"] >= before["completions"]
    assert after["cq_overflows"] == 0
    # at most one io_uring_enter per poll (plus the server's immediate accept cancel)
    assert after["enters"] <= after["polls"] + 2
    assert after["sqes_per_poll"] == pytest.approx(after["sqes"] / after["polls"])


def test_idle_loop_gives_back_receive_buffers_of_a_burst(kloop_mod):
    # Many connections send at once, one goes on a while, then everything
    # is quiet: a loop that sleeps returns the receive buffers the burst
    # touched to the kernel (those the receive ring still holds stay).
    async def main():
        loop = asyncio.get_running_loop()
        got = 0
        done = asyncio.Event()

        class Sink(asyncio.Protocol):
            def data_received(self, data):
                nonlocal got
                got += len(data)
                if got >= 128 * 3000:
                    done.set()

        server = await loop.create_server(Sink, "127.0.0.1", 0, backlog=256)
        port = server.sockets[0].getsockname()[1]
        writers = []
        for _ in range(128):
            writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
        for w in writers:
            w.write(b"b" * 3000)
        await asyncio.wait_for(done.wait(), 10)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(300):
            writer.write(b"t" * 1000)
            await asyncio.sleep(0)
        writer.close()
        before = loop.get_stats()["buffers_released"]
        await asyncio.sleep(0.5)
        after = loop.get_stats()["buffers_released"]
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()
        return before, after

    before, after = kloop_mod.run(main())
    assert after - before >= 16, (before, after)


def test_slow_callback_warning_carries_engine_state(kloop_mod):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    log = logging.getLogger("asyncio")
    log.addHandler(handler)
    try:
        async def main():
            loop = asyncio.get_running_loop()
            loop.slow_callback_duration = 0.05
            loop.call_soon(time.sleep, 0.1)
            await asyncio.sleep(0.2)

        kloop_mod.run(main(), debug=True)
    finally:
        log.removeHandler(handler)
    slow = [m for m in records if m.startswith("Executing") and "took" in m]
    assert slow, records
    assert "[kloop: " in slow[0] and "ops in flight" in slow[0], slow[0]
