"""CFFI binding of libkloop: API mode where the compiled module is there,
ABI mode (``ffi.dlopen``) otherwise, with the same declarations and behaviour.

``CDEF`` is a hand-kept copy of the declarations of ``include/kloop.h``
(a test compares the two). Constants live in Python below, because CFFI's
cdef parser cannot evaluate the header's ``UINT64_C(1) << n`` macros.

API mode: meson generates the C source of the module ``_cffi_api`` from
this CDEF (scripts/cffi_api.py; it is never imported from here) and links it
against libkloop. Its calls skip libffi: about 10% fewer instructions per
echo request (docs/design.md, "Binding"). The module sits next to the library
it links (``build/libkloop/`` in a build tree, the package directory in a
wheel) and finds it through its RPATH ``$ORIGIN``.

Which mode (:data:`MODE`, and why: :data:`MODE_REASON`) is decided when this
module is imported, since ``ffi`` differs between the two (structs of one
FFI instance are not accepted by the other's functions):

* ``KLOOP_FFI=abi``: ABI mode. ``KLOOP_FFI=api``: API mode, or an
  ImportError from :func:`load` saying why not. Unset or ``auto``: API mode
  when a module is found and passes the checks below, else ABI mode (the
  reason is logged at debug level on the ``kloop`` logger).
* The module is looked for in the directory of ``$KLOOP_LIBRARY`` when that
  is set, else in the package directory, then in ``<repo>/build/libkloop``.
* It is used only when it imports, was generated from this CDEF (else the
  build is stale), the libkloop it loaded lies in its own directory, reports
  the version of the kloop.h the module was compiled with and has the major
  :data:`ABI_MAJOR`, and, with ``$KLOOP_LIBRARY`` set, is that very file.
  So ``KLOOP_LIBRARY`` always chooses the library: naming any other library
  than the module's means ABI mode.

In ABI mode the library is looked up in this order:

1. ``$KLOOP_LIBRARY`` (a path to the shared object);
2. a ``libkloop.so*`` bundled inside this package directory;
3. the source-tree build ``<repo>/build/libkloop/libkloop.so``;
4. the system's ``libkloop.so.<major>``.

A library whose major version differs from :data:`ABI_MAJOR` (the header
version this cdef was written for) is refused with an ImportError.
"""

import glob
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import re

import cffi

__all__ = ("ffi", "load", "ABI_MAJOR", "ABI_VERSION", "MODE", "MODE_REASON", "API_MODULE_PATH")

# Version of include/kloop.h that CDEF copies.
ABI_MAJOR = 0
ABI_MINOR = 1
ABI_PATCH = 0
ABI_VERSION = (ABI_MAJOR << 16) | (ABI_MINOR << 8) | ABI_PATCH

