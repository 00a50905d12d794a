"""Shared pytest fixtures for kloop's Python tests.

Every behaviour test runs against several event loops ("asyncio" = the stock
selector loop, the reference; "kloop"; "uvloop" where cheap) through the
``loop`` fixture, which gives a :class:`LoopHarness`.  No pytest-asyncio.

Rules the harness enforces for every test:
  * a call to the loop's exception handler that the test did not ask for
    (``harness.expect_errors()``) fails the test;
  * the loop is closed cleanly (async generators, default executor) and a
    garbage collection runs before the test ends, so that ResourceWarnings
    (unclosed sockets, transports) are raised in the test that leaked them
    (pytest.ini turns warnings into errors);
  * a test that hangs is stopped by faulthandler after its time limit with a
    stack dump of every thread (the process exits: better than a CI hang).

kloop is taken from <repo>/python.  If the package does not exist yet, kloop
cases are skipped with that reason; if it exists but cannot be imported or
says it is unsupported, kloop cases fail (they must not go quiet).
"""

import asyncio
import faulthandler
import gc
import os
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_DIR = os.path.join(ROOT, "python")
CONFORMANCE_DIR = os.path.join(ROOT, "tests", "conformance")
for _p in (PYTHON_DIR, CONFORMANCE_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import loops  # noqa: E402  (tests/conformance/loops.py)

#: Loops every behaviour test runs on, in this order.
ALL_LOOPS = ("asyncio", "kloop", "uvloop")
#: Seconds a single test may take before faulthandler ends the process.
TEST_HARD_LIMIT = float(os.environ.get("KLOOP_TEST_HARD_LIMIT", "300"))

_KLOOP_PACKAGE = os.path.join(PYTHON_DIR, "kloop", "__init__.py")


def loop_unavailable(name):
    """(skip_reason or None, fail_reason or None) for loop `name`."""
    if name == "kloop" and not os.path.exists(_KLOOP_PACKAGE):
        return f"kloop package not written yet ({_KLOOP_PACKAGE} missing)", None
    reason = loops.availability(name)
    if reason is None:
        return None, None
    if name == "uvloop":
        return f"uvloop unavailable: {reason}", None
    return None, reason


def require_loop(name):
    skip, fail = loop_unavailable(name)
    if skip:
        pytest.skip(skip)
    if fail:
        pytest.fail(f"{name} cannot be used: {fail}", pytrace=False)


class LoopHarness:
    """A fresh loop of one kind plus the checks every test wants."""

    def __init__(self, name, request=None):
        self.name = name
        self._request = request
        self.loop = loops.loop_factory(name)()
        self.errors = []
        self._expect_errors = False
        self.loop.set_exception_handler(self._handler)

    # -- exception handler -------------------------------------------------
    def _handler(self, loop, context):
        self.errors.append(context)

    def expect_errors(self):
        """The test will look at ``self.errors`` itself."""
        self._expect_errors = True
        return self.errors

    # -- running -----------------------------------------------------------
    def run(self, coro, timeout=60.0):
        """Run `coro` to completion on this loop, failing after `timeout` s."""
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def is_(self, *names):
        return self.name in names

    def known_failure(self, names, reason):
        """Mark this case as a known failure of the loops in `names`.

        The test still runs and must fail (strict xfail): the reason has to
        say what fails and how that was seen.
        """
        if isinstance(names, str):
            names = (names,)
        if self.name in names:
            assert self._request is not None
            self._request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))

    def close(self):
        loop = self.loop
        if not loop.is_closed():
            try:
                # Let transports finish their close callbacks.
                loop.run_until_complete(asyncio.sleep(0))
                loop.run_until_complete(asyncio.sleep(0))
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                if hasattr(loop, "shutdown_default_executor"):
                    loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
        asyncio.set_event_loop(None)


def _hang_fire(config, nodeid):
    # Runs in a watchdog thread: put the real stderr back (pytest captures
    # fd 2 during a test), dump every thread's stack, end the process.
    capman = config.pluginmanager.getplugin("capturemanager")
    try:
        if capman is not None:
            capman.suspend_global_capture(in_=True)
    except Exception:
        pass
    sys.stderr.write(
        f"\n*** {nodeid} still running after {TEST_HARD_LIMIT:.0f} s "
        "(KLOOP_TEST_HARD_LIMIT): stacks of all threads, then exit 70\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(70)


@pytest.fixture(autouse=True)
def _hang_guard(request):
    timer = threading.Timer(TEST_HARD_LIMIT, _hang_fire, (request.config, request.node.nodeid))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


@pytest.fixture(params=ALL_LOOPS)
def loop_name(request):
    require_loop(request.param)
    return request.param


_WARMED = set()


def open_fds():
    """{fd: target} of this process's open file descriptors."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd of the listdir itself, gone by now
            pass
    return out


@pytest.fixture
def loop(loop_name, request):
    """A LoopHarness on a new loop of each kind (see ALL_LOOPS).

    After the test, the loop is closed and every fd the test opened (ring,
    sockets, pipes) must be closed again.
    """
    if loop_name not in _WARMED:
        # libuv opens a process-wide pipe pair with the first loop (uvloop)
        # and keeps it; make such one-time state exist before counting fds.
        loops.loop_factory(loop_name)().close()
        _WARMED.add(loop_name)
    gc.collect()
    fds_before = open_fds()
    h = LoopHarness(loop_name, request)
    asyncio.set_event_loop(None)
    try:
        yield h
    finally:
        h.close()
        gc.collect()
    leaked = {fd: t for fd, t in open_fds().items() if fds_before.get(fd) != t}
    if leaked:
        pytest.fail(f"{loop_name}: fds left open after the loop was closed: {leaked}",
                    pytrace=False)
    if h.errors and not h._expect_errors:
        lines = [f"{len(h.errors)} unexpected call(s) to the exception handler on {loop_name}:"]
        for ctx in h.errors:
            lines.append(f"  {ctx.get('message')!r}: {ctx.get('exception')!r}")
        pytest.fail("\n".join(lines), pytrace=False)


def harness_for(name):
    """A LoopHarness for `name` outside the fixture (caller closes it)."""
    require_loop(name)
    return LoopHarness(name)


@pytest.fixture
def kloop_module():
    """The imported kloop package (fails the test if it cannot be used)."""
    require_loop("kloop")
    return loops.import_loop_module("kloop")


# -- summary lines ---------------------------------------------------------

_SUMMARY = []


def add_summary_line(text):
    """Lines printed at the end of the pytest run (e.g. conformance counts)."""
    _SUMMARY.append(text)


def pytest_terminal_summary(terminalreporter):
    if _SUMMARY:
        terminalreporter.section("kloop summary")
        for line in _SUMMARY:
            terminalreporter.write_line(line)
