"""Event loops the conformance runner and the pytest suite know by name.

"asyncio" is the stock Unix selector loop (the control), "kloop" is ours,
"uvloop" is an optional second reference.  Each entry gives a factory for a
fresh loop and a policy whose new_event_loop() builds the same kind of loop,
for CPython tests that call asyncio.new_event_loop() themselves.
"""

import asyncio
import os
import sys

LOOP_NAMES = ("asyncio", "kloop", "uvloop")

_HERE = os.path.dirname(os.path.abspath(__file__))
#: /work/main/python, where the kloop package lives.
PYTHON_DIR = os.path.normpath(os.path.join(_HERE, "..", "..", "python"))


def _ensure_kloop_path():
    if PYTHON_DIR not in sys.path:
        sys.path.insert(0, PYTHON_DIR)


def import_loop_module(name):
    """Import the module behind a loop name; raise ImportError if absent."""
    if name == "asyncio":
        return asyncio
    if name == "kloop":
        _ensure_kloop_path()
        import kloop

        return kloop
    if name == "uvloop":
        import uvloop

        return uvloop
    raise ValueError(f"unknown loop {name!r}; known: {', '.join(LOOP_NAMES)}")


def availability(name):
    """Return None when the loop can be used here, else a reason string."""
    try:
        mod = import_loop_module(name)
    except Exception as exc:  # ImportError, or OSError from a missing library
        return f"import {name} failed: {type(exc).__name__}: {exc}"
    if name == "kloop":
        try:
            if not mod.is_supported():
                return "kloop.is_supported() is False on this machine"
        except Exception as exc:
            return f"kloop.is_supported() raised {type(exc).__name__}: {exc}"
    return None


def loop_factory(name):
    """A callable returning a new, not yet running loop of kind `name`."""
    mod = import_loop_module(name)
    if name == "asyncio":
        import selectors

        # What asyncio.new_event_loop() gives under the default policy on
        # Linux, spelled out so the control never depends on a policy.
        return lambda: asyncio.SelectorEventLoop(selectors.DefaultSelector())
    return mod.new_event_loop


def make_policy(name):
    """A policy whose new_event_loop() builds loops of kind `name`."""
    mod = import_loop_module(name)
    if name == "asyncio":
        return asyncio.DefaultEventLoopPolicy()
    if name == "kloop":
        return mod.IouringProactorEventLoopPolicy()
    return mod.EventLoopPolicy()