CDEF = """
typedef struct kloop kloop_t;

uint32_t kloop_version(void);

struct kloop_caps {
  uint32_t size;
  uint32_t features;
  uint64_t kernel;
  uint64_t enabled;
  uint32_t sq_entries;
  uint32_t cq_entries;
  uint32_t buf_size;
  uint32_t buf_count;
  uint8_t opcodes[256];
  uint64_t reserved[8];
};

int kloop_probe(struct kloop_caps *caps);

struct kloop_config {
  uint32_t size;
  uint32_t sq_entries;
  uint32_t cq_entries;
  uint32_t flags;
  uint64_t disable;
  uint32_t buf_size;
  uint32_t buf_count;
  uint32_t sqpoll_idle_ms;
  uint32_t reserved0;
  uint64_t reserved[6];
};

int kloop_config_init(struct kloop_config *cfg);
int kloop_create(const struct kloop_config *cfg, kloop_t **out);
int kloop_destroy(kloop_t *loop);
int kloop_get_caps(kloop_t *loop, struct kloop_caps *caps);
int kloop_ring_fd(kloop_t *loop);

struct kloop_completion {
  uint64_t token;
  int32_t result;
  uint32_t flags;
  uint64_t data;
  uint32_t event;
  uint32_t aux;
};

int kloop_poll(kloop_t *loop, struct kloop_completion *out, uint32_t max,
               int64_t timeout_ns);
int kloop_buffer_arena(kloop_t *loop, uint64_t *base, uint64_t *size);
int kloop_wake(kloop_t *loop);

int kloop_submit_nop(kloop_t *loop, uint64_t token);
int kloop_submit_accept(kloop_t *loop, uint64_t token, int fd, uint32_t flags);
int kloop_submit_connect(kloop_t *loop, uint64_t token, int fd, const void *addr,
                         uint32_t addrlen);
int kloop_submit_recv(kloop_t *loop, uint64_t token, int fd, void *buf, uint32_t len,
                      uint32_t msg_flags);
int kloop_submit_send(kloop_t *loop, uint64_t token, int fd, const void *buf,
                      uint32_t len, uint32_t msg_flags);
int kloop_submit_recvmsg(kloop_t *loop, uint64_t token, int fd, void *buf,
                         uint32_t len, uint32_t msg_flags);
int kloop_submit_sendmsg(kloop_t *loop, uint64_t token, int fd, const void *buf,
                         uint32_t len, const void *addr, uint32_t addrlen,
                         uint32_t msg_flags);
int kloop_submit_read(kloop_t *loop, uint64_t token, int fd, void *buf, uint32_t len,
                      uint64_t offset);
int kloop_submit_write(kloop_t *loop, uint64_t token, int fd, const void *buf,
                       uint32_t len, uint64_t offset);
int kloop_submit_poll(kloop_t *loop, uint64_t token, int fd, uint32_t events,
                      uint32_t flags);
int kloop_submit_timeout(kloop_t *loop, uint64_t token, uint64_t timeout_ns);
int kloop_submit_shutdown(kloop_t *loop, uint64_t token, int fd, int how);
int kloop_submit_close(kloop_t *loop, uint64_t token, int fd);
int kloop_submit_splice(kloop_t *loop, uint64_t token, int fd_in, uint64_t off_in,
                        int fd_out, uint64_t off_out, uint32_t len, uint32_t flags);
int kloop_submit_child_exit(kloop_t *loop, uint64_t token, int pid);
int kloop_cancel(kloop_t *loop, uint64_t token);
int kloop_cancel_now(kloop_t *loop, uint64_t token);
int kloop_cancel_fd(kloop_t *loop, int fd);

int kloop_stream_attach(kloop_t *loop, uint64_t token, int fd, uint32_t flags);
int kloop_stream_pause(kloop_t *loop, uint64_t token);
int kloop_stream_resume(kloop_t *loop, uint64_t token);
int64_t kloop_stream_write(kloop_t *loop, uint64_t token, const void *buf, size_t len);
int64_t kloop_stream_write_ref(kloop_t *loop, uint64_t token, const void *buf, size_t len,
                               uint64_t ref);
int kloop_stream_set_limits(kloop_t *loop, uint64_t token, uint64_t high,
                            uint64_t low);
int64_t kloop_stream_write_size(kloop_t *loop, uint64_t token);
int kloop_stream_shutdown(kloop_t *loop, uint64_t token);
int kloop_stream_close(kloop_t *loop, uint64_t token);
int kloop_stream_abort(kloop_t *loop, uint64_t token);

int kloop_stream_start_tls(kloop_t *loop, uint64_t token, void *ssl);

struct kloop_tls_error {
  uint32_t size;
  int32_t ssl_error;
  int32_t lib;
  int32_t reason;
  int64_t verify_result;
  char message[256];
  char verify_message[256];
};

int kloop_stream_tls_error(kloop_t *loop, uint64_t token, struct kloop_tls_error *out);

struct kloop_tls_info {
  uint32_t size;
  uint32_t reserved0;
  uint64_t version_num;
  uint64_t ssl_new_addr;
  char libssl_path[256];
  char version_text[128];
};

int kloop_get_tls_info(struct kloop_tls_info *out);

struct kloop_stats {
  uint32_t size;
  uint32_t reserved0;
  uint64_t ops_in_flight;
  uint64_t streams;
  uint64_t buffers_in_use;
  uint64_t polls;
  uint64_t enters;
  uint64_t sqes;
  uint64_t cqes;
  uint64_t completions;
  uint64_t cq_overflows;
  uint64_t enobufs;
  uint64_t direct_sends;
  uint64_t buffers_released;
  uint64_t reserved[4];
};

int kloop_get_stats(kloop_t *loop, struct kloop_stats *stats);
const char *kloop_strerror(int err);
"""

