"""redis-py's asyncio client against a real redis-server, on each loop.

The server (integ_fixtures.redis_server) listens on 127.0.0.1 and on a
Unix socket. Keys carry the loop's name so runs never see each other's.
"""

import asyncio
import resource
import time

import pytest

from integ_fixtures import loop_name, redis_server  # noqa: F401  (fixtures)
from integ_util import pattern

redis_asyncio = pytest.importorskip(
    "redis.asyncio", reason="redis-py is not installed (Debian: python3-redis)")
import redis.exceptions as redis_exceptions  # noqa: E402


def client(server, transport, **kw):
    if transport == "unix":
        return redis_asyncio.Redis(unix_socket_path=server.unix_path, **kw)
    return redis_asyncio.Redis(host=server.host, port=server.port, **kw)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_commands_and_large_values(loop, redis_server, transport):
    key = f"{loop.name}:{transport}:basic"
    big = pattern(4 << 20, seed=1)  # 4 MiB: many receive buffers, short writes

    async def main():
        r = client(redis_server, transport)
        try:
            assert await r.ping() is True
            assert await r.set(key, b"v1") is True
            assert await r.get(key) == b"v1"
            assert await r.incr(key + ":n") == 1
            assert await r.incrby(key + ":n", 41) == 42
            assert await r.set(key + ":big", big) is True
            assert await r.strlen(key + ":big") == len(big)
            assert await r.get(key + ":big") == big
            assert await r.getrange(key + ":big", 1000, 1999) == big[1000:2000]
            info = await r.client_info()
            if transport == "unix":
                assert info["addr"].startswith("/") or info["laddr"].endswith("redis.sock")
            else:
                assert info["addr"].startswith("127.0.0.1:")
            assert await r.delete(key, key + ":n", key + ":big") == 3
            assert await r.exists(key) == 0
        finally:
            await r.close()

    loop.run(main())


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_pipelines(loop, redis_server, transport):
    key = f"{loop.name}:{transport}:pipe"

    async def main():
        r = client(redis_server, transport)
        try:
            # A transaction (MULTI/EXEC) of 1,000 commands in one round trip.
            async with r.pipeline(transaction=True) as pipe:
                for _ in range(1000):
                    pipe.incr(key + ":ctr")
                results = await pipe.execute()
            assert results == list(range(1, 1001))
            # A plain pipeline mixing commands and replies of every kind.
            async with r.pipeline(transaction=False) as pipe:
                pipe.delete(key + ":l")
                pipe.rpush(key + ":l", *[str(i) for i in range(500)])
                pipe.lrange(key + ":l", 0, -1)
                pipe.hset(key + ":h", mapping={"a": "1", "b": "2"})
                pipe.hgetall(key + ":h")
                pipe.get(key + ":missing")
                pipe.llen(key + ":nonlist")
                results = await pipe.execute()
            assert results[1] == 500
            assert results[2] == [str(i).encode() for i in range(500)]
            assert results[3] == 2
            assert results[4] == {b"a": b"1", b"b": b"2"}
            assert results[5] is None
            assert results[6] == 0
            # Optimistic locking: WATCH, a concurrent change, EXEC refused.
            other = client(redis_server, transport)
            try:
                async with r.pipeline(transaction=True) as pipe:
                    await pipe.watch(key + ":ctr")
                    assert int(await pipe.get(key + ":ctr")) == 1000
                    await other.set(key + ":ctr", 0)
                    pipe.multi()
                    pipe.incr(key + ":ctr")
                    with pytest.raises(redis_exceptions.WatchError):
                        await pipe.execute()
            finally:
                await other.close()
            assert await r.get(key + ":ctr") == b"0"
            await r.delete(key + ":ctr", key + ":l", key + ":h")
        finally:
            await r.close()

    loop.run(main())


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_pubsub(loop, redis_server, transport):
    channel = f"{loop.name}:{transport}:chan"

    async def main():
        sub_client = client(redis_server, transport)
        pub = client(redis_server, transport)
        ps = sub_client.pubsub(ignore_subscribe_messages=True)
        try:
            await ps.subscribe(channel)
            await ps.psubscribe(channel + ".*")

            async def collect(n):
                got = []
                while len(got) < n:
                    msg = await ps.get_message(timeout=1.0)
                    if msg is not None:
                        got.append(msg)
                return got

            collector = asyncio.ensure_future(collect(200 + 2))
            # Subscriptions are confirmed before anything is published.
            for _ in range(100):
                if await pub.pubsub_numsub(channel) == [(channel.encode(), 1)]:
                    break
                await asyncio.sleep(0.01)
            for i in range(200):
                receivers = await pub.publish(channel, f"m{i}")
                assert receivers == 1
            assert await pub.publish(channel + ".x", "pattern-1") == 1
            assert await pub.publish(channel + ".y", b"\x00\xff" * 5000) == 1
            got = await asyncio.wait_for(collector, 20)
            plain = [m for m in got if m["type"] == "message"]
            pmsgs = [m for m in got if m["type"] == "pmessage"]
            assert [m["data"] for m in plain] == [f"m{i}".encode() for i in range(200)]
            assert [(m["channel"], m["data"]) for m in pmsgs] == [
                ((channel + ".x").encode(), b"pattern-1"),
                ((channel + ".y").encode(), b"\x00\xff" * 5000)]
            await ps.unsubscribe(channel)
            await ps.punsubscribe()
            for _ in range(100):
                if await pub.publish(channel, "late") == 0:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("still subscribed after unsubscribe")
        finally:
            await ps.close()
            await sub_client.close()
            await pub.close()

    loop.run(main())


