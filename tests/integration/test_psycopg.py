"""psycopg 3 (async) against a real PostgreSQL cluster, on each loop.

psycopg drives libpq's non-blocking socket itself and waits for it with
loop.add_reader()/add_writer() on one fd -- both at once in pipeline mode
and while sending large COPY data. The cluster is integ_fixtures.pg_server.
"""

import asyncio
import time

import pytest

from integ_fixtures import certs, loop_name, pg_server  # noqa: F401  (fixtures)

psycopg = pytest.importorskip(
    "psycopg", reason="psycopg 3 is not installed (Debian: python3-psycopg)")


def conninfo(server, transport, certs=None):
    if transport == "unix":
        return (f"host={server.socket_dir} port={server.port} user={server.user} "
                f"dbname={server.database}")
    info = f"host={server.host} port={server.port} user={server.user} dbname={server.database}"
    if transport == "tls":
        return info + f" sslmode=verify-full sslrootcert={certs.ca}"
    return info + " sslmode=disable"


def test_uses_add_reader(loop, pg_server):
    """psycopg really goes through the loop's add_reader/add_writer."""
    calls = []
    real_reader, real_writer = loop.loop.add_reader, loop.loop.add_writer

    def add_reader(fd, *a):
        calls.append(("r", fd))
        return real_reader(fd, *a)

    def add_writer(fd, *a):
        calls.append(("w", fd))
        return real_writer(fd, *a)

    loop.loop.add_reader, loop.loop.add_writer = add_reader, add_writer

    async def main():
        async with await psycopg.AsyncConnection.connect(conninfo(pg_server, "tcp")) as conn:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
            return conn.pgconn.socket

    try:
        fd = loop.run(main())
    finally:
        del loop.loop.add_reader, loop.loop.add_writer
    assert ("r", fd) in calls