# --- constants of kloop.h -------------------------------------------------

CAP_SINGLE_ISSUER = 1 << 0
CAP_DEFER_TASKRUN = 1 << 1
CAP_MULTISHOT_ACCEPT = 1 << 2
CAP_MULTISHOT_RECV = 1 << 3
CAP_MULTISHOT_POLL = 1 << 4
CAP_BUF_RING = 1 << 5
CAP_RECV_BUNDLE = 1 << 6
CAP_BUF_RING_INC = 1 << 7
CAP_WAITID = 1 << 8
CAP_SEND_ZC = 1 << 9
CAP_EXT_ARG = 1 << 10
CAP_NODROP = 1 << 11
CAP_REG_RING_FD = 1 << 12
CAP_SOCKET_OP = 1 << 13
CAP_SPLICE = 1 << 14
CAP_BIND_LISTEN = 1 << 15
CAP_PIDFD = 1 << 16
CAP_KTLS = 1 << 17

# aux of a successful HANDSHAKE record: directions kernel TLS took over
HANDSHAKE_KTLS_TX = 1
HANDSHAKE_KTLS_RX = 2

CAP_NAMES = {
    CAP_SINGLE_ISSUER: "single_issuer",
    CAP_DEFER_TASKRUN: "defer_taskrun",
    CAP_MULTISHOT_ACCEPT: "multishot_accept",
    CAP_MULTISHOT_RECV: "multishot_recv",
    CAP_MULTISHOT_POLL: "multishot_poll",
    CAP_BUF_RING: "buf_ring",
    CAP_RECV_BUNDLE: "recv_bundle",
    CAP_BUF_RING_INC: "buf_ring_inc",
    CAP_WAITID: "waitid",
    CAP_SEND_ZC: "send_zc",
    CAP_EXT_ARG: "ext_arg",
    CAP_NODROP: "nodrop",
    CAP_REG_RING_FD: "reg_ring_fd",
    CAP_SOCKET_OP: "socket_op",
    CAP_SPLICE: "splice",
    CAP_BIND_LISTEN: "bind_listen",
    CAP_PIDFD: "pidfd",
    CAP_KTLS: "ktls",
}

CONFIG_SQPOLL = 1 << 0
CONFIG_NO_DEFER_TASKRUN = 1 << 1
CONFIG_NO_SEND_GATHER = 1 << 2
CONFIG_NO_DIRECT_SEND = 1 << 3
CONFIG_NO_TLS_SEAL = 1 << 4
CONFIG_NO_TLS_SEND_AFTER_WAIT = 1 << 5

COMPLETION_MORE = 1 << 0
COMPLETION_DATA_NEXT = 1 << 1

EVENT_OP = 0
EVENT_DATA = 1
EVENT_EOF = 2
EVENT_ERROR = 3
EVENT_WRITE_LOW = 4
EVENT_CLOSED = 5
EVENT_WRITE_DONE = 6
EVENT_HANDSHAKE = 7
EVENT_WRITE_RELEASE = 8

# kloop_completion.aux of EVENT_ERROR: which side of the stream failed
ERROR_READ = 1
ERROR_WRITE = 2
ERROR_TLS = 4

# kloop_completion.aux of EVENT_EOF on a TLS stream
EOF_UNCLEAN = 1

OP_MULTISHOT = 1 << 0
POLL_EDGE = 1 << 1
ACCEPT_KERNEL_MULTISHOT = 1 << 2

