"""TLS in the engine: which connections may use it, and how Python hands
an ``ssl.SSLObject`` over to libkloop.

A TLS connection on kloop takes one of two paths:

* **engine**: Python's own ``ssl`` module builds the ``SSL *`` (through
  ``SSLContext.wrap_bio()``, so SNI, host name checks, ALPN, the session
  and every context setting are exactly Python's), and
  ``kloop_stream_start_tls()`` hands it to the engine, which drives it over
  io_uring: the transport (``transports.TLSTransport``) sees plaintext DATA
  records and writes plaintext. Python never calls read/write/do_handshake
  on that SSLObject; it answers ``get_extra_info('ssl_object')``,
  ``'peercert'``, ``'cipher'`` and ``'compression'`` from it.
* **sslproto**: asyncio's ``SSLProtocol`` over a plain engine stream, as
  the stock loop does it.

The engine path is taken only when all of this holds (otherwise sslproto,
and the reason is logged at debug level on the ``kloop`` logger):

* ``KLOOP_TLS`` is not ``sslproto`` (the escape hatch, and the way to
  compare the two paths);
* libkloop was built with TLS and resolves ``SSL_new`` to the same address
  as the library Python's ``_ssl`` is linked with (one libssl in the
  process: an ``SSL *`` of one copy must not be driven by another);
* the context installs no Python callback on the ``SSL_CTX``/``SSL``:
  ``sni_callback``, ``_msg_callback``, ``keylog_filename`` unset,
  ``post_handshake_auth`` off; TLS compression is off
  (``OP_NO_COMPRESSION``, Python's default), and the context makes plain
  ``ssl.SSLObject`` objects (no ``sslobject_class`` override);
* the ``SSL *`` could be read and proven (below).

Reading the ``SSL *`` (docs/design.md, section "TLS", says why this is
sound): CPython 3.11's ``_ssl._SSLSocket`` (``SSLObject._sslobj``) starts
``{PyObject_HEAD; PyObject *Socket; SSL *ssl; PySSLContext *ctx; ...}`` and
``_ssl._SSLContext`` starts ``{PyObject_HEAD; SSL_CTX *ctx; ...}``. Before
the pointer is used, the layout is proven on that very object: the ``ctx``
field must be ``id(sslobj.context)`` (Python memory, no foreign pointer
followed), then through libssl ``SSL_get_SSL_CTX(ssl)`` must be the
``SSL_CTX *`` read from the context, ``SSL_is_server(ssl)`` the side asked
for, and the context's options and verify mode must be what Python reports.
Any mismatch: sslproto.
"""

import logging
import os
import re
import ssl
import sys

import cffi

from . import _ffi

logger = logging.getLogger("kloop")

#: Environment variable: ``sslproto`` keeps every TLS connection on asyncio's
#: sslproto; ``auto`` (or unset) takes the engine path where it is safe.
ENV = "KLOOP_TLS"

ENGINE = "engine"
SSLPROTO = "sslproto"

# OpenSSL numbers used below (stable across 1.1.1 and 3.x).
SSL_ERROR_SSL = 1
SSL_ERROR_SYSCALL = 5
SSL_ERROR_ZERO_RETURN = 6
ERR_LIB_SSL = 20
SSL_R_CERTIFICATE_VERIFY_FAILED = 134
X509_V_ERR_HOSTNAME_MISMATCH = 62
X509_V_ERR_IP_ADDRESS_MISMATCH = 64
SSL_VERIFY_PEER = 0x01
SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02

# Python's ssl module codes (enum py_ssl_error of _ssl.c)
PY_SSL_ERROR_SSL = 1
PY_SSL_ERROR_EOF = 8

_LIBSSL_CDEF = """
typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
SSL *SSL_new(SSL_CTX *ctx);
SSL_CTX *SSL_get_SSL_CTX(const SSL *ssl);
int SSL_is_server(const SSL *ssl);
uint64_t SSL_CTX_get_options(const SSL_CTX *ctx);
int SSL_CTX_get_verify_mode(const SSL_CTX *ctx);
unsigned long OpenSSL_version_num(void);
const char *OpenSSL_version(int t);
"""

