"""Which CFFI binding kloop calls libkloop through (python/kloop/_ffi.py).

The compiled API-mode module (kloop._cffi_api, built by meson next to
libkloop) when it was built and passes its checks; ABI mode (ffi.dlopen)
when KLOOP_FFI=abi forces it, or when the module is missing, stale, sees
another libkloop version, or links another library than KLOOP_LIBRARY
names. Every fallback says why on the ``kloop`` logger (debug level) and in
``_ffi.MODE_REASON``; KLOOP_FFI=api turns it into an ImportError.

Each case runs in a child process, because the mode is chosen at import.
The whole of tests/python runs in both modes (scripts/test.sh: the python
and python-abi stages); the first two tests check that each run really
used the mode it was meant to.
"""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from conftest import PYTHON_DIR, ROOT

EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
LIBRARY = os.environ.get("KLOOP_LIBRARY") or os.path.join(ROOT, "build", "libkloop",
                                                          "libkloop.so")
MODULE = os.path.join(os.path.dirname(os.path.abspath(LIBRARY)), "_cffi_api" + EXT_SUFFIX)

# Prints what the child chose as JSON; the kloop logger's lines go to stderr.
PROBE = textwrap.dedent("""
    import asyncio, json, logging, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(name)s %(levelname)s %(message)s")
    import kloop
    from kloop import _ffi

    async def echo():
        async def serve(reader, writer):
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        writer.write(b"hello")
        data = await reader.readexactly(5)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return data.decode()

    out = {"mode": _ffi.MODE, "reason": _ffi.MODE_REASON, "module": _ffi.API_MODULE_PATH,
           "ffi": type(_ffi.ffi).__module__ + "." + type(_ffi.ffi).__name__}
    try:
        lib, out["library"] = _ffi.load()
        out["lib"] = type(lib).__name__
        out["echo"] = kloop.run(echo()) if "echo" in sys.argv else None
    except ImportError as exc:
        out["error"] = str(exc)
    out["supported"] = kloop.is_supported()
    print(json.dumps(out))
""")


