"""kloop's public entry points: run, install, the policy, is_supported,
new_event_loop, and the error when io_uring is refused (seccomp)."""

import asyncio
import errno
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from conftest import PYTHON_DIR


@pytest.fixture
def restore_policy():
    old = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(old)
    asyncio.set_event_loop(None)


def test_io_uring_enabled_on_this_machine():
    """Precondition of the other tests: the host lets processes use io_uring."""
    with open("/proc/sys/kernel/io_uring_disabled") as f:
        assert f.read().strip() == "0"


def test_is_supported_true_here(kloop_module):
    assert kloop_module.is_supported() is True


def test_new_event_loop_is_kloop(kloop_module):
    a = kloop_module.new_event_loop()
    b = kloop_module.new_event_loop()
    try:
        assert a is not b
        assert isinstance(a, asyncio.AbstractEventLoop)
        assert type(a).__module__.startswith("kloop")
        assert not a.is_running() and not a.is_closed()
        assert a.run_until_complete(asyncio.sleep(0, "x")) == "x"
        assert b.run_until_complete(asyncio.sleep(0, "y")) == "y"
    finally:
        a.close()
        b.close()
    assert a.is_closed()


def test_run_returns_result_on_kloop_loop(kloop_module, restore_policy):
    policy_before = asyncio.get_event_loop_policy()

    async def main(x):
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.01)
        return type(loop).__module__, x * 2

    mod, val = kloop_module.run(main(21))
    assert mod.startswith("kloop") and val == 42
    assert asyncio.get_event_loop_policy() is policy_before


def test_run_propagates_exception(kloop_module):
    async def main():
        raise LookupError("from main")

    with pytest.raises(LookupError, match="from main"):
        kloop_module.run(main())


def test_run_inside_running_loop_raises(kloop_module):
    async def inner():
        return 1

    async def outer():
        coro = inner()
        try:
            with pytest.raises(RuntimeError):
                kloop_module.run(coro)
        finally:
            coro.close()

    asyncio.run(outer())


def test_install_makes_asyncio_use_kloop(kloop_module, restore_policy):
    kloop_module.install()
    assert isinstance(asyncio.get_event_loop_policy(), kloop_module.IouringProactorEventLoopPolicy)

    async def main():
        return type(asyncio.get_running_loop()).__module__

    assert asyncio.run(main()).startswith("kloop")
    loop = asyncio.new_event_loop()
    try:
        assert type(loop).__module__.startswith("kloop")
    finally:
        loop.close()


def test_policy_new_event_loop(kloop_module, restore_policy):
    policy = kloop_module.IouringProactorEventLoopPolicy()
    assert isinstance(policy, asyncio.AbstractEventLoopPolicy)
    loop = policy.new_event_loop()
    try:
        assert type(loop).__module__.startswith("kloop")
    finally:
        loop.close()
    asyncio.set_event_loop_policy(policy)
    loop = policy.new_event_loop()
    policy.set_event_loop(loop)
    try:
        assert policy.get_event_loop() is loop
    finally:
        policy.set_event_loop(None)
        loop.close()


# -- io_uring refused: a child process under a seccomp filter ---------------
#
# The child installs a classic-BPF seccomp filter (through ctypes/prctl) that
# makes io_uring_setup(2) fail with the chosen errno, proves the filter works
# by calling io_uring_setup itself, then exercises kloop.

SECCOMP_CHILD = textwrap.dedent(r"""
    import ctypes, errno, json, os, platform, struct, sys

    ERR = int(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[platform.machine()]
    NR_IO_URING_SETUP = 425  # same number on x86_64 and aarch64

    def ins(code, jt, jf, k):
        return struct.pack("HBBI", code, jt, jf, k)

    LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
    prog = b"".join([
        ins(LD_ABS, 0, 0, 4),                        # A = seccomp_data.arch
        ins(JEQ, 0, 3, arch),                        # other arch: allow
        ins(LD_ABS, 0, 0, 0),                        # A = seccomp_data.nr
        ins(JEQ, 0, 1, NR_IO_URING_SETUP),
        ins(RET, 0, 0, 0x00050000 | ERR),            # SECCOMP_RET_ERRNO | ERR
        ins(RET, 0, 0, 0x7FFF0000),                  # SECCOMP_RET_ALLOW
    ])
    buf = ctypes.create_string_buffer(prog)

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog) // 8, ctypes.addressof(buf))
    assert libc.prctl(38, 1, 0, 0, 0) == 0                      # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP
    params = ctypes.create_string_buffer(120)
    rc = libc.syscall(NR_IO_URING_SETUP, 4, params)
    out = {"raw": [rc, ctypes.get_errno()]}

    import kloop
    out["is_supported"] = kloop.is_supported()
    try:
        kloop.new_event_loop().close()
        out["new_event_loop"] = "ok"
    except BaseException as e:
        out["new_event_loop"] = [type(e).__name__, getattr(e, "errno", None), str(e)]

    async def main():
        return 1
    coro = main()
    try:
        kloop.run(coro)
        out["run"] = "ok"
    except BaseException as e:
        out["run"] = [type(e).__name__, getattr(e, "errno", None)]
    finally:
        coro.close()
    print(json.dumps(out))
""")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"),
                    reason="the seccomp filter is written for x86_64/aarch64 syscall numbers")
@pytest.mark.parametrize("err,words", [
    (errno.EPERM, ["seccomp"]),
    (errno.ENOSYS, ["io_uring"]),
])
def test_new_event_loop_error_when_io_uring_refused(kloop_module, err, words):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    r = subprocess.run([sys.executable, "-c", SECCOMP_CHILD, str(err)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["raw"] == [-1, err], "the seccomp filter did not take effect"
    assert out["is_supported"] is False
    kind, code, msg = out["new_event_loop"]
    assert kind == {errno.EPERM: "PermissionError", errno.ENOSYS: "OSError"}[err], out
    assert code == err
    for w in words:
        assert w in msg, msg
    assert "is_supported" in msg or "asyncio" in msg, "the message should say what to do"
    assert out["run"][:2] == [kind, err]


def test_seccomp_helper_is_inert_on_stock_asyncio():
    """The same filter leaves the stock loop working (it only blocks io_uring)."""
    child = SECCOMP_CHILD.split("import kloop")[0] + textwrap.dedent("""
        import asyncio
        print(json.dumps({"raw": out["raw"], "asyncio": asyncio.run(asyncio.sleep(0, 7))}))
    """)
    r = subprocess.run([sys.executable, "-c", child, str(errno.EPERM)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"raw": [-1, errno.EPERM], "asyncio": 7}
