"""asyncpg against a real PostgreSQL cluster, on each loop.

The cluster (integ_fixtures.pg_server) is made with initdb in a temporary
directory and listens on 127.0.0.1 (TLS offered, certificate from a test
CA) and on a Unix socket. asyncpg negotiates TLS with loop.start_tls() on
its already-connected transport, and cancels a running query by opening a
second connection that sends a CancelRequest.
"""

import asyncio
import datetime
import decimal
import io
import time
import uuid

import pytest

from integ_fixtures import certs, loop_name, pg_server  # noqa: F401  (fixtures)

asyncpg = pytest.importorskip(
    "asyncpg", reason="asyncpg is not installed (Debian: python3-asyncpg)")


def connect(server, transport, **kw):
    if transport == "unix":
        return asyncpg.connect(host=server.socket_dir, port=server.port, user=server.user,
                               database=server.database, ssl=False, **kw)
    kw.setdefault("ssl", False)
    return asyncpg.connect(host=server.host, port=server.port, user=server.user,
                           database=server.database, **kw)


@pytest.mark.parametrize("transport", ["tcp", "unix", "tls"])
def test_types_prepared_transactions(loop, pg_server, certs, transport):
    async def main():
        kw = {}
        if transport == "tls":
            kw["ssl"] = certs.client_context()
        conn = await connect(pg_server, "unix" if transport == "unix" else "tcp", **kw)
        try:
            ssl_used = await conn.fetchval(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert ssl_used is (transport == "tls")
            if transport == "unix":
                assert await conn.fetchval("SELECT inet_client_addr()") is None
            else:
                assert str(await conn.fetchval("SELECT inet_client_addr()")) == "127.0.0.1"
            u = uuid.uuid4()
            row = await conn.fetchrow(
                "SELECT $1::int AS i, $2::text AS t, $3::numeric AS n, $4::uuid AS u, "
                "$5::timestamptz AS ts, $6::bytea AS b, $7::int[] AS a, $8::jsonb AS j",
                42, "héllo", decimal.Decimal("3.14159"), u,
                datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
                b"\x00\x01" * 50000, [1, 2, 3], '{"k": [1, 2]}')
            assert dict(row) == {
                "i": 42, "t": "héllo", "n": decimal.Decimal("3.14159"), "u": u,
                "ts": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
                "b": b"\x00\x01" * 50000, "a": [1, 2, 3], "j": '{"k": [1, 2]}'}
            await conn.execute("CREATE TEMP TABLE t (id int PRIMARY KEY, name text)")
            stmt = await conn.prepare("SELECT name FROM t WHERE id = $1")
            await conn.executemany("INSERT INTO t VALUES ($1, $2)",
                                   [(i, f"n{i}") for i in range(1000)])
            assert [await stmt.fetchval(i) for i in (0, 500, 999)] == ["n0", "n500", "n999"]
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():
                    await conn.execute("INSERT INTO t VALUES (1000, 'x')")
                    await conn.execute("INSERT INTO t VALUES (0, 'dup')")
            assert await conn.fetchval("SELECT count(*) FROM t") == 1000
            # A result of ~10 MB streamed through a cursor.
            total = 0
            async with conn.transaction():
                async for r in conn.cursor(
                        "SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g",
                        prefetch=5000):
                    total += r[0] + len(r[1])
            assert total == 100000 * 100001 // 2 + 100000 * 100
        finally:
            await conn.close()

    loop.run(main())


@pytest.mark.parametrize("transport", ["tcp", "unix", "tls"])
def test_copy_100k_rows(loop, pg_server, certs, transport):
    n = 100_000

    async def main():
        kw = {"ssl": certs.client_context()} if transport == "tls" else {}
        conn = await connect(pg_server, "unix" if transport == "unix" else "tcp", **kw)
        try:
            await conn.execute("CREATE TEMP TABLE c (id int, payload text, f float8)")
            # COPY FROM STDIN in the binary format, from Python records.
            res = await conn.copy_records_to_table(
                "c", records=((i, f"row-{i}", i / 2) for i in range(n)))
            assert res == f"COPY {n}"
            assert await conn.fetchval("SELECT count(*) FROM c") == n
            assert await conn.fetchval("SELECT sum(id) FROM c") == n * (n - 1) // 2
            # COPY TO STDOUT into a file object, then back in as CSV.
            out = io.BytesIO()
            res = await conn.copy_from_table("c", output=out, format="csv")
            assert res == f"COPY {n}"
            data = out.getvalue()
            assert data.count(b"\n") == n
            assert data.startswith(b"0,row-0,0\n")
            await conn.execute("TRUNCATE c")
            res = await conn.copy_to_table("c", source=io.BytesIO(data), format="csv")
            assert res == f"COPY {n}"
            assert await conn.fetchval("SELECT sum(length(payload)) FROM c") == sum(
                len(f"row-{i}") for i in range(n))
        finally:
            await conn.close()

    loop.run(main())


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_listen_notify(loop, pg_server, transport):
    channel = f"kloop_{loop.name}_{transport}"

    async def main():
        listener = await connect(pg_server, transport)
        sender = await connect(pg_server, transport)
        got = []
        done = asyncio.get_running_loop().create_future()

        def on_notify(conn, pid, chan, payload):
            got.append((chan, payload))
            if len(got) == 300 and not done.done():
                done.set_result(None)

        try:
            await listener.add_listener(channel, on_notify)
            for i in range(200):
                await sender.execute(f"NOTIFY {channel}, 'p{i}'")
            # Notifications sent in one transaction arrive together at commit.
            async with sender.transaction():
                for i in range(200, 300):
                    await sender.execute("SELECT pg_notify($1, $2)", channel, f"p{i}")
            await asyncio.wait_for(done, 20)
            assert got == [(channel, f"p{i}") for i in range(300)]
            await listener.remove_listener(channel, on_notify)
        finally:
            await listener.close()
            await sender.close()

    loop.run(main())


@pytest.mark.parametrize("transport", ["tcp", "unix", "tls"])
def test_cancel_long_query(loop, pg_server, certs, transport):
    """A pg_sleep(60) cancelled by a timeout: the server stops it, the
    connection stays usable."""

    async def main():
        kw = {"ssl": certs.client_context()} if transport == "tls" else {}
        conn = await connect(pg_server, "unix" if transport == "unix" else "tcp", **kw)
        watcher = await connect(pg_server, "unix" if transport == "unix" else "tcp")
        try:
            pid = conn.get_server_pid()
            t0 = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.execute("SELECT pg_sleep(60)"), 0.5)
            assert time.monotonic() - t0 < 10
            assert await conn.fetchval("SELECT 1 + 1") == 2
            # The backend is idle again, not still sleeping.
            for _ in range(100):
                q = await watcher.fetchrow(
                    "SELECT state, query FROM pg_stat_activity WHERE pid = $1", pid)
                if q["state"] == "idle":
                    break
                await asyncio.sleep(0.05)
            assert q["state"] == "idle", q
            # The statement timeout path: asyncpg's own timeout= argument.
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(60)", timeout=0.3)
            assert await conn.fetchval("SELECT 'still usable'") == "still usable"
            # A task cancelled from outside while its query runs.
            task = asyncio.ensure_future(conn.execute("SELECT pg_sleep(60)"))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await conn.fetchval("SELECT 3") == 3
        finally:
            await conn.close()
            await watcher.close()

    loop.run(main())


def test_pool_concurrency(loop, pg_server):
    async def main():
        pool = await asyncpg.create_pool(host=pg_server.host, port=pg_server.port,
                                         user=pg_server.user, database=pg_server.database,
                                         ssl=False, min_size=2, max_size=20)
        try:
            async def one(i):
                async with pool.acquire() as conn:
                    return await conn.fetchval("SELECT $1::int * 2, pg_sleep(0.01)", i)

            results = await asyncio.gather(*(one(i) for i in range(500)))
            assert results == [i * 2 for i in range(500)]
            assert pool.get_size() == 20
        finally:
            await asyncio.wait_for(pool.close(), 20)

    loop.run(main())
