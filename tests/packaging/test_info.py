"""`python -m kloop info`: the report, its JSON, its exit status, and the
reason it gives when io_uring is refused (a child under a seccomp filter)."""

import errno
import json
import os
import platform
import ssl
import subprocess
import sys

import pytest

from pkg_helpers import PYTHON_DIR, ROOT, kloop_cmd, run, source_env

if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)
# The seccomp child of tests/python/test_entry_points.py: a classic-BPF filter
# that makes io_uring_setup(2) fail with a chosen errno.
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import test_entry_points as _entry_points  # noqa: E402

from kloop import _ffi  # noqa: E402


def info_json(*args, env=None, cwd=None):
    r = run(kloop_cmd("info", "--json", *args), env=env or source_env(), cwd=cwd)
    try:
        return r.returncode, json.loads(r.stdout), r
    except ValueError:
        pytest.fail(f"info --json printed no JSON (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")


def test_info_succeeds_here_with_every_capability(tmp_path):
    rc, info, r = info_json(cwd=tmp_path)
    assert rc == 0, r.stdout + r.stderr
    assert info["ok"] is True
    assert info["verdict"] == "kloop can run here"
    assert info["io_uring"]["available"] is True
    assert info["io_uring"]["setup_syscall"] == "ok"
    assert info["kernel"]["release"] == os.uname().release
    assert info["python"]["version"] == platform.python_version()

    # The library: the one this process loads too, and its version.
    lib, path = _ffi.load()
    v = lib.kloop_version()
    assert info["library"] == {"path": path, "version": f"{v >> 16}.{(v >> 8) & 255}.{v & 255}",
                               "error": None}
    # The binding: the mode this process chose, for the same reason.
    assert info["binding"] == {"mode": _ffi.MODE, "module": _ffi.API_MODULE_PATH,
                               "reason": _ffi.MODE_REASON, "env": os.environ.get("KLOOP_FFI")}

    # Capabilities: what kloop_probe() says in this process, every bit named.
    caps = _ffi.ffi.new("struct kloop_caps *")
    caps.size = _ffi.ffi.sizeof("struct kloop_caps")
    assert lib.kloop_probe(caps) == 0
    kernel = sorted(n for b, n in _ffi.CAP_NAMES.items() if caps.kernel & b)
    assert info["caps"]["kernel"] == kernel
    assert set(info["caps"]["enabled"]) <= set(kernel)
    assert 0 < info["caps"]["sq_entries"] <= info["caps"]["cq_entries"]
    rows = {row["name"]: row for row in info["capabilities"]}
    assert set(rows) == set(_ffi.CAP_NAMES.values())
    for name, row in rows.items():
        assert row["kernel"] == (name in kernel)
        assert row["enabled"] == (name in info["caps"]["enabled"])
        assert row["fallback"], name
        if not row["kernel"]:
            assert row["status"].startswith("missing; instead: "), row
    # This machine's kernel (6.18) has every feature the engine probes but
    # kernel TLS (built without CONFIG_TLS; kTLS is tested in a qemu guest).
    assert kernel == sorted(set(_ffi.CAP_NAMES.values()) - {"ktls"})
    assert rows["ktls"]["status"].startswith("missing; instead: the engine does the TLS crypto")


def test_info_names_the_fallbacks_of_disabled_capabilities():
    rc, info, r = info_json("--disable", "waitid,buf_ring,single_issuer")
    assert rc == 0, r.stderr
    assert info["loop"]["disabled"] == ["buf_ring", "single_issuer", "waitid"]
    rows = {row["name"]: row for row in info["capabilities"]}
    assert rows["waitid"]["enabled"] is False
    assert rows["waitid"]["status"] == "disabled; instead: pidfd_open + poll + waitid(P_PIDFD)"
    assert rows["buf_ring"]["status"].startswith("disabled; instead: engine free list")
    # What depends on a disabled capability goes with it, and says so.
    assert rows["multishot_recv"]["status"] == "needs buf_ring; instead: one-shot receive re-armed"
    assert rows["defer_taskrun"]["status"].startswith("needs single_issuer; instead: COOP_TASKRUN")
    assert rows["reg_ring_fd"]["status"] == "needs single_issuer; instead: plain ring fd"
    assert rows["pidfd"]["status"].startswith("in use: ")   # waitid is off: pidfd takes over
    for name in ("waitid", "buf_ring", "multishot_recv", "single_issuer", "defer_taskrun"):
        assert name not in info["caps"]["enabled"]
    assert "multishot_accept" in info["caps"]["enabled"]


def test_info_rejects_unknown_capability():
    r = run(kloop_cmd("info", "--disable", "no_such_cap"), env=source_env())
    assert r.returncode == 2
    assert "unknown capability no_such_cap" in r.stderr