def test_1000_concurrent_commands(loop, redis_server):
    """1,000 tasks at once on one client: the pool opens a connection each."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < 1100:
        # integ_fixtures raised the limit as far as the hard limit allowed.
        pytest.skip(f"RLIMIT_NOFILE is {soft}: 1,000 connections need about 1,100 fds "
                    "in this process and in redis-server (raise it with ulimit -n)")
    key = f"{loop.name}:conc"

    async def one(r, i):
        await r.set(f"{key}:{i}", i)
        return int(await r.get(f"{key}:{i}"))

    async def main():
        r = client(redis_server, "tcp")
        try:
            results = await asyncio.gather(*(one(r, i) for i in range(1000)))
            assert results == list(range(1000))
            opened = len(r.connection_pool._available_connections) + len(
                r.connection_pool._in_use_connections)
            assert opened > 100  # it really ran concurrently
            clients = await r.client_list()
            assert len(clients) >= opened
            assert await r.delete(*(f"{key}:{i}" for i in range(1000))) == 1000
        finally:
            await r.close()
        # The same on a bounded pool: 1,000 tasks wait for 20 connections.
        pool = redis_asyncio.BlockingConnectionPool(
            host=redis_server.host, port=redis_server.port, max_connections=20, timeout=30)
        r = redis_asyncio.Redis(connection_pool=pool)
        try:
            results = await asyncio.gather(*(one(r, i) for i in range(1000)))
            assert results == list(range(1000))
            assert len(pool._connections) == 20
            assert await r.delete(*(f"{key}:{i}" for i in range(1000))) == 1000
        finally:
            await r.close()
            await pool.disconnect()

    loop.run(main())


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_blocking_pop(loop, redis_server, transport):
    """BLPOP: a server-side timeout, and a wake-up by another connection."""
    key = f"{loop.name}:{transport}:q"

    async def main():
        r = client(redis_server, transport)
        other = client(redis_server, transport)
        try:
            t0 = time.monotonic()
            assert await r.blpop(key, timeout=1) is None
            assert 0.9 <= time.monotonic() - t0 < 5
            waiter = asyncio.ensure_future(r.blpop(key, timeout=10))
            await asyncio.sleep(0.2)
            assert not waiter.done()
            await other.rpush(key, "hello")
            assert await asyncio.wait_for(waiter, 5) == (key.encode(), b"hello")
        finally:
            await r.close()
            await other.close()

    loop.run(main())