def probe(echo=True, **env_changes):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    env.pop("KLOOP_FFI", None)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    r = subprocess.run([sys.executable, "-c", PROBE] + (["echo"] if echo else []),
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["log"] = [line for line in r.stderr.splitlines()
                  if line.startswith("kloop DEBUG kloop: CFFI")]
    return out


def require_module():
    """The module next to the test's library; a test fails if meson should have built it."""
    if os.path.isfile(MODULE):
        return MODULE
    headers = os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    if headers and importlib.util.find_spec("cffi") is not None:
        pytest.fail(f"{MODULE} is missing although CFFI and Python.h are here: meson "
                    "(-Dpython_api=auto) builds it; rebuild with ninja -C build")
    pytest.skip(f"no API-mode module: Python.h {'found' if headers else 'missing'}, "
                "so meson did not build it")


def same(a, b):
    return os.path.samefile(a, b)


@pytest.fixture
def libdir(tmp_path):
    """A directory with a copy of the test's libkloop (its file and its symlinks)."""
    d = tmp_path / "lib"
    d.mkdir()
    src = os.path.dirname(os.path.abspath(LIBRARY))
    for path in glob.glob(os.path.join(src, "libkloop.so*")):
        if os.path.isfile(path):
            shutil.copy2(path, d / os.path.basename(path), follow_symlinks=False)
    return d


# -- the mode of this very run --------------------------------------------------
def test_api_module_in_use_when_built():
    module = require_module()
    from kloop import _ffi
    if os.environ.get("KLOOP_FFI", "auto") in ("", "auto", "api"):
        assert _ffi.MODE == "api", _ffi.MODE_REASON  # this pytest process itself
    out = probe()
    assert out["mode"] == "api", out
    assert same(out["module"], module)
    assert out["reason"] == f"compiled module {out['module']}"
    assert out["ffi"] == "_cffi_backend.FFI" and out["lib"] == "Lib", out
    assert same(out["library"], LIBRARY)
    assert out["echo"] == "hello" and out["supported"] is True
    assert out["log"] == [f"kloop DEBUG kloop: CFFI API mode: compiled module {out['module']}"]


def test_kloop_ffi_abi_forces_abi_mode():
    from kloop import _ffi
    if os.environ.get("KLOOP_FFI") == "abi":
        assert _ffi.MODE == "abi"  # this pytest process itself
    out = probe(KLOOP_FFI="abi")
    assert (out["mode"], out["reason"], out["module"]) == ("abi", "KLOOP_FFI=abi", None), out
    assert out["ffi"] == "cffi.api.FFI" and out["lib"].startswith("FFILibrary"), out
    assert same(out["library"], LIBRARY)
    assert out["echo"] == "hello" and out["supported"] is True
    assert out["log"] == ["kloop DEBUG kloop: CFFI ABI mode: KLOOP_FFI=abi"]


def test_kloop_ffi_api_forces_api_mode():
    require_module()
    out = probe(KLOOP_FFI="api")
    assert out["mode"] == "api" and out["echo"] == "hello", out


def test_unknown_kloop_ffi_value_is_importerror():
    out = probe(KLOOP_FFI="fast")
    assert "KLOOP_FFI='fast': use abi, api or auto" in out["error"], out
    assert out["supported"] is False


# -- fallbacks --------------------------------------------------------------------
def test_missing_module_falls_back_to_abi(libdir):
    lib = str(libdir / "libkloop.so")
    out = probe(KLOOP_LIBRARY=lib)
    assert (out["mode"], out["module"], out["library"]) == ("abi", None, lib), out
    assert out["reason"] == f"no compiled module _cffi_api in {libdir}"
    assert out["log"] == [f"kloop DEBUG kloop: CFFI ABI mode: {out['reason']}"]
    assert out["echo"] == "hello"
    # Forcing API mode: the same reason, as an ImportError when the library is needed.
    forced = probe(KLOOP_LIBRARY=lib, KLOOP_FFI="api")
    assert forced["error"] == f"kloop: KLOOP_FFI=api but {out['reason']}", forced
    assert forced["supported"] is False


def test_module_copied_with_its_library_is_used(libdir):
    """RPATH $ORIGIN: the module loads the library of its own directory."""
    shutil.copy2(require_module(), libdir)
    lib = str(libdir / "libkloop.so")
    out = probe(KLOOP_LIBRARY=lib)
    assert (out["mode"], out["library"]) == ("api", lib), out
    assert same(out["module"], libdir / os.path.basename(MODULE))
    assert out["echo"] == "hello"


def test_kloop_library_naming_another_file_means_abi(libdir):
    """The module's directory holds libkloop, but KLOOP_LIBRARY names another copy."""
    shutil.copy2(require_module(), libdir)
    other = libdir / "libkloop-other.so"
    shutil.copy2(os.path.realpath(LIBRARY), other)
    out = probe(KLOOP_LIBRARY=str(other))
    assert (out["mode"], out["library"]) == ("abi", str(other)), out
    assert out["reason"].startswith(f"KLOOP_LIBRARY={other} is not "), out
    assert out["log"] == [f"kloop DEBUG kloop: CFFI ABI mode: {out['reason']}"]
    assert out["echo"] == "hello"


def test_module_without_its_library_falls_back(tmp_path):
    d = tmp_path / "alone"
    d.mkdir()
    shutil.copy2(require_module(), d)
    out = probe(echo=False, KLOOP_LIBRARY=str(d / "libkloop.so"))
    assert out["mode"] == "abi", out
    assert out["reason"].startswith(f"{d / os.path.basename(MODULE)} does not import: "), out
    assert "KLOOP_LIBRARY" in out["error"]  # ABI mode does not find it either


def test_stale_module_falls_back(libdir, tmp_path):
    """A module generated from another CDEF (an old build) is not used."""
    require_module()
    with open(os.path.join(PYTHON_DIR, "kloop", "_ffi.py")) as f:
        source = f.read()
    changed = tmp_path / "_ffi.py"
    changed.write_text(source.replace('CDEF = """\n', 'CDEF = """\n/* an older CDEF */\n', 1))
    c_file = tmp_path / "_cffi_api.c"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "cffi_api.py"), changed,
                    c_file], check=True, capture_output=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-O0", "-w", "-I", os.path.join(ROOT, "include"),
                    "-I", sysconfig.get_paths()["include"], str(c_file),
                    "-o", str(libdir / os.path.basename(MODULE)), "-L", str(libdir), "-lkloop",
                    "-Wl,-rpath,$ORIGIN", "-Wl,--disable-new-dtags"], check=True)
    lib = str(libdir / "libkloop.so")
    out = probe(KLOOP_LIBRARY=lib)
    assert (out["mode"], out["library"]) == ("abi", lib), out
    assert "was generated from another CDEF than" in out["reason"], out
    assert out["log"] == [f"kloop DEBUG kloop: CFFI ABI mode: {out['reason']}"]
    assert out["echo"] == "hello"


