"""Fixtures for kloop's integration tests (real libraries, real servers).

Test modules import the fixtures they use from here (a conftest.py in this
directory would shadow tests/conftest.py, which tests/python and
tests/conformance import as ``conftest``).

Each test takes the ``loop`` fixture of tests/conftest.py (a LoopHarness:
unexpected exception-handler calls, leaked fds and warnings fail the test)
and runs once per loop in INTEGRATION_LOOPS: the stock asyncio loop (the
reference) and kloop. ``KLOOP_INTEGRATION_LOOPS="asyncio kloop uvloop"``
adds uvloop as a second reference.

Servers (redis-server, PostgreSQL) are started once per session by the
fixtures below, in temporary directories on free loopback ports, and
stopped at the end. A server binary that is not installed skips the tests
that need it, with the package name in the reason (scripts/setup.sh
installs them in CI); a server that is installed but does not start fails.
"""

import os
import resource
import shutil
import tempfile

import pytest

import integ_util
from conftest import require_loop  # tests/conftest.py


def _raise_fd_limit(wanted=8192):
    """1,000 concurrent redis connections need more fds than a default soft
    limit of 1024: raise it (as far as the hard limit allows) before any
    server starts, so the servers inherit it too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


_raise_fd_limit()

INTEGRATION_LOOPS = tuple(os.environ.get("KLOOP_INTEGRATION_LOOPS", "asyncio kloop").split())


@pytest.fixture(params=INTEGRATION_LOOPS)
def loop_name(request):
    """Overrides tests/conftest.py's: integration tests run on these loops."""
    require_loop(request.param)
    return request.param


@pytest.fixture(scope="session")
def certs():
    """A test CA and a server certificate for localhost and 127.0.0.1."""
    d = tempfile.mkdtemp(prefix="kloop-certs-")
    os.chmod(d, 0o755)
    try:
        yield integ_util.CertAuthority(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _start(factory, *args):
    try:
        return factory(*args)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server():
    server = _start(integ_util.RedisServer)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server(certs):
    server = _start(integ_util.PostgresServer, certs)
    try:
        yield server
    finally:
        server.stop()