@pytest.mark.parametrize("transport", ["tcp", "unix", "tls"])
def test_queries_transactions_cursors(loop, pg_server, certs, transport):
    async def main():
        async with await psycopg.AsyncConnection.connect(
                conninfo(pg_server, transport, certs)) as conn:
            cur = conn.cursor()
            await cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert (await cur.fetchone())[0] is (transport == "tls")
            await cur.execute("CREATE TEMP TABLE t (id int PRIMARY KEY, name text, b bytea)")
            await cur.executemany("INSERT INTO t VALUES (%s, %s, %s)",
                                  [(i, f"n{i}", bytes([i % 256]) * 100) for i in range(1000)])
            await conn.commit()
            await cur.execute("SELECT count(*), sum(id) FROM t")
            assert await cur.fetchone() == (1000, 999 * 1000 // 2)
            # A failed transaction rolls back and the connection stays usable.
            with pytest.raises(psycopg.errors.UniqueViolation):
                async with conn.transaction():
                    await conn.execute("INSERT INTO t VALUES (1000, 'x', NULL)")
                    await conn.execute("INSERT INTO t VALUES (0, 'dup', NULL)")
            await cur.execute("SELECT count(*) FROM t")
            assert await cur.fetchone() == (1000,)
            # A large value both ways (many reads and writes on the fd).
            big = b"\x00\xfe" * (2 << 20)
            await cur.execute("SELECT %s::bytea", (big,))
            assert (await cur.fetchone())[0] == big
            # A server-side (named) cursor streaming 100k rows.
            async with conn.cursor(name="stream") as scur:
                scur.itersize = 5000
                await scur.execute("SELECT g, repeat('y', 50) FROM generate_series(1, 100000) g")
                n = total = 0
                async for row in scur:
                    n += 1
                    total += row[0]
            assert (n, total) == (100000, 100000 * 100001 // 2)
            await conn.rollback()

    loop.run(main())


@pytest.mark.parametrize("transport", ["tcp", "unix", "tls"])
def test_pipeline_mode(loop, pg_server, certs, transport):
    """libpq pipeline mode: psycopg waits for read and write on the fd at once."""
    async def main():
        async with await psycopg.AsyncConnection.connect(
                conninfo(pg_server, transport, certs), autocommit=True) as conn:
            await conn.execute("CREATE TEMP TABLE p (id int, v text)")
            async with conn.pipeline():
                cur = conn.cursor()
                for i in range(2000):
                    await cur.execute("INSERT INTO p VALUES (%s, %s)", (i, "v" * 200))
                sel = conn.cursor()
                await sel.execute("SELECT count(*), sum(id) FROM p")
                # Fetching inside the pipeline makes psycopg sync and read.
                assert await sel.fetchone() == (2000, 1999 * 2000 // 2)
                await cur.execute("DELETE FROM p WHERE id < 1000")
            assert cur.rowcount == 1000

    loop.run(main())


@pytest.mark.parametrize("transport", ["tcp", "unix", "tls"])
def test_copy_100k_rows(loop, pg_server, certs, transport):
    n = 100_000

    async def main():
        async with await psycopg.AsyncConnection.connect(
                conninfo(pg_server, transport, certs)) as conn:
            cur = conn.cursor()
            await cur.execute("CREATE TEMP TABLE c (id int, payload text)")
            async with cur.copy("COPY c (id, payload) FROM STDIN") as copy:
                for i in range(n):
                    await copy.write_row((i, f"row-{i}"))
            await cur.execute("SELECT count(*), sum(id) FROM c")
            assert await cur.fetchone() == (n, n * (n - 1) // 2)
            got = bytearray()
            async with cur.copy("COPY c TO STDOUT") as copy:
                async for block in copy:
                    got += block
            assert got.count(b"\n") == n
            assert got.startswith(b"0\trow-0\n")
            await conn.rollback()

    loop.run(main())


def test_listen_notify(loop, pg_server):
    channel = f"kloop_psycopg_{loop.name}"

    async def main():
        async with await psycopg.AsyncConnection.connect(
                conninfo(pg_server, "tcp"), autocommit=True) as listener, \
                await psycopg.AsyncConnection.connect(
                    conninfo(pg_server, "unix"), autocommit=True) as sender:
            await listener.execute(f"LISTEN {channel}")

            async def receive(n):
                got = []
                gen = listener.notifies()
                async for note in gen:
                    got.append((note.channel, note.payload))
                    if len(got) == n:
                        await gen.aclose()
                        break
                return got

            receiver = asyncio.ensure_future(receive(100))
            await asyncio.sleep(0.1)
            for i in range(100):
                await sender.execute("SELECT pg_notify(%s, %s)", (channel, f"p{i}"))
            got = await asyncio.wait_for(receiver, 20)
            assert got == [(channel, f"p{i}") for i in range(100)]

    loop.run(main())


@pytest.mark.parametrize("transport", ["tcp", "unix", "tls"])
def test_cancel_long_query(loop, pg_server, certs, transport):
    async def main():
        async with await psycopg.AsyncConnection.connect(
                conninfo(pg_server, transport, certs), autocommit=True) as conn:
            # Cancelled by the client (psycopg's cancel(), a CancelRequest on
            # a new connection) while the loop waits on the query's fd.
            asyncio.get_running_loop().call_later(0.3, conn.cancel)
            t0 = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await conn.execute("SELECT pg_sleep(60)")
            assert time.monotonic() - t0 < 10
            assert await (await conn.execute("SELECT 1 + 1")).fetchone() == (2,)
            # Cancelled by the server (statement_timeout).
            await conn.execute("SET statement_timeout = 300")
            with pytest.raises(psycopg.errors.QueryCanceled):
                await conn.execute("SELECT pg_sleep(60)")
            await conn.execute("SET statement_timeout = 0")
            assert await (await conn.execute("SELECT 'ok'")).fetchone() == ("ok",)

    loop.run(main())


def test_pool(loop, pg_server):
    psycopg_pool = pytest.importorskip(
        "psycopg_pool", reason="psycopg_pool is not installed (Debian: python3-psycopg-pool)")

    async def main():
        pool = psycopg_pool.AsyncConnectionPool(
            conninfo(pg_server, "tcp"), min_size=2, max_size=10, open=False)
        await pool.open(wait=True, timeout=20)
        try:
            async def one(i):
                async with pool.connection() as conn:
                    cur = await conn.execute("SELECT %s::int * 2, pg_sleep(0.005)", (i,))
                    return (await cur.fetchone())[0]

            results = await asyncio.gather(*(one(i) for i in range(300)))
            assert results == [i * 2 for i in range(300)]
            assert pool.get_stats()["pool_size"] == 10
        finally:
            await pool.close(timeout=10)

    loop.run(main())