# Offsets in the CPython objects, after PyObject_HEAD (whose size is
# object.__basicsize__: larger in a Py_TRACE_REFS build).
_HEAD = object.__basicsize__
_PTR = 8 if sys.maxsize > 2 ** 32 else 4
SSLSOCKET_SSL = _HEAD + 1 * _PTR     # PySSLSocket.ssl
SSLSOCKET_CTX = _HEAD + 2 * _PTR     # PySSLSocket.ctx
SSLCONTEXT_CTX = _HEAD               # PySSLContext.ctx


class _LibSSL:
    """libssl as Python's ``_ssl`` resolves it (dlopen of ``_ssl`` itself:
    symbols come from its dependencies)."""

    def __init__(self):
        import _ssl
        self.path = getattr(_ssl, "__file__", None)
        self.ffi = cffi.FFI()
        self.ffi.cdef(_LIBSSL_CDEF)
        # A built-in _ssl (no file): the symbols are in the process itself.
        self.lib = self.ffi.dlopen(self.path)

    def ssl_new_addr(self):
        return int(self.ffi.cast("uintptr_t", self.ffi.addressof(self.lib, "SSL_new")))


_libssl = None
_libssl_error = None


def libssl():
    """The _LibSSL of this process, or None (the reason in _libssl_error)."""
    global _libssl, _libssl_error
    if _libssl is None and _libssl_error is None:
        try:
            _libssl = _LibSSL()
        except (ImportError, OSError, AttributeError, cffi.FFIError) as exc:
            _libssl_error = f"cannot load the libssl of Python's _ssl: {exc}"
    return _libssl


def engine_info(lib):
    """What libkloop says about its OpenSSL, and whether it is Python's.

    Returns a dict: ``available`` (bool), ``reason`` (None or why not),
    ``libkloop`` (version_num, version_text, libssl_path, ssl_new_addr) and
    ``python`` (ssl_new_addr, version_num, version_text, _ssl path).
    """
    out = {"available": False, "reason": None, "libkloop": None, "python": None}
    ffi = _ffi.ffi
    try:
        fn = lib.kloop_get_tls_info
    except AttributeError:
        out["reason"] = "libkloop has no kloop_get_tls_info (built without TLS)"
        return out
    info = ffi.new("struct kloop_tls_info *")
    info.size = ffi.sizeof("struct kloop_tls_info")
    rc = fn(info)
    if rc < 0:
        out["reason"] = f"kloop_get_tls_info() failed: {os.strerror(-rc)}"
        return out
    out["libkloop"] = {
        "version_num": f"0x{info.version_num:x}",
        "version_text": ffi.string(info.version_text).decode(errors="replace"),
        "libssl_path": ffi.string(info.libssl_path).decode(errors="replace") or None,
        "ssl_new_addr": f"0x{info.ssl_new_addr:x}",
    }
    if not info.ssl_new_addr:
        out["reason"] = "libkloop has no OpenSSL (ssl_new_addr is 0)"
        return out
    ls = libssl()
    if ls is None:
        out["reason"] = _libssl_error
        return out
    py_addr = ls.ssl_new_addr()
    out["python"] = {
        "ssl_path": ls.path,
        "ssl_new_addr": f"0x{py_addr:x}",
        "version_num": f"0x{ls.lib.OpenSSL_version_num():x}",
        "version_text": ls.ffi.string(ls.lib.OpenSSL_version(0)).decode(errors="replace"),
    }
    if py_addr != info.ssl_new_addr:
        out["reason"] = (f"libkloop's SSL_new (0x{info.ssl_new_addr:x}) is not the one of "
                         f"Python's _ssl (0x{py_addr:x}): two copies of libssl")
        return out
    out["available"] = True
    return out


_engine_ok = {}   # id(lib) -> (lib, None or reason)


def engine_unavailable(lib):
    """None when libkloop may drive SSL objects made by Python's _ssl, else why not."""
    entry = _engine_ok.get(id(lib))
    if entry is None or entry[0] is not lib:
        entry = (lib, engine_info(lib)["reason"])
        _engine_ok[id(lib)] = entry
    return entry[1]


def forced_sslproto():
    """True when KLOOP_TLS asks for asyncio's sslproto on every connection."""
    return os.environ.get(ENV, "").strip().lower() == SSLPROTO


