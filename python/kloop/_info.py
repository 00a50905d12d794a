"""``python -m kloop info``: can kloop run here, and if not, why not.

Reports the kernel, whether this process may use io_uring (and which of
ENOSYS, ``kernel.io_uring_disabled``, a seccomp filter or RLIMIT_MEMLOCK
stands in the way), every capability the engine probes with the fallback it
takes where one is missing, kTLS (the kernel's TLS ULP), the OpenSSL that
Python's ``_ssl`` and libkloop use, which libkloop was loaded and how it is
called (CFFI API mode through the compiled module, or ABI mode).

Plain text by default, ``--json`` for tools. Exit status 0 when a kloop
loop can be created here, 1 when it cannot (the reason is in the output).
"""

import argparse
import ctypes
import errno
import gzip
import json
import os
import platform
import re
import resource
import struct
import sys

__all__ = ("gather", "render_text", "main")

# What each KLOOP_CAP_* bit is for and what the engine does without it
# (docs/design.md, "Kernel feature ladder"; include/kloop.h for the kernels).
# name -> (kernel that brought it, used for, without it)
CAPABILITIES = {
    "single_issuer": ("6.0", "cheaper completion handling (IORING_SETUP_SINGLE_ISSUER)",
                      "COOP_TASKRUN + TASKRUN_FLAG ring"),
    "defer_taskrun": ("6.1",
                      "completions run only when the loop polls (IORING_SETUP_DEFER_TASKRUN)",
                      "COOP_TASKRUN + TASKRUN_FLAG ring"),
    "multishot_accept": ("5.19", "servers: one accept request for many connections",
                         "accept re-armed after each connection"),
    "multishot_recv": ("6.0", "stream reads: one receive request for many messages",
                       "one-shot receive re-armed"),
    "multishot_poll": ("5.13", "KLOOP_POLL_EDGE polls", "one-shot poll re-armed"),
    "buf_ring": ("5.19", "receive buffers provided to the kernel in a ring",
                 "engine free list, plain receive into it"),
    "recv_bundle": ("6.10", "several buffers per receive", None),
    "buf_ring_inc": ("6.12", "incrementally consumed receive buffers", None),
    "waitid": ("6.7", "child exit (IORING_OP_WAITID)", "pidfd_open + poll + waitid(P_PIDFD)"),
    "send_zc": ("6.0", "zero-copy send", None),
    "ext_arg": ("5.11", "timed wait in one io_uring_enter", "liburing's timeout SQE"),
    "nodrop": ("5.5", "the kernel keeps completions when the CQ ring overflows",
               "none: completions can be lost on CQ overflow (stats: cq_overflows)"),
    "reg_ring_fd": ("5.18", "cheaper io_uring_enter (registered ring fd)", "plain ring fd"),
    "socket_op": ("5.19", "IORING_OP_SOCKET", None),
    "splice": ("5.7", "kloop_submit_splice (C ABI; the Python loop's sendfile uses sendfile(2))",
               "kloop_submit_splice completes with the kernel's error"),
    "bind_listen": ("6.11", "IORING_OP_BIND/LISTEN", None),
    "pidfd": ("5.3", "child exit where waitid is missing (pidfd_open)",
              "with neither waitid nor pidfd, child exit (subprocesses) fails with ENOSYS"),
    "ktls": ("4.13", "engine TLS: the kernel encrypts (and, TLS 1.2, decrypts) after the "
                     "handshake (TCP ULP tls)",
             "the engine does the TLS crypto in user space (OpenSSL)"),
}

# A loop drops a capability whose prerequisite it lacks (include/kloop.h).
DEPENDS = {"defer_taskrun": "single_issuer", "reg_ring_fd": "single_issuer",
           "multishot_recv": "buf_ring", "recv_bundle": "buf_ring", "buf_ring_inc": "buf_ring"}

# Probed and reported, but no code path of the engine uses them yet.
NOT_USED_YET = {"recv_bundle", "buf_ring_inc", "send_zc", "socket_op", "bind_listen"}

# IORING_FEAT_* bits of io_uring_params.features, by bit number.
FEATURES = (
    "single_mmap", "nodrop", "submit_stable", "rw_cur_pos", "cur_personality", "fast_poll",
    "poll_32bits", "sqpoll_nonfixed", "ext_arg", "native_workers", "rsrc_tags", "cqe_skip",
    "linked_file", "reg_reg_ring", "recvsend_bundle", "min_timeout", "rw_attr", "no_iowait",
)