def test_library_of_another_version_falls_back(tmp_path):
    """The module reports another kloop_version() than it was compiled for (here an
    LD_PRELOADed kloop_version, which ABI mode's dlsym on its own handle does not see)."""
    module = require_module()
    src = tmp_path / "version.c"
    src.write_text("#include <stdint.h>\n"
                   "uint32_t kloop_version(void) { return 0x000900; }\n")
    so = tmp_path / "libversion.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(so)], check=True)
    out = probe(LD_PRELOAD=str(so))
    assert out["mode"] == "abi", out
    assert out["reason"].startswith(f"{module} was compiled for libkloop "), out
    assert out["reason"].endswith(" is 0.9.0"), out
    assert out["log"] == [f"kloop DEBUG kloop: CFFI ABI mode: {out['reason']}"]
    assert same(out["library"], LIBRARY) and out["echo"] == "hello"


# -- the GIL around calls into libkloop -----------------------------------------
def _wrapper_body(source, name):
    start = source.index(f"\n_cffi_f_{name}(PyObject *self, ")
    return source[start:source.index("\n}\n", start)]


def test_generated_wrappers_release_the_gil_only_where_a_call_can_wait(tmp_path):
    """scripts/cffi_api.py keeps the GIL around calls that return at once and
    releases it around those that wait (kloop_poll) or may take long, and
    around kloop_stream_write() from 64 KiB on."""
    c_file = tmp_path / "_cffi_api.c"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "cffi_api.py"),
                    os.path.join(PYTHON_DIR, "kloop", "_ffi.py"), c_file], check=True)
    source = c_file.read_text()
    released = ("kloop_poll", "kloop_wake", "kloop_create", "kloop_destroy", "kloop_probe",
                "kloop_cancel_now", "kloop_stream_start_tls")
    for name in released:
        body = _wrapper_body(source, name)
        assert "Py_BEGIN_ALLOW_THREADS" in body and "Py_END_ALLOW_THREADS" in body, name
    for name in ("kloop_stream_write_ref", "kloop_stream_resume", "kloop_stream_pause",
                 "kloop_submit_recv", "kloop_cancel", "kloop_get_stats"):
        body = _wrapper_body(source, name)
        assert "ALLOW_THREADS" not in body and "PyEval_SaveThread" not in body, name
        assert f"{name}(x0" in body, name   # the call itself is still there
    body = _wrapper_body(source, "kloop_stream_write")
    assert "ALLOW_THREADS" not in body
    assert "PyThreadState *_save = (x3 >= 65536) ? PyEval_SaveThread() : NULL;" in body
    assert "if (_save) PyEval_RestoreThread(_save); }" in body
    assert source.count("Py_BEGIN_ALLOW_THREADS") == len(released)


def test_other_threads_run_while_the_loop_waits_in_poll():
    """kloop_poll() is called with the GIL released (in both CFFI modes): while
    a loop sleeps in it for 0.4 s, this thread keeps running Python code."""
    import asyncio
    import threading
    import time

    import kloop
    inside = threading.Event()

    def run():
        loop = kloop.new_event_loop()
        try:
            loop.call_soon(inside.set)
            loop.run_until_complete(asyncio.sleep(0.4))
        finally:
            loop.close()

    th = threading.Thread(target=run)
    th.start()
    assert inside.wait(10)
    gaps, last = [], time.monotonic()
    while th.is_alive():
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    th.join()
    assert len(gaps) > 100 and max(gaps) < 0.2, (len(gaps), max(gaps))