def unsafe_context(context):
    """None when ``context`` may be used by the engine, else why not."""
    if not isinstance(context, ssl.SSLContext):
        return f"not an ssl.SSLContext ({type(context).__name__})"
    if context.sni_callback is not None:
        return "the context has an sni_callback (a Python callback in the handshake)"
    if getattr(context, "_msg_callback", None) is not None:
        return "the context has a _msg_callback (a Python callback per TLS message)"
    if context.keylog_filename is not None:
        return "the context has a keylog_filename (written by a callback of _ssl)"
    if getattr(context, "post_handshake_auth", False):
        return "the context asks for post_handshake_auth (driven from Python)"
    if not context.options & ssl.OP_NO_COMPRESSION:
        return "TLS compression is not disabled (OP_NO_COMPRESSION clear)"
    if context.sslobject_class is not ssl.SSLObject:
        return f"the context makes {context.sslobject_class.__name__} objects, not SSLObject"
    return None


def _read_ptr(addr):
    return int(_ffi.ffi.cast("uintptr_t *", addr)[0])


def ssl_pointer(sslobj, server_side, *, sslsocket_ssl=SSLSOCKET_SSL,
                sslsocket_ctx=SSLSOCKET_CTX, sslcontext_ctx=SSLCONTEXT_CTX):
    """The ``SSL *`` of ``sslobj`` (an ssl.SSLObject) as an int, or a str
    saying why it cannot be used. The keyword arguments exist for the test
    that proves a wrong layout is detected."""
    import _ssl
    ls = libssl()
    if ls is None:
        return _libssl_error
    inner = getattr(sslobj, "_sslobj", None)
    if type(inner) is not _ssl._SSLSocket:
        return f"SSLObject._sslobj is {type(inner).__name__}, not _ssl._SSLSocket"
    context = sslobj.context
    if not isinstance(context, _ssl._SSLContext):
        return f"SSLObject.context is {type(context).__name__}, not an _ssl._SSLContext"
    size = type(inner).__basicsize__
    if size < max(sslsocket_ssl, sslsocket_ctx) + _PTR or \
            _ssl._SSLContext.__basicsize__ < sslcontext_ctx + _PTR:
        return "the _ssl objects are smaller than the layout read here"
    base = id(inner)
    # 1. The ctx field is the PySSLContext object: Python memory only.
    if _read_ptr(base + sslsocket_ctx) != id(context):
        return "layout check failed: _SSLSocket.ctx is not the SSLObject's context"
    ssl_ptr = _read_ptr(base + sslsocket_ssl)
    ctx_ptr = _read_ptr(id(context) + sslcontext_ctx)
    if not ssl_ptr or not ctx_ptr:
        return "layout check failed: a NULL SSL or SSL_CTX pointer"
    lib, ffi = ls.lib, ls.ffi
    # 2. Through libssl: the SSL belongs to that SSL_CTX, on the side asked
    #    for, and the SSL_CTX has the options and verify mode Python reports.
    if int(ffi.cast("uintptr_t", lib.SSL_get_SSL_CTX(ffi.cast("SSL *", ssl_ptr)))) != ctx_ptr:
        return "layout check failed: SSL_get_SSL_CTX(ssl) is not the context's SSL_CTX"
    if bool(lib.SSL_is_server(ffi.cast("SSL *", ssl_ptr))) != bool(server_side):
        return "layout check failed: SSL_is_server(ssl) is not the side asked for"
    cctx = ffi.cast("SSL_CTX *", ctx_ptr)
    if int(lib.SSL_CTX_get_options(cctx)) != int(context.options):
        return "layout check failed: SSL_CTX_get_options() differs from context.options"
    mode = lib.SSL_CTX_get_verify_mode(cctx) & (SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT)
    want = {0: ssl.CERT_NONE, SSL_VERIFY_PEER: ssl.CERT_OPTIONAL,
            SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT: ssl.CERT_REQUIRED}.get(mode)
    if want != context.verify_mode:
        return "layout check failed: SSL_CTX_get_verify_mode() differs from context.verify_mode"
    return ssl_ptr


def choose(loop, sslcontext, sock=None):
    """None when a connection with ``sslcontext`` takes the engine path on
    ``loop``, else the reason for sslproto."""
    if forced_sslproto():
        return f"{ENV}=sslproto"
    proactor = loop._proactor
    why = engine_unavailable(proactor._lib)
    if why is not None:
        return why
    why = unsafe_context(sslcontext)
    if why is not None:
        return why
    if sock is not None and proactor._stash_get(sock) is not None:
        return "bytes a cancelled sock_recv() took are waiting for this socket"
    return None