NR_IO_URING_SETUP = 425  # the same on every architecture that has io_uring
MEMLOCK_UNTIL = (5, 12)  # rings counted against RLIMIT_MEMLOCK before this kernel
LIBKLOOP_NO_OPENSSL = "not linked with OpenSSL (no TLS in the engine)"


# -- small readers -----------------------------------------------------------

def _read(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return None
    return data.decode(errors="replace")


def _read_int(path):
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _kernel_tuple(release):
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _errno_name(code):
    return errno.errorcode.get(code, str(code))


def _elf_needed(path):
    """DT_NEEDED entries of an ELF64 little-endian shared object, or None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            return None
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                    for i in range(shnum)]
        for sec in sections:
            if sec[1] != 6:  # SHT_DYNAMIC
                continue
            strtab = sections[sec[6]]  # sh_link: its string table
            names = []
            for off in range(sec[4], sec[4] + sec[5], 16):
                tag, val = struct.unpack_from("<qQ", data, off)
                if tag == 0:
                    break
                if tag == 1:  # DT_NEEDED
                    start = strtab[4] + val
                    names.append(data[start:data.index(b"\0", start)].decode())
            return names
        return []
    except (OSError, struct.error, IndexError, ValueError):
        return None


def _mapped_path(soname):
    """Path of the loaded file whose name starts with `soname` (from /proc/self/maps)."""
    maps = _read("/proc/self/maps") or ""
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and os.path.basename(parts[5]).startswith(soname):
            return parts[5]
    return None


# -- the sections ------------------------------------------------------------

def _kernel():
    u = os.uname()
    return {"release": u.release, "version": u.version, "machine": u.machine}


def _setup_syscall():
    """io_uring_setup(2) made directly, so that the answer does not depend on libkloop."""
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)  # struct io_uring_params
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(NR_IO_URING_SETUP), ctypes.c_long(1), params)
    if fd >= 0:
        os.close(fd)
        return 0
    return ctypes.get_errno()


def _seccomp():
    status = _read("/proc/self/status") or ""
    out = {"mode": None, "filters": None}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "Seccomp":
            out["mode"] = int(value)
        elif key == "Seccomp_filters":
            out["filters"] = int(value)
    return out


def _io_uring(kernel):
    out = {"available": None, "errno": None, "reason": None}
    code = _setup_syscall()
    out["setup_syscall"] = "ok" if code == 0 else _errno_name(code)
    out["io_uring_disabled"] = _read_int("/proc/sys/kernel/io_uring_disabled")
    group = _read_int("/proc/sys/kernel/io_uring_group")
    if group is not None and group >= 0:
        try:
            import grp
            name = grp.getgrgid(group).gr_name
        except (ImportError, KeyError):
            name = None
        out["io_uring_group"] = {"gid": group, "name": name,
                                 "member": group in os.getgroups() or os.getegid() == group}
    else:
        out["io_uring_group"] = None
    out["seccomp"] = _seccomp()
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    out["memlock"] = {
        "soft": None if soft == resource.RLIM_INFINITY else soft,
        "hard": None if hard == resource.RLIM_INFINITY else hard,
        "matters": _kernel_tuple(kernel["release"]) < MEMLOCK_UNTIL,
    }
    if code == 0:
        out["available"] = True
    else:
        out["available"] = False
        out["errno"] = _errno_name(code)
        out["reason"] = _why(code, out)
    return out


def _why(code, state):
    """The reason io_uring_setup failed with `code`, in the words new_event_loop uses."""
    from ._proactor import unsupported_error
    text = str(unsupported_error(-code).strerror)
    seccomp = state["seccomp"]
    if code == errno.EPERM and (state["io_uring_disabled"] or 0) == 0 and seccomp["mode"] == 2:
        text += f" (this process runs under {seccomp['filters']} seccomp filter(s): Seccomp: 2)"
    return text


def _library():
    from . import _ffi
    try:
        lib, path = _ffi.load()
    except ImportError as exc:
        return None, {"path": None, "version": None, "error": str(exc)}
    v = lib.kloop_version()
    return lib, {"path": path, "version": f"{v >> 16}.{(v >> 8) & 0xff}.{v & 0xff}",
                 "error": None}


def _binding():
    """Which CFFI mode calls libkloop (python/kloop/_ffi.py) and why."""
    from . import _ffi
    return {"mode": _ffi.MODE, "module": _ffi.API_MODULE_PATH, "reason": _ffi.MODE_REASON,
            "env": os.environ.get(_ffi.MODE_ENV)}


def _probe(lib):
    """kloop_probe(): (rc, caps struct)."""
    from . import _ffi
    caps = _ffi.ffi.new("struct kloop_caps *")
    caps.size = _ffi.ffi.sizeof("struct kloop_caps")
    return lib.kloop_probe(caps), caps


def _loop(disable=0):
    """Create and close a kloop event loop: (caps dict or None, error or None).

    `disable`: KLOOP_CAP_* bits to treat as absent (kloop_config.disable).
    """
    import kloop
    try:
        if disable:
            proactor = kloop.IouringProactor(config={"disable": disable})
            loop = kloop.IouringProactorEventLoop(proactor)
        else:
            loop = kloop.new_event_loop()
    except OSError as exc:
        return None, str(exc)
    try:
        return loop._proactor.caps(), None
    finally:
        loop.close()


def _capabilities(kernel_bits, enabled, disable=()):
    from . import _ffi
    rows = []
    for bit, name in sorted(_ffi.CAP_NAMES.items()):
        since, used_for, fallback = CAPABILITIES.get(name, ("?", "?", "?"))
        has = bool(kernel_bits & bit) if kernel_bits is not None else None
        on = (name in enabled) if enabled is not None else None
        if name in NOT_USED_YET:
            fallback = "nothing: not used yet"
        if has is None:
            status = "unknown: the probe failed"
        elif not has:
            status = "missing; instead: " + fallback
        elif on is False:
            if name in disable:
                why = "disabled"
            elif DEPENDS.get(name) and DEPENDS[name] not in enabled:
                why = "needs " + DEPENDS[name]
            else:
                why = "off in this loop"
            status = f"{why}; instead: {fallback}"
        elif name in NOT_USED_YET:
            status = "available; probed, not used yet"
        elif name == "pidfd" and "waitid" in (enabled or ()):
            status = "available; used only where waitid is missing"
        elif name == "splice":
            status = "available: " + used_for
        else:
            status = "in use: " + used_for
        rows.append({"name": name, "bit": bit, "kernel": has, "enabled": on, "since": since,
                     "used_for": used_for, "fallback": fallback, "status": status})
    return rows


def _ktls(kernel):
    release = kernel["release"]
    ulp = _read("/proc/sys/net/ipv4/tcp_available_ulp")
    out = {"available": False, "tcp_available_ulp": ulp.strip() if ulp is not None else None,
           "config_tls": None, "module": None, "reason": None}
    config = _read("/proc/config.gz") or _read(f"/boot/config-{release}")
    if config is not None:
        m = re.search(r"^CONFIG_TLS=(\w+)", config, re.M)
        out["config_tls"] = m.group(1) if m else "not set"
    modules = _read("/proc/modules")
    if modules is not None and re.search(r"^tls ", modules, re.M):
        out["module"] = "loaded"
    else:
        dep = _read(f"/lib/modules/{release}/modules.dep") or ""
        if re.search(r"(^|/)tls\.ko(\.\w+)?:", dep, re.M):
            out["module"] = "present, not loaded"
    if ulp is not None and "tls" in ulp.split():
        out["available"] = True
    elif out["module"] == "present, not loaded":
        out["reason"] = ("the tls module exists but is not loaded: `modprobe tls` (as root) "
                         "registers the TLS ULP")
    elif out["config_tls"] == "not set":
        out["reason"] = "the kernel has no TLS ULP: it was built without CONFIG_TLS"
    elif ulp is None:
        out["reason"] = "/proc/sys/net/ipv4/tcp_available_ulp is missing (no TCP ULP support)"
    else:
        out["reason"] = (f"the kernel's TCP ULPs are {ulp.strip()!r}, without tls, and no tls "
                         f"module was found for {release}")
    return out


def _openssl(library_path):
    try:
        import ssl
        import _ssl
    except ImportError:  # a Python built without ssl
        python = {"version": None, "number": None, "library": None, "path": None}
    else:
        py_needed = _elf_needed(getattr(_ssl, "__file__", "") or "") or []
        py_soname = next((n for n in py_needed if n.startswith("libssl.")), None)
        python = {"version": ssl.OPENSSL_VERSION,
                  "number": f"0x{ssl.OPENSSL_VERSION_NUMBER:x}",
                  "library": py_soname,
                  "path": _mapped_path(py_soname) if py_soname else None}
    out = {"python_ssl": python, "libkloop": None, "match": None}
    if library_path is None:
        out["libkloop"] = {"linked": None, "note": "libkloop not loaded"}
        return out
    needed = _elf_needed(library_path)
    soname = next((n for n in needed or () if n.startswith("libssl.")), None)
    if needed is None:
        out["libkloop"] = {"linked": None, "note": "could not read the library's ELF header"}
    elif soname is None:
        out["libkloop"] = {"linked": False, "note": LIBKLOOP_NO_OPENSSL}
    else:
        path = _mapped_path(soname)
        out["libkloop"] = {"linked": True, "library": soname, "path": path, "note": None}
        out["match"] = (soname == python["library"]
                        and (path is None or path == python["path"]))
    return out


def _tls(lib):
    """Engine TLS: can libkloop drive Python's SSL objects here, and which
    path new TLS connections take (python/kloop/_tls.py)."""
    from . import _tls as tls
    out = {"mode": "sslproto" if tls.forced_sslproto() else "auto",
           "engine": None, "layout": None}
    if lib is None:
        out["engine"] = {"available": False, "reason": "libkloop not loaded",
                         "libkloop": None, "python": None}
        return out
    out["engine"] = tls.engine_info(lib)
    try:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost")
        ptr = tls.ssl_pointer(obj, False)
        out["layout"] = "ok" if isinstance(ptr, int) else ptr
    except ImportError:
        out["layout"] = "no ssl module"
    return out


def gather(disable=()):
    """Everything ``python -m kloop info`` reports, as a dict (the --json document).

    `disable`: capability names the test loop treats as absent, to show the
    fallbacks an older kernel gets.
    """
    import kloop
    kernel = _kernel()
    info = {
        "ok": False,
        "verdict": None,
        "kloop": {"version": kloop.__version__, "package": os.path.dirname(kloop.__file__)},
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "implementation": platform.python_implementation()},
        "kernel": kernel,
        "library": None,
        "binding": _binding(),
        "io_uring": _io_uring(kernel),
        "probe": None,
        "loop": None,
        "caps": None,
        "capabilities": None,
        "ktls": _ktls(kernel),
        "openssl": None,
        "tls": None,
    }
    lib, info["library"] = _library()
    info["openssl"] = _openssl(info["library"]["path"])
    info["tls"] = _tls(lib)
    kernel_bits = None
    if lib is not None:
        rc, caps = _probe(lib)
        info["probe"] = {"result": "ok" if rc == 0 else _errno_name(-rc)}
        if rc == 0:
            kernel_bits = caps.kernel
            info["probe"]["features"] = caps.features
        from . import _ffi
        bits = {n: b for b, n in _ffi.CAP_NAMES.items()}
        loop_caps, error = _loop(sum(bits[n] for n in disable))
        info["loop"] = {"created": loop_caps is not None, "error": error,
                        "disabled": sorted(disable)}
        if loop_caps is not None:
            info["caps"] = dict(loop_caps)
            info["caps"]["feature_names"] = [n for i, n in enumerate(FEATURES)
                                             if loop_caps["features"] & (1 << i)]
        enabled = loop_caps["enabled"] if loop_caps is not None else None
        info["capabilities"] = _capabilities(kernel_bits, enabled, disable)
    if info["library"]["error"]:
        info["verdict"] = "kloop cannot run here: " + info["library"]["error"]
    elif info["loop"]["error"]:
        info["verdict"] = info["loop"]["error"]
    else:
        info["ok"] = True
        info["verdict"] = "kloop can run here"
    return info


# -- text --------------------------------------------------------------------

def _size(n):
    if n is None:
        return "unlimited"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)


def render_text(info):
    lines = []
    add = lines.append
    k, py = info["kloop"], info["python"]
    add(f"kloop {k['version']} ({k['package']})")
    add(f"python       {py['implementation']} {py['version']} ({py['executable']})")
    kern = info["kernel"]
    add(f"kernel       Linux {kern['release']} {kern['machine']}")
    lib = info["library"]
    if lib["error"]:
        add(f"library      NOT LOADED: {lib['error']}")
    else:
        add(f"library      {lib['path']} (libkloop {lib['version']})")
    b = info["binding"]
    if b["mode"] == "api":
        add(f"binding      CFFI API mode: compiled module {b['module']}")
    else:
        add(f"binding      CFFI ABI mode (ffi.dlopen): {b['reason']}")

    io = info["io_uring"]
    add("io_uring     " + ("available" if io["available"] else
                           f"NOT AVAILABLE ({io['errno']}): {io['reason']}"))
    dis = io["io_uring_disabled"]
    add(f"  kernel.io_uring_disabled  {'absent (kernel < 6.6)' if dis is None else dis}")
    if io["io_uring_group"]:
        g = io["io_uring_group"]
        add(f"  kernel.io_uring_group     {g['gid']} ({g['name'] or '?'}), "
            f"{'this process is a member' if g['member'] else 'this process is not a member'}")
    sc = io["seccomp"]
    mode = {0: "none", 1: "strict", 2: "filter"}.get(sc["mode"], "unknown")
    add(f"  seccomp                   {mode}"
        + (f" ({sc['filters']} filter(s))" if sc["mode"] == 2 else ""))
    ml = io["memlock"]
    add(f"  RLIMIT_MEMLOCK            {_size(ml['soft'])} (hard {_size(ml['hard'])}); "
        + ("rings count against it on this kernel" if ml["matters"]
           else "not used for rings on this kernel (>= 5.12)"))

    if info["caps"]:
        c = info["caps"]
        add(f"ring         {c['sq_entries']} SQ / {c['cq_entries']} CQ entries, "
            f"{c['buf_count']} receive buffers of {_size(c['buf_size'])}")
        add(f"features     {' '.join(c['feature_names']) or '-'}")
    elif info["loop"] and info["loop"]["error"]:
        add(f"loop         NOT CREATED: {info['loop']['error']}")
    if info["capabilities"]:
        add("capabilities (in the kernel? what this loop does) [kernel that brought it]")
        width = max(len(r["name"]) for r in info["capabilities"])
        for r in info["capabilities"]:
            has = {True: "yes", False: "no", None: "?"}[r["kernel"]]
            add(f"  {r['name']:<{width}}  {has:<3}  {r['status']} [{r['since']}]")

    t = info["ktls"]
    add("kTLS         " + ("available (TLS ULP registered)" if t["available"]
                           else f"not available: {t['reason']}"))
    o = info["openssl"]
    p = o["python_ssl"]
    add(f"OpenSSL      Python _ssl: {p['version'] or 'not available (no ssl module)'}"
        + (f" ({p['path'] or p['library']})" if p["library"] else ""))
    kl = o["libkloop"]
    if kl["linked"]:
        add(f"             libkloop: {kl['path'] or kl['library']}; "
            + ("the same library as Python's" if o["match"] else "DIFFERS from Python's"))
    else:
        add(f"             libkloop: {kl['note']}")
    t = info["tls"]
    if t is not None:
        e = t["engine"]
        usable = e["available"] and t["layout"] == "ok"
        if usable:
            add("engine TLS   available: libkloop drives the SSL objects of Python's ssl module "
                "(same libssl: SSL_new at " + e["libkloop"]["ssl_new_addr"] + ")")
        else:
            why = e["reason"] or f"SSL object layout: {t['layout']}"
            add(f"engine TLS   NOT available: {why}; TLS goes through asyncio's sslproto")
        if e["libkloop"]:
            add(f"             libkloop's OpenSSL: {e['libkloop']['version_text']} "
                f"({e['libkloop']['libssl_path'] or '?'})")
        if e["python"]:
            add(f"             Python's OpenSSL:   {e['python']['version_text']} "
                f"(via {e['python']['ssl_path']})")
        if t["mode"] == "sslproto":
            add("             KLOOP_TLS=sslproto: every TLS connection uses asyncio's sslproto")
    add("")
    add(("OK: " if info["ok"] else "FAIL: ") + info["verdict"])
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m kloop info",
        description="Say whether kloop can run on this machine, and if not, why not.")
    parser.add_argument("--json", action="store_true", help="print a JSON document for tools")
    parser.add_argument("--disable", metavar="CAP[,CAP...]", default="",
                        help="create the test loop with these capabilities off "
                             "(kloop_config.disable), to see an older kernel's fallbacks")
    args = parser.parse_args(argv)
    from . import _ffi
    disable = [n for n in args.disable.replace(",", " ").split() if n]
    unknown = sorted(set(disable) - set(_ffi.CAP_NAMES.values()))
    if unknown:
        parser.error(f"unknown capability {', '.join(unknown)}; known: "
                     f"{', '.join(sorted(_ffi.CAP_NAMES.values()))}")
    info = gather(disable)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render_text(info))
    return 0 if info["ok"] else 1
