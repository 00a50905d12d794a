"""Helpers of the packaging tests (no test in here)."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON_DIR = os.path.join(ROOT, "python")
#: Debian's interpreter: pip, venv, meson-python and CFFI come from Debian.
DEBIAN_PYTHON = "/usr/bin/python3"

# Variables that would make a child find kloop somewhere else than where the
# test wants it (the source tree, a build tree, a user's site).
_LEAKS = ("PYTHONPATH", "KLOOP_LIBRARY", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
          "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")


def clean_env(**extra):
    """The environment without anything that points Python at kloop."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKS}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def source_env(**extra):
    """The environment of a child that imports kloop from the source tree.

    KLOOP_LIBRARY is kept when set (scripts/test.sh points it at build/);
    otherwise the package finds <repo>/build/libkloop/libkloop.so itself.
    """
    env = clean_env(**extra)
    env["PYTHONPATH"] = PYTHON_DIR
    if "KLOOP_LIBRARY" in os.environ and "KLOOP_LIBRARY" not in extra:
        env["KLOOP_LIBRARY"] = os.environ["KLOOP_LIBRARY"]
    return env


def run(cmd, *, timeout=120, check=False, **kw):
    """subprocess.run with text output captured; a failure shows both streams."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    r = subprocess.run([str(c) for c in cmd], timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {r.returncode}\n"
            f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")
    return r


def kloop_cmd(*args):
    """`python -m kloop ARGS` with the interpreter running the tests."""
    return [sys.executable, "-m", "kloop", *args]


# A TCP echo round trip on kloop: a Protocol server, a streams client, several
# sizes (one of them larger than a receive buffer). Prints one JSON line.
ECHO_SCRIPT = r'''
import asyncio, json, sys
import kloop
from kloop import _ffi

class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(data)

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sizes = [1, 1000, 200_000]
    for n in sizes:
        payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
        writer.write(payload)
        echoed = await reader.readexactly(len(payload))
        assert echoed == payload, n
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return {"sizes": sizes, "loop": type(loop).__module__ + "." + type(loop).__name__}

out = kloop.run(main())
out.update(kloop_file=kloop.__file__, library=_ffi.library_path, version=kloop.__version__,
           binding=_ffi.MODE, module=_ffi.API_MODULE_PATH, reason=_ffi.MODE_REASON)
print(json.dumps(out))
'''
