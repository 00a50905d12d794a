"""CPython 3.11's loop-generic test_asyncio classes, bound to a loop by name.

Each suite is one unittest.TestCase class built from the mixins CPython uses
for its own SelectEventLoopTests and friends, with the loop factory replaced.
Suites whose tests call asyncio.new_event_loop() (or the policy) themselves
get the loop through the event loop policy, which run_class.py installs
before the class runs (see POLICY_SUITES).

The tests come from Debian's libpython3.11-testsuite (test.test_asyncio);
nothing of them is copied here.
"""

import unittest

from test.test_asyncio import test_buffered_proto
from test.test_asyncio import test_events
from test.test_asyncio import test_sendfile
from test.test_asyncio import test_server
from test.test_asyncio import test_sock_lowlevel
from test.test_asyncio import test_ssl
from test.test_asyncio import test_sslproto
from test.test_asyncio import test_streams
from test.test_asyncio import test_subprocess
from test.test_asyncio import utils as test_utils

#: Suites that take their loop from the installed event loop policy.
POLICY_SUITES = frozenset(
    {
        "ssl",
        "streams",
        "subprocess_threaded",
        "subprocess_safe",
        "subprocess_fast",
        "subprocess_pidfd",
    }
)


def _pidfd_supported():
    return bool(test_subprocess.has_pidfd_support())


def build(factory):
    """Return {suite name: TestCase class} with loops made by `factory`."""

    class Events(
        test_events.UnixEventLoopTestsMixin,
        test_events.SubprocessTestsMixin,
        test_utils.TestCase,
    ):
        def create_event_loop(self):
            return factory()

    class SockLowlevel(test_sock_lowlevel.BaseSockTestsMixin, test_utils.TestCase):
        def create_event_loop(self):
            return factory()

    class Sendfile(test_sendfile.SendfileTestsBase, test_utils.TestCase):
        def create_event_loop(self):
            return factory()

    # SelectorStartServerTests adds test_start_unix_server_1 to the
    # loop-generic BaseStartServer; both only use new_loop().
    class Server(test_server.SelectorStartServerTests):
        def new_loop(self):
            return factory()

    class BufferedProto(test_buffered_proto.BaseTestBufferedProtocol, unittest.TestCase):
        def new_loop(self):
            return factory()

    class StartTLS(test_sslproto.BaseStartTLS, unittest.TestCase):
        def new_loop(self):
            return factory()

    # These build their loop with asyncio.new_event_loop() / the policy.
    class SSL(test_ssl.TestSSL):
        pass

    class Streams(test_streams.StreamTests):
        pass

    class SubprocessThreaded(test_subprocess.SubprocessThreadedWatcherTests):
        pass

    class SubprocessSafe(test_subprocess.SubprocessSafeWatcherTests):
        pass

    class SubprocessFast(test_subprocess.SubprocessFastWatcherTests):
        pass

    suites = {
        "events": Events,
        "sock_lowlevel": SockLowlevel,
        "sendfile": Sendfile,
        "server": Server,
        "buffered_proto": BufferedProto,
        "sslproto": StartTLS,
        "ssl": SSL,
        "streams": Streams,
        "subprocess_threaded": SubprocessThreaded,
        "subprocess_safe": SubprocessSafe,
        "subprocess_fast": SubprocessFast,
    }
    if _pidfd_supported():

        class SubprocessPidfd(test_subprocess.SubprocessPidfdWatcherTests):
            pass

        suites["subprocess_pidfd"] = SubprocessPidfd

    for name, cls in suites.items():
        cls.__name__ = cls.__qualname__ = "Conformance_" + name
    return suites


#: Every suite name, in the order the runner schedules them (longest first
#: helps two workers finish together).
SUITE_NAMES = (
    "events",
    "ssl",
    "sslproto",
    "subprocess_threaded",
    "subprocess_safe",
    "subprocess_fast",
    "subprocess_pidfd",
    "sendfile",
    "sock_lowlevel",
    "streams",
    "server",
    "buffered_proto",
)

assert set(SUITE_NAMES) >= set(POLICY_SUITES)
