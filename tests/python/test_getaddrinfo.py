"""loop.getaddrinfo(): same answers as the stock loop; kloop answers numeric
hosts without the executor (its numeric fast path)."""

import concurrent.futures
import socket

import pytest

CASES = [
    ("127.0.0.1", 80, {}),
    ("127.0.0.1", "8080", {"type": socket.SOCK_STREAM}),
    ("::1", 443, {"family": socket.AF_INET6}),
    ("127.0.0.1", None, {"proto": socket.IPPROTO_UDP}),
    (b"127.0.0.1", b"53", {}),
    ("localhost", 80, {"type": socket.SOCK_STREAM}),
]


@pytest.mark.parametrize("host,port,kw", CASES)
def test_getaddrinfo_matches_the_c_library(loop, host, port, kw):
    async def main():
        return await loop.loop.getaddrinfo(host, port, **kw)

    got = loop.run(main())
    want = socket.getaddrinfo(host, port, kw.get("family", 0), kw.get("type", 0),
                              kw.get("proto", 0), kw.get("flags", 0))
    assert sorted(got) == sorted(want)


def test_getaddrinfo_errors_as_asyncio(loop):
    async def main():
        with pytest.raises(socket.gaierror):
            await loop.loop.getaddrinfo("no-such-host.invalid", 80)
        with pytest.raises(socket.gaierror):
            await loop.loop.getaddrinfo("127.0.0.1", "no-such-service-name")

    loop.run(main())


class _RefusingExecutor(concurrent.futures.ThreadPoolExecutor):
    def __init__(self):
        super().__init__(max_workers=1)
        self.used = 0

    def submit(self, *args, **kwargs):
        self.used += 1
        return super().submit(*args, **kwargs)


def test_numeric_hosts_skip_the_executor(loop):
    if loop.name != "kloop":
        pytest.skip("the numeric fast path is kloop's; the stock loop always uses the executor")
    ex = _RefusingExecutor()

    async def main():
        lp = loop.loop
        lp.set_default_executor(ex)
        a = await lp.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
        b = await lp.getaddrinfo("::1", "443")
        numeric_uses = ex.used
        await lp.getaddrinfo("localhost", 80)
        return a, b, numeric_uses, ex.used

    a, b, numeric_uses, all_uses = loop.run(main())
    assert a[0][4] == ("127.0.0.1", 80)
    assert b[0][4][:2] == ("::1", 443)
    assert numeric_uses == 0
    assert all_uses == 1  # a name still goes through the executor