def prepare(sslcontext, server_side, server_hostname, session=None):
    """(sslobj, SSL * as int) for the engine, or (sslobj, reason str).

    Raises what ``wrap_bio`` raises (e.g. ValueError for check_hostname
    without server_hostname), as sslproto would."""
    sslobj = sslcontext.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=server_side,
                                 server_hostname=server_hostname, session=session)
    return sslobj, ssl_pointer(sslobj, server_side)


def log_path(loop, what, path, reason=None):
    """Say which path a TLS connection took (and why sslproto)."""
    if path == ENGINE:
        msg, args = "kloop: %s: TLS on the engine path", (what,)
    else:
        msg, args = "kloop: %s: TLS through asyncio's sslproto: %s", (what, reason)
    logger.debug(msg, *args)
    if loop.get_debug():
        from asyncio.log import logger as alogger
        alogger.debug(msg, *args)


# -- errors -----------------------------------------------------------------

_ssl_c_line = None


def _ssl_c_lineno():
    """The _ssl.c line number Python puts into handshake errors (found once
    by failing a handshake on memory BIOs), so that messages read alike."""
    global _ssl_c_line
    if _ssl_c_line is None:
        _ssl_c_line = 0
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = ctx.wrap_bio(inc, out)
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            inc.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)
            obj.do_handshake()
        except ssl.SSLError as exc:
            m = re.search(r"\(_ssl\.c:(\d+)\)", str(exc))
            if m:
                _ssl_c_line = int(m.group(1))
        except Exception:  # pragma: no cover - defensive
            pass
    return _ssl_c_line


def tls_exception(err, server_hostname=None):
    """An ssl.SSLError like _ssl's for a ``struct kloop_tls_error``."""
    import _ssl
    ffi = _ffi.ffi
    lib, reason = int(err.lib), int(err.reason)
    errstr = ffi.string(err.message).decode(errors="replace") or None
    line = _ssl_c_lineno()
    if err.ssl_error in (SSL_ERROR_SYSCALL, 0) and not lib and not reason:
        exc = ssl.SSLEOFError(PY_SSL_ERROR_EOF,
                              f"EOF occurred in violation of protocol (_ssl.c:{line})")
        exc.reason = None
        exc.library = None
        return exc
    if err.ssl_error == SSL_ERROR_ZERO_RETURN:
        exc = ssl.SSLZeroReturnError(6, f"TLS/SSL connection has been closed (EOF) "
                                        f"(_ssl.c:{line})")
        exc.reason = None
        exc.library = None
        return exc
    cls = ssl.SSLError
    if lib == ERR_LIB_SSL and reason == SSL_R_CERTIFICATE_VERIFY_FAILED:
        cls = ssl.SSLCertVerificationError
    reason_name = _ssl.err_codes_to_names.get((lib, reason)) if lib else None
    lib_name = _ssl.lib_codes_to_names.get(lib) if lib else None
    if errstr is None:
        errstr = "unknown error" if lib or reason else "A failure in the SSL library occurred"
    verify_code = verify_msg = None
    if cls is ssl.SSLCertVerificationError:
        verify_code = int(err.verify_result)
        if verify_code == X509_V_ERR_HOSTNAME_MISMATCH:
            verify_msg = f"Hostname mismatch, certificate is not valid for '{server_hostname}'."
        elif verify_code == X509_V_ERR_IP_ADDRESS_MISMATCH:
            verify_msg = f"IP address mismatch, certificate is not valid for '{server_hostname}'."
        else:
            verify_msg = ffi.string(err.verify_message).decode(errors="replace") or None
    if verify_msg and reason_name and lib_name:
        msg = f"[{lib_name}: {reason_name}] {errstr}: {verify_msg} (_ssl.c:{line})"
    elif reason_name and lib_name:
        msg = f"[{lib_name}: {reason_name}] {errstr} (_ssl.c:{line})"
    elif lib_name:
        msg = f"[{lib_name}] {errstr} (_ssl.c:{line})"
    else:
        msg = f"{errstr} (_ssl.c:{line})"
    exc = cls(PY_SSL_ERROR_SSL, msg)
    exc.reason = reason_name
    exc.library = lib_name
    if cls is ssl.SSLCertVerificationError:
        exc.verify_code = verify_code
        exc.verify_message = verify_msg
    return exc
