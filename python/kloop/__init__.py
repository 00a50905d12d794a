"""kloop: an asyncio event loop for Linux doing its I/O through io_uring.

    import kloop
    kloop.run(main())                      # like asyncio.run(main())

    asyncio.run(main(), loop_factory=kloop.new_event_loop)   # Python >= 3.12
    with asyncio.Runner(loop_factory=kloop.new_event_loop) as runner: ...

    kloop.install()                        # make it asyncio's default loop

``kloop.is_supported()`` says in advance whether io_uring can be used here;
``new_event_loop()`` raises an OSError saying why not when it cannot.
"""

import asyncio as _asyncio
import sys as _sys

from . import _ffi

__version__ = f"{_ffi.ABI_MAJOR}.{_ffi.ABI_MINOR}.{_ffi.ABI_PATCH}"

__all__ = (
    "new_event_loop", "run", "install", "is_supported",
    "IouringProactorEventLoop", "EventLoop", "IouringProactorEventLoopPolicy",
    "EventLoopPolicy", "IouringProactor", "get_stats", "__version__",
)

from .events import IouringProactorEventLoop, EventLoop  # noqa: E402
from ._proactor import IouringProactor  # noqa: E402


def new_event_loop():
    """Return a new kloop event loop.

    Raises OSError (saying why and what to do) when io_uring is not
    available, and ImportError when libkloop cannot be loaded.
    """
    return IouringProactorEventLoop()


def is_supported():
    """True when libkloop loads and this kernel lets the process use io_uring.

    Never raises.
    """
    try:
        lib, _ = _ffi.load()
        caps = _ffi.ffi.new("struct kloop_caps *")
        caps.size = _ffi.ffi.sizeof("struct kloop_caps")
        return lib.kloop_probe(caps) == 0
    except Exception:
        return False


class IouringProactorEventLoopPolicy(_asyncio.DefaultEventLoopPolicy):
    """Event loop policy whose loops are kloop loops."""

    _loop_factory = IouringProactorEventLoop


EventLoopPolicy = IouringProactorEventLoopPolicy


def install():
    """Make kloop the event loop of ``asyncio.run()``, ``asyncio.new_event_loop()``..."""
    _asyncio.set_event_loop_policy(IouringProactorEventLoopPolicy())


def run(main, *, debug=None):
    """Run coroutine ``main`` on a new kloop loop, like ``asyncio.run()``."""
    if _sys.version_info >= (3, 12):
        return _asyncio.run(main, debug=debug, loop_factory=new_event_loop)
    if _asyncio.events._get_running_loop() is not None:
        # Same message as asyncio.run().
        raise RuntimeError("asyncio.run() cannot be called from a running event loop")
    with _asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
        return runner.run(main)


def get_stats(loop):
    """The engine's counters of a kloop loop (IouringProactorEventLoop.get_stats)."""
    return loop.get_stats()