def test_info_ktls_and_openssl():
    rc, info, r = info_json()
    assert rc == 0
    ktls = info["ktls"]
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            ulps = f.read().split()
    except OSError:
        ulps = None
    assert ktls["available"] == (ulps is not None and "tls" in ulps)
    if not ktls["available"]:
        assert ktls["reason"]
    openssl = info["openssl"]
    assert openssl["python_ssl"]["version"] == ssl.OPENSSL_VERSION
    assert openssl["python_ssl"]["library"].startswith("libssl.so")
    # libkloop does not link OpenSSL yet: the report says so, and readelf agrees.
    lib_path = info["library"]["path"]
    dyn = subprocess.run(["readelf", "-d", lib_path], capture_output=True, text=True, check=True)
    needed = [line.split("[", 1)[1].rstrip("]") for line in dyn.stdout.splitlines()
              if "(NEEDED)" in line]
    assert needed, dyn.stdout
    from kloop import _info
    assert _info._elf_needed(lib_path) == needed
    if not any(n.startswith("libssl.") for n in needed):
        assert openssl["libkloop"] == {
            "linked": False,
            "note": "not linked with OpenSSL (TLS in the engine is a later step)"}
        assert openssl["match"] is None
    else:
        assert openssl["libkloop"]["linked"] is True
        assert openssl["match"] is not None


def test_info_text_is_the_default(tmp_path):
    r = run(kloop_cmd("info"), env=source_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for line in ("io_uring     available", "capabilities", "kTLS ", "OpenSSL      Python _ssl: ",
                 "libkloop: ", "OK: kloop can run here"):
        assert line in r.stdout, (line, r.stdout)
    # The binding line names the mode; KLOOP_FFI=abi forces ABI mode.
    mode = {"api": "binding      CFFI API mode: compiled module ",
            "abi": "binding      CFFI ABI mode (ffi.dlopen): "}
    assert mode[_ffi.MODE] in r.stdout, r.stdout
    forced = run(kloop_cmd("info"), env=source_env(KLOOP_FFI="abi"), cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert mode["abi"] + "KLOOP_FFI=abi\n" in forced.stdout, forced.stdout
    # `python -m kloop` alone is `info`.
    bare = run([sys.executable, "-m", "kloop"], env=source_env(), cwd=tmp_path)
    assert bare.returncode == 0
    assert bare.stdout.splitlines()[-1] == "OK: kloop can run here"


def test_info_fails_without_library(tmp_path):
    env = source_env(KLOOP_LIBRARY=str(tmp_path / "missing" / "libkloop.so"))
    rc, info, r = info_json(env=env)
    assert rc == 1
    assert info["ok"] is False
    assert info["library"]["path"] is None
    assert "KLOOP_LIBRARY" in info["library"]["error"]
    assert info["verdict"].startswith("kloop cannot run here: ")
    # The kernel side is still reported.
    assert info["io_uring"]["available"] is True


# A child that installs the seccomp filter, then runs `python -m kloop info`.
SECCOMP_INFO = _entry_points.SECCOMP_CHILD.split("import kloop")[0] + (
    "from kloop import _info\n"
    "sys.exit(_info.main(sys.argv[2:]))\n")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"),
                    reason="the seccomp filter is written for x86_64/aarch64 syscall numbers")
@pytest.mark.parametrize("err,name,words", [
    (errno.EPERM, "EPERM", ["seccomp", "io_uring_setup"]),
    (errno.ENOSYS, "ENOSYS", ["no io_uring"]),
])
def test_info_under_seccomp_fails_with_the_reason(err, name, words):
    r = run([sys.executable, "-c", SECCOMP_INFO, str(err), "--json"], env=source_env(),
            timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    info = json.loads(r.stdout)
    io = info["io_uring"]
    assert io["setup_syscall"] == name, "the seccomp filter did not take effect"
    assert io["available"] is False
    assert io["errno"] == name
    for w in words:
        assert w in io["reason"], io["reason"]
    assert io["seccomp"]["mode"] == 2 and io["seccomp"]["filters"] >= 1
    assert info["ok"] is False
    assert info["loop"]["created"] is False
    assert info["probe"]["result"] == name
    for w in words:
        assert w in info["verdict"], info["verdict"]

    text = run([sys.executable, "-c", SECCOMP_INFO, str(err)], env=source_env(), timeout=60)
    assert text.returncode == 1
    assert f"io_uring     NOT AVAILABLE ({name})" in text.stdout
    assert "seccomp                   filter" in text.stdout
    assert text.stdout.splitlines()[-1].startswith("FAIL: ")