OFFSET_CURRENT = (1 << 64) - 1

STREAM_SOCKET = 0
STREAM_FILE = 1 << 0
STREAM_CLOSE_FD = 1 << 1
STREAM_PAUSED = 1 << 2
STREAM_NO_READ = 1 << 3

# struct kloop_completion: token, result, flags, data, event, aux.
COMPLETION_FORMAT = "<QiIQII"
COMPLETION_SIZE = 32

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_BUILD = os.path.join(
    os.path.dirname(os.path.dirname(_PACKAGE_DIR)), "build", "libkloop", "libkloop.so")

#: Environment variable choosing the binding: abi, api or auto (the default).
MODE_ENV = "KLOOP_FFI"
#: Name of the compiled API-mode module (a file _cffi_api<EXTENSION_SUFFIX>).
API_MODULE = "_cffi_api"

_log = logging.getLogger("kloop")


def cdef_hash(text):
    """The hash of a CDEF text that scripts/cffi_api.py compiles into the module."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


class _Unusable(Exception):
    """An API-mode module that is not to be used (the message says why)."""


def _api_candidates():
    env = os.environ.get("KLOOP_LIBRARY")
    if env:
        dirs = [os.path.dirname(os.path.abspath(env))]
    else:
        dirs = [_PACKAGE_DIR, os.path.dirname(_REPO_BUILD)]
    for d in dirs:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(d, API_MODULE + suffix)
            if os.path.isfile(path):
                yield path


def _mapped_file(address):
    """The file mapped at `address` in this process (from /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                low, _, high = parts[0].partition("-")
                if int(low, 16) <= address < int(high, 16):
                    return parts[5].strip() if len(parts) == 6 else None
    except (OSError, ValueError, IndexError):
        pass
    return None


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _version_text(v):
    return f"{v >> 16}.{(v >> 8) & 0xff}.{v & 0xff}"


def _check_api_module(path):
    """Import the API-mode module at `path`: (its ffi, lib, library path), or _Unusable."""
    name = f"{__package__ or 'kloop'}.{API_MODULE}"
    spec = importlib.util.spec_from_file_location(name, path)
    try:
        module = importlib.util.module_from_spec(spec)  # an extension: dlopen here
        spec.loader.exec_module(module)
    except ImportError as exc:  # e.g. its libkloop is missing, or a symbol
        raise _Unusable(f"{path} does not import: {exc}") from None
    api_ffi, lib = module.ffi, module.lib
    if getattr(lib, "KLOOP_CFFI_CDEF_HASH", None) != cdef_hash(CDEF):
        raise _Unusable(f"{path} was generated from another CDEF than {__file__} "
                        "(a stale build: rebuild it)")
    # CFFI compares a struct's layout as the compiler saw it with the cdef's
    # on the struct's first use: make that happen now, not in a loop.
    for struct_name in re.findall(r"^struct (\w+) \{", CDEF, re.M):
        try:
            api_ffi.sizeof(f"struct {struct_name}")
        except api_ffi.error as exc:
            raise _Unusable(f"{path}: struct {struct_name}: {exc}") from None
    # Which file the library lies in: a function's address would be that of
    # CFFI's wrapper in the module, but kloop_strerror(0) returns a string
    # literal of libkloop's own read-only data.
    address = int(api_ffi.cast("uintptr_t", lib.kloop_strerror(0)))
    library = _mapped_file(address)
    if library is None:
        raise _Unusable(f"cannot tell which libkloop {path} loaded")
    if not _same_file(os.path.dirname(library), os.path.dirname(path)):
        raise _Unusable(f"{path} loaded {library}, not the libkloop of its own directory")
    version, built = lib.kloop_version(), lib.KLOOP_CFFI_HEADER_VERSION
    if version != built or version >> 16 != ABI_MAJOR:
        raise _Unusable(f"{path} was compiled for libkloop {_version_text(built)} (binding ABI "
                        f"major {ABI_MAJOR}) but {library} is {_version_text(version)}")
    env = os.environ.get("KLOOP_LIBRARY")
    if env:
        if not _same_file(env, library):
            raise _Unusable(f"KLOOP_LIBRARY={env} is not {library}, the library {path} links")
        library = env  # the same file, under the name ABI mode would report
    return api_ffi, lib, library


def _select():
    """(mode, reason, ffi, (lib, library path) or None, module path, error for load())."""
    choice = os.environ.get(MODE_ENV, "").strip().lower() or "auto"
    if choice not in ("abi", "api", "auto"):
        error = f"kloop: {MODE_ENV}={choice!r}: use abi, api or auto"
        return "abi", error, None, None, None, error
    if choice == "abi":
        return "abi", f"{MODE_ENV}=abi", None, None, None, None
    reasons = []
    for path in _api_candidates():
        try:
            api_ffi, lib, library = _check_api_module(path)
        except _Unusable as exc:
            reasons.append(str(exc))
            continue
        return "api", f"compiled module {path}", api_ffi, (lib, library), path, None
    if not reasons:
        env = os.environ.get("KLOOP_LIBRARY")
        where = os.path.dirname(os.path.abspath(env)) if env else \
            f"{_PACKAGE_DIR} or {os.path.dirname(_REPO_BUILD)}"
        reasons.append(f"no compiled module {API_MODULE} in {where}")
    reason = "; ".join(reasons)
    if choice == "api":
        return "abi", reason, None, None, None, f"kloop: {MODE_ENV}=api but {reason}"
    return "abi", reason, None, None, None, None


MODE, MODE_REASON, ffi, _api_loaded, API_MODULE_PATH, _select_error = _select()
if ffi is None:
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
_log.debug("kloop: CFFI %s mode: %s", MODE.upper(), MODE_REASON)


def _candidates():
    env = os.environ.get("KLOOP_LIBRARY")
    if env:
        # An explicit choice is final: do not silently fall back.
        yield env, True
        return
    for path in sorted(glob.glob(os.path.join(_PACKAGE_DIR, "libkloop.so*"))):
        yield path, False
    if os.path.exists(_REPO_BUILD):
        yield _REPO_BUILD, False
    yield f"libkloop.so.{ABI_MAJOR}", False


def _load():
    if _select_error:
        raise ImportError(_select_error)
    if _api_loaded is not None:
        return _api_loaded
    errors = []
    for path, explicit in _candidates():
        try:
            handle = ffi.dlopen(path)
        except OSError as exc:
            if explicit:
                raise ImportError(
                    f"kloop: cannot load libkloop from KLOOP_LIBRARY={path!r}: {exc}") from exc
            errors.append(f"{path}: {exc}")
            continue
        version = handle.kloop_version()
        major = version >> 16
        if major != ABI_MAJOR:
            raise ImportError(
                f"kloop: {path} is libkloop {major}.{(version >> 8) & 0xff}.{version & 0xff} "
                f"(ABI major {major}) but this binding was written for ABI major "
                f"{ABI_MAJOR} ({ABI_MAJOR}.{ABI_MINOR}.{ABI_PATCH}); install a matching "
                f"libkloop.so.{ABI_MAJOR} or point KLOOP_LIBRARY at one")
        return handle, path
    raise ImportError(
        "kloop: libkloop not found; build it (meson setup build && ninja -C build) or set "
        "KLOOP_LIBRARY=/path/to/libkloop.so. Tried: " + "; ".join(errors))


_loaded = None


def load():
    """Return ``(lib, path)``, loading the library on first use.

    Raises ImportError when no usable libkloop is found or its major version
    differs from ABI_MAJOR. Loading is deferred so that ``import kloop`` and
    ``kloop.is_supported()`` work on machines without the library.
    """
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def __getattr__(name):
    # ``_ffi.lib`` / ``_ffi.library_path`` load the library on first access.
    if name == "lib":
        return load()[0]
    if name == "library_path":
        return load()[1]
    raise AttributeError(name)
