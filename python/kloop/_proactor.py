"""IouringProactor: asyncio's proactor interface over libkloop.

This is the only module that speaks CFFI. Its shape follows CPython's
``IocpProactor`` (Lib/asyncio/windows_events.py): every operation gets a
token, and the future (or internal handler) that owns it stays in
``_cache`` -- together with the buffer the kernel reads or writes -- until
the engine reports the token's final completion, even after a cancel.

The poll path
-------------
One ``kloop_poll()`` per loop iteration fills a preallocated array of
32-byte ``struct kloop_completion`` records, decoded in bulk with
``struct.iter_unpack`` over a memoryview. add_reader/add_writer handles are
queued at once (as the selector loop's ``_process_events()`` does); every
other record goes into a batch that one reusable handle, appended to the
loop's ready queue, runs after the callbacks that were already ready --
the order in which the selector loop runs its I/O callbacks, which code
relies on. Stream DATA is sliced as bytes out of one buffer over the
engine's receive-buffer arena and handed to ``protocol.data_received()``:
no FFI attribute access, Future or Handle per stream message.

Data that arrives for a cancelled read is not lost
--------------------------------------------------
io_uring can complete a read whose cancel was already requested; the bytes
are then out of the kernel's socket buffer. With the selector loop a
cancelled ``sock_recv()`` leaves them in the kernel for the next read, so
this proactor does the equivalent: the bytes (or the accepted connection,
or the datagram with its address) are kept in a per-socket *stash*, and the
next read on that socket (``recv``, ``recv_into``, ``recvfrom``,
``accept``, or a stream transport attached to it) is served from the stash
first. A future that is cancelled stays cancelled (asyncio code expects
``fut.cancel()`` to take effect at once); its data is what the next reader
gets. Reads on one socket go to the kernel one at a time, so a new read
cannot overtake a cancelled one still in flight. A read future cancelled
after its result arrived but before anyone took it gives the result back to
the stash too (see ``_OpFuture``). The stash is keyed by fd and checked
against the socket object, so a recycled fd number never sees another
socket's data.
"""

import collections
import contextvars
import errno
import itertools
import logging
import math
import os
import selectors
import socket
import struct
import threading
import time
import weakref

from asyncio import events
from asyncio import futures

from . import _ffi
from . import _sockaddr
from ._errors import make_error

logger = logging.getLogger("kloop")

ffi = _ffi.ffi
_CData = ffi.CData

_ECANCELED = errno.ECANCELED
_EINTR = errno.EINTR
_EAGAIN = errno.EAGAIN
_EBADFD = errno.EBADFD

_POLLIN = 0x001
_POLLOUT = 0x004

# The dispatch loop compares event numbers as literals (no global lookups
# per record); they must stay equal to kloop.h's.
assert (_ffi.EVENT_OP, _ffi.EVENT_DATA, _ffi.EVENT_EOF, _ffi.EVENT_ERROR, _ffi.EVENT_WRITE_LOW,
        _ffi.EVENT_CLOSED, _ffi.EVENT_WRITE_DONE, _ffi.EVENT_HANDSHAKE,
        _ffi.EVENT_WRITE_RELEASE) == (0, 1, 2, 3, 4, 5, 6, 7, 8)
_MORE = _ffi.COMPLETION_MORE
# The most bytes joined into one data_received() call: asyncio's largest read.
_JOIN_MAX = 256 * 1024
_OFFSET_CURRENT = _ffi.OFFSET_CURRENT

_CODEC_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)

# Completion records fetched per kloop_poll(); the rest wait for the next.
CQ_BATCH = 256

# Switches to measure what each engine feature gives (benchmarks/run.py
# ablation; docs/performance.md): KLOOP_DISABLE lists capabilities to treat
# as absent (names as `python -m kloop info` prints them), "send_gather"
# (KLOOP_CONFIG_NO_SEND_GATHER), "direct_send" (KLOOP_CONFIG_NO_DIRECT_SEND) and
# "tls_seal" (KLOOP_CONFIG_NO_TLS_SEAL), "tls_send_after_wait"
# (KLOOP_CONFIG_NO_TLS_SEND_AFTER_WAIT);
# KLOOP_CQ_BATCH sets the records per poll.
DISABLE_ENV = "KLOOP_DISABLE"
CQ_BATCH_ENV = "KLOOP_CQ_BATCH"


def _config_from_env(environ=os.environ):
    """(kloop_config fields or None, records per poll) from the environment."""
    config = None
    names = [n.strip() for n in environ.get(DISABLE_ENV, "").split(",") if n.strip()]
    if names:
        by_name = {v: k for k, v in _ffi.CAP_NAMES.items()}
        config = {"disable": 0, "flags": 0}
        for name in names:
            if name == "send_gather":
                config["flags"] |= _ffi.CONFIG_NO_SEND_GATHER
            elif name == "direct_send":
                config["flags"] |= _ffi.CONFIG_NO_DIRECT_SEND
            elif name == "tls_seal":
                config["flags"] |= _ffi.CONFIG_NO_TLS_SEAL
            elif name == "tls_send_after_wait":
                config["flags"] |= _ffi.CONFIG_NO_TLS_SEND_AFTER_WAIT
            elif name in by_name:
                config["disable"] |= by_name[name]
            else:
                raise ValueError(
                    f"{DISABLE_ENV}: unknown feature {name!r} (known: send_gather, direct_send, "
                    "tls_seal, tls_send_after_wait, "
                    + ", ".join(sorted(by_name)) + ")")
    batch = environ.get(CQ_BATCH_ENV, "")
    if not batch:
        return config, CQ_BATCH
    try:
        n = int(batch)
    except ValueError:
        n = 0
    if not 1 <= n <= 65536:
        raise ValueError(f"{CQ_BATCH_ENV} must be a whole number from 1 to 65536, not {batch!r}")
    return config, n


# Seconds IouringProactor.close() waits for the final completions.
CLOSE_TIMEOUT = 10.0

# Datagram reads receive into pooled buffers: a fresh 256 KiB bytearray per
# datagram would cost an mmap, a memset and a munmap each time.
_POOL_KEEP = 4

_PENDING = object()  # a finish function resubmitted the operation


# Bumped in a child process after fork(): objects compare the generation
# they were made in with the current one instead of calling getpid() (a
# system call) on every operation.
_fork_generation = 0


def _after_fork_in_child():
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def forked_since(generation):
    """True in a process forked after ``generation`` was read."""
    return generation != _fork_generation


def fork_error(pid):
    return RuntimeError(
        f"kloop: this event loop was created in process {pid} and cannot be used in "
        f"the forked child {os.getpid()}: its io_uring ring belongs to the parent and "
        f"cannot be shared across fork(). Create a new loop in the child "
        f"(kloop.new_event_loop() or kloop.run()).")


def unsupported_error(rc):
    """OSError saying why io_uring cannot be used here and what to do."""
    code = -rc
    reason = os.strerror(code)
    if code == errno.ENOSYS:
        why = ("the kernel has no io_uring (io_uring_setup(2) is ENOSYS): it is "
               "older than 5.1 or was built without CONFIG_IO_URING")
    elif code == errno.EPERM:
        disabled = None
        try:
            with open("/proc/sys/kernel/io_uring_disabled") as f:
                disabled = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pass
        if disabled == 2:
            why = ("io_uring is disabled for every process: "
                   "/proc/sys/kernel/io_uring_disabled is 2; set it to 0 "
                   "(sysctl kernel.io_uring_disabled=0) to use kloop")
        elif disabled == 1:
            why = ("io_uring is restricted: /proc/sys/kernel/io_uring_disabled is 1, "
                   "so only processes in the group kernel.io_uring_group (or with "
                   "CAP_SYS_ADMIN) may create rings; add this user to that group or "
                   "set the sysctl to 0")
        else:
            why = ("io_uring_setup(2) was refused (EPERM) although "
                   "kernel.io_uring_disabled allows it: a seccomp filter blocks it, "
                   "as the default profiles of recent container runtimes and many "
                   "sandboxes do; run with a seccomp profile that allows "
                   "io_uring_setup, io_uring_enter and io_uring_register")
    elif code == errno.ENOMEM:
        why = ("the ring could not be allocated (ENOMEM); on kernels before 5.12 "
               "rings count against RLIMIT_MEMLOCK: raise `ulimit -l`")
    else:
        why = f"io_uring_setup(2) failed: {reason}"
    return OSError(code, f"kloop cannot use io_uring here: {why}. Use asyncio's default "
                         f"loop where io_uring is unavailable (kloop.is_supported() tells "
                         f"in advance)")


class _OpFuture(futures._PyFuture):
    """A future for one engine operation; cancelling it cancels the operation.

    The future is also the ``_cache`` entry of its token: ``_complete`` is
    called with the final completion.

    A read's future can be cancelled even after its result was set, as long
    as nobody has taken the result yet: the task awaiting it is woken by a
    callback that runs an iteration later, and a ``task.cancel()`` in
    between would make asyncio drop the result (with the stock loops too).
    Here the result goes back to the socket's stash (``_undo``) and the
    future turns cancelled, so the next read gets the data. This is why the
    class derives from asyncio's pure-Python Future, whose state can be
    changed this way.
    """

    _undo = None          # value -> None: give a result back to the stash
    _taken = False        # result() or exception() was called

    def __init__(self, proactor, finish, keep=None, late=None):
        super().__init__(loop=proactor._loop)
        if self._source_traceback:
            del self._source_traceback[-1]
        self._proactor = proactor
        self._token = None
        self._finish = finish      # (res, data, aux) -> value, or raises
        self._keep = keep          # buffers pinned until the final completion
        self._late = late          # (res, data, aux) for a completion after cancel
        self._live = False
        self._key = None           # (fd, "r"|"w") while it orders its socket's ops
        self._conn = None
        self._submit = None
        self._from_stash = None

    def _repr_info(self):
        info = super()._repr_info()
        if self._token is not None:
            state = "pending" if self._live else "completed"
            info.insert(1, f"op=<{state}, token={self._token}>")
        return info

    def cancel(self, msg=None):
        state = self._state
        if state == "PENDING":
            if self._live:
                self._proactor._cancel_token(self._token)
            else:
                self._unpin()   # queued, never submitted
            return super().cancel(msg=msg)
        if (state == "FINISHED" and self._undo is not None and not self._taken
                and self._exception is None):
            undo = self._undo
            self._undo = None
            undo(self._result)
            self._result = None
            self._state = "CANCELLED"
            self._cancel_message = msg
            return True
        return False

    def result(self):
        self._taken = True
        return super().result()

    def _unpin(self):
        # Release the buffer exports (ffi.from_buffer) of this operation now
        # that the kernel is done with them. Leaving them to the garbage
        # collector is unsafe: when a cycle holds both a memoryview and the
        # cdata exporting it, the collector may clear the memoryview first.
        keep = self._keep
        self._keep = None
        if keep:
            for obj in keep:
                if isinstance(obj, _CData):
                    try:
                        ffi.release(obj)
                    except (TypeError, ValueError):
                        pass

    def exception(self):
        self._taken = True
        return super().exception()

    def _complete(self, res, flags, data, aux):
        if flags & _MORE:
            return
        self._live = False
        try:
            if self.done():
                late = self._late
                if late is not None and (res > 0 or (res == 0 and self._finish_zero_is_data)):
                    try:
                        late(res, data, aux)
                    except Exception:  # pragma: no cover - defensive
                        logger.exception("kloop: keeping data of a cancelled read failed")
            elif res == -_ECANCELED:
                super().cancel()
            else:
                try:
                    value = self._finish(res, data, aux)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self.set_exception(exc)
                else:
                    if value is _PENDING:
                        return
                    self.set_result(value)
        finally:
            if not self._live:
                self._unpin()
                if self._key is not None:
                    self._proactor._op_done(self)

    _finish_zero_is_data = False


class _Internal:
    """A ``_cache`` entry that calls a function instead of resolving a future."""

    __slots__ = ("_token", "_callback", "_keep", "_live")

    def __init__(self, callback, keep=None):
        self._token = None
        self._callback = callback  # (res, flags, data, aux)
        self._keep = keep
        self._live = False

    def _complete(self, res, flags, data, aux):
        if not flags & _MORE:
            self._live = False
        self._callback(res, flags, data, aux)


class _Ready:
    """A ``_cache`` entry for a one-shot poll that resolves a future (a
    C ``asyncio.Future``) with the poll's result: see IouringProactor.ready.
    It pins no memory (a poll has no buffer)."""

    __slots__ = ("_token", "_fut")

    def __init__(self, fut, token):
        self._token = token
        self._fut = fut

    def _complete(self, res, flags, data, aux):
        fut = self._fut
        if not fut.done():
            fut.set_result(res)


class _Watch:
    """An add_reader/add_writer registration: one level-triggered multishot
    poll (see IouringProactor.watch)."""

    __slots__ = ("fd", "fileobj", "events", "handle", "token", "armed", "active")

    def __init__(self, fd, fileobj, events, handle):
        self.fd = fd
        self.fileobj = fileobj
        self.events = events
        self.handle = handle
        self.token = None
        self.armed = False
        self.active = True


class IouringProactor:
    """Proactor implementation using io_uring through libkloop."""

    def __init__(self, config=None):
        lib, path = _ffi.load()
        self._lib = lib
        self._library_path = path
        self._loop = None
        self._pid = os.getpid()
        self._generation = _fork_generation
        out = ffi.new("kloop_t **")
        cfg = ffi.NULL
        env_config, cq_batch = _config_from_env()
        if config is None:
            config = env_config
        if config is not None:
            cfg = ffi.new("struct kloop_config *")
            lib.kloop_config_init(cfg)
            for key, value in config.items():
                setattr(cfg, key, value)
        rc = lib.kloop_create(cfg, out)
        if rc < 0:
            if rc == -errno.EINVAL and config is not None:
                raise ValueError(f"kloop: invalid loop configuration {config!r}")
            raise unsupported_error(rc)
        self._ptr = out[0]
        self._wake_lock = threading.Lock()
        caps = ffi.new("struct kloop_caps *")
        caps.size = ffi.sizeof("struct kloop_caps")
        self._single_issuer = (lib.kloop_get_caps(self._ptr, caps) == 0 and
                               bool(caps.enabled & _ffi.CAP_SINGLE_ISSUER))

        # bytes lent to the engine by transport.write() (kloop_stream_write_ref),
        # by ref, until its WRITE_RELEASE record
        self._lent = {}
        self._lend_seq = 0

        self._cq_len = cq_batch
        self._cq = ffi.new("struct kloop_completion[]", cq_batch)
        self._cq_view = memoryview(ffi.buffer(self._cq))
        self._iter_unpack = struct.Struct(_ffi.COMPLETION_FORMAT).iter_unpack

        base = ffi.new("uint64_t *")
        size = ffi.new("uint64_t *")
        if lib.kloop_buffer_arena(self._ptr, base, size) == 0 and size[0]:
            self._arena_base = base[0]
            self._arena = ffi.buffer(ffi.cast("char *", base[0]), size[0])
            self._arena_view = memoryview(self._arena)
        else:  # no receive buffers: streams never deliver DATA
            self._arena_base = 0
            self._arena = b""
            self._arena_view = memoryview(b"")

        self._next_token = itertools.count(1).__next__
        self._cache = {}      # token -> _OpFuture | _Internal | _Watch-owner
        self._streams = {}    # token -> stream transport
        self._stash = {}      # fd -> (weakref to socket, deque of kept items)
        self._inflight = {}   # (fd, "r"|"w") -> the _OpFuture in the kernel
        self._waiting = {}    # (fd, "r"|"w") -> deque of _OpFutures to start
        self._pool = {}       # size -> [bytearray]
        self._watches = {}    # token -> _Watch (poll in flight)
        self._readers = {}    # fd -> _Watch
        self._writers = {}    # fd -> _Watch
        self._stopped_serving = weakref.WeakSet()
        self._batch = []      # stream events and deferred completions to run
        self._owner = None    # thread that runs the ring (claim_thread)
        self._destroy_first = ()
        self._unpinned_later = ()
        self._dispatch_handle = None

    # -- misc ----------------------------------------------------------------

    def __repr__(self):
        info = [f"ops#={len(self._cache)}", f"streams#={len(self._streams)}"]
        if self._ptr is None:
            info.append("closed")
        return f"<{self.__class__.__name__} {' '.join(info)}>"

    def set_loop(self, loop):
        self._loop = loop
        # One reusable handle runs each poll's batch of stream events.
        self._dispatch_handle = events.Handle(self._dispatch, (), loop,
                                              contextvars.copy_context())

    def _check_closed(self):
        if self._ptr is None:
            raise RuntimeError("IouringProactor is closed")
        if self._generation != _fork_generation:
            raise fork_error(self._pid)

    def caps(self):
        """Return the loop's capabilities as a dict (for diagnostics)."""
        self._check_closed()
        caps = ffi.new("struct kloop_caps *")
        caps.size = ffi.sizeof("struct kloop_caps")
        rc = self._lib.kloop_get_caps(self._ptr, caps)
        if rc < 0:
            raise make_error(rc)
        names = _ffi.CAP_NAMES
        return {
            "kernel": sorted(n for b, n in names.items() if caps.kernel & b),
            "enabled": sorted(n for b, n in names.items() if caps.enabled & b),
            "features": caps.features,
            "sq_entries": caps.sq_entries,
            "cq_entries": caps.cq_entries,
            "buf_size": caps.buf_size,
            "buf_count": caps.buf_count,
        }

    def stats(self):
        """Return the engine's counters as a dict."""
        self._check_closed()
        st = ffi.new("struct kloop_stats *")
        st.size = ffi.sizeof("struct kloop_stats")
        rc = self._lib.kloop_get_stats(self._ptr, st)
        if rc < 0:
            raise make_error(rc)
        return {name: getattr(st, name) for name in (
            "ops_in_flight", "streams", "buffers_in_use", "polls", "enters", "sqes",
            "cqes", "completions", "cq_overflows", "enobufs", "direct_sends",
            "buffers_released")}

    def wake(self):
        """Make a waiting select() return; safe from any thread."""
        with self._wake_lock:
            ptr = self._ptr
            if ptr is not None and self._generation == _fork_generation:
                self._lib.kloop_wake(ptr)

    # -- registration --------------------------------------------------------

    def _register(self, entry, rc):
        """Record ``entry`` under its token once the submit call returned rc."""
        if rc < 0:
            raise make_error(rc)
        entry._live = True
        self._cache[entry._token] = entry
        return entry

    def _cancel_token(self, token, now=False):
        if self._ptr is None:
            return
        cancel = self._lib.kloop_cancel_now if now else self._lib.kloop_cancel
        rc = cancel(self._ptr, token)
        if rc < 0 and rc not in (-errno.ENOENT, -errno.EALREADY):
            raise make_error(rc)

    def _new(self, finish, keep=None, late=None):
        self._check_closed()
        fut = _OpFuture(self, finish, keep, late)
        fut._token = self._next_token()
        return fut

    def _result(self, value):
        fut = self._loop.create_future()
        fut.set_result(value)
        return fut

    def _buffer(self, size):
        pool = self._pool.get(size)
        if pool:
            return pool.pop()
        return bytearray(size)

    def _release(self, buf):
        pool = self._pool.setdefault(len(buf), [])
        if len(pool) < _POOL_KEEP:
            pool.append(buf)

    # -- the stash: data that completed after its read was cancelled --------

    def _stash_put(self, sock, item, front=False):
        fd = sock.fileno()
        if fd < 0:
            if isinstance(item, tuple) and item and isinstance(item[0], socket.socket):
                item[0].close()
            return
        entry = self._stash.get(fd)
        if entry is None or entry[0]() is not sock:
            entry = (weakref.ref(sock), collections.deque())
            self._stash[fd] = entry
        if front:
            entry[1].appendleft(item)
        else:
            entry[1].append(item)

    def _stash_get(self, sock):
        """The deque of kept items for ``sock`` or None (fast path: None)."""
        if not self._stash:
            return None
        fd = sock.fileno()
        entry = self._stash.get(fd)
        if entry is None:
            return None
        if entry[0]() is not sock or not entry[1]:
            del self._stash[fd]
            return None
        return entry[1]

    def take_stashed_bytes(self, sock):
        """Remove and return the bytes kept for a stream socket (b'' if none)."""
        q = self._stash_get(sock)
        if q is None:
            return b""
        del self._stash[sock.fileno()]
        return b"".join(item[0] for item in q if isinstance(item[0], (bytes, bytearray)))

    # -- reads ---------------------------------------------------------------

    # -- per-socket ordering -------------------------------------------------
    #
    # A read whose cancel was requested may still complete with data (kept
    # in the stash). A read started on the same socket meanwhile would race
    # it in the kernel and could get later bytes first, so reads on one
    # socket (and likewise sends) are started one at a time: a new one waits
    # until the previous one's final completion, then looks at the stash
    # before it goes to the kernel.

    def _start(self, fut, kind, attempt=None):
        conn = fut._conn
        key = (_fileno(conn), kind)
        cur = self._inflight.get(key)
        if cur is not None and cur._conn is conn:
            waiters = self._waiting.get(key)
            if waiters is None:
                waiters = self._waiting[key] = collections.deque()
            waiters.append(fut)
            return fut
        err = self._begin(fut, key, attempt)
        if err is not None:
            raise err
        return fut

    def _begin(self, fut, key, attempt=None):
        """Serve ``fut`` from the stash, or at once, or submit it; returns an
        exception on failure.

        ``attempt`` (sock_* calls on non-blocking sockets) makes the system
        call at once, as asyncio's selector loop does: when the data or the
        connection is already there, the result is ready in the same
        iteration, and only a call that would block goes to the ring.
        """
        from_stash = fut._from_stash
        if from_stash is not None:
            q = self._stash_get(fut._conn)
            if q is not None:
                try:
                    fut.set_result(from_stash(q))
                except Exception as exc:  # pragma: no cover - defensive
                    return exc
                finally:
                    fut._unpin()
                return None
        if attempt is not None:
            try:
                value = attempt()
            except (BlockingIOError, InterruptedError):
                pass
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                fut.set_exception(exc)
                fut._unpin()
                return None
            else:
                if value is not _PENDING:
                    fut.set_result(value)
                    fut._unpin()
                    return None
        rc = fut._submit(fut._token)
        if rc < 0:
            fut._unpin()
            return make_error(rc)
        fut._live = True
        fut._key = key
        self._cache[fut._token] = fut
        self._inflight[key] = fut
        return None

    def _op_done(self, fut):
        key = fut._key
        fut._key = None
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        waiters = self._waiting.get(key)
        if waiters is None:
            return
        while waiters and key not in self._inflight:
            nxt = waiters.popleft()
            if nxt.done():
                continue
            if nxt._conn.fileno() != key[0]:
                nxt.set_exception(OSError(errno.EBADF, os.strerror(errno.EBADF)))
                continue
            err = self._begin(nxt, key)
            if err is not None:
                nxt.set_exception(err)
        if not waiters:
            self._waiting.pop(key, None)

    def _read_fut(self, conn, finish, keep, late, submit, from_stash, attempt=None,
                  undo=None):
        fut = self._new(finish, keep, late)
        fut._conn = conn
        fut._submit = submit
        fut._from_stash = from_stash
        fut._undo = undo
        return self._start(fut, "r", attempt)

    def _undo_bytes(self, conn):
        # Give a taken-back result of recv()/recvfrom() to the stash. An
        # end of stream (b'' on a stream socket) is not data: recv(2) keeps
        # returning it.
        stream = not isinstance(conn, socket.socket) or conn.type == socket.SOCK_STREAM

        def undo(value):
            data, addr = value if isinstance(value, tuple) else (value, None)
            if data or not stream:
                self._stash_put(conn, (data, addr), front=True)
        return undo

    def _undo_into(self, conn, buf):
        stream = not isinstance(conn, socket.socket) or conn.type == socket.SOCK_STREAM

        def undo(value):
            n, addr = value if isinstance(value, tuple) else (value, None)
            if n or not stream:
                with memoryview(buf) as view, view.cast("B") as raw:
                    data = bytes(raw[:n])
                self._stash_put(conn, (data, addr), front=True)
        return undo

    @staticmethod
    def _can_try(conn, try_now):
        return try_now and isinstance(conn, socket.socket) and conn.gettimeout() == 0

    # -- reads ---------------------------------------------------------------

    def _take_bytes(self, conn, q, nbytes):
        data, addr = q.popleft()
        if len(data) > nbytes:
            if not isinstance(conn, socket.socket) or conn.type == socket.SOCK_STREAM:
                q.appendleft((data[nbytes:], addr))
            # datagrams: the rest is discarded, as recv(2) does
            data = data[:nbytes]
        if not q:
            self._stash.pop(conn.fileno(), None)
        return data, addr

    def _addr_of(self, data, aux):
        alen = aux & 0xFFFF
        if not data or not alen:
            return None
        return _sockaddr.decode(ffi.unpack(ffi.cast("char *", data), alen))

    def recv(self, conn, nbytes, flags=0, try_now=False):
        self._check_closed()
        fd = _fileno(conn)
        buf = self._buffer(nbytes)
        cbuf = ffi.from_buffer(buf)
        lib = self._lib
        is_socket = isinstance(conn, socket.socket)

        def submit(token):
            if is_socket:
                return lib.kloop_submit_recv(self._ptr, token, fd, cbuf, nbytes, flags)
            return lib.kloop_submit_read(self._ptr, token, fd, cbuf, nbytes, _OFFSET_CURRENT)

        def finish(res, data, aux):
            if res < 0:
                self._release(buf)
                raise make_error(res)
            out = _head(buf, res) if res != nbytes else bytes(buf)
            self._release(buf)
            return out

        def late(res, data, aux):
            self._stash_put(conn, (_head(buf, res), None))
            self._release(buf)

        def from_stash(q):
            self._release(buf)
            return self._take_bytes(conn, q, nbytes)[0]

        attempt = None
        if self._can_try(conn, try_now):
            def attempt():
                return conn.recv(nbytes, flags)

        return self._read_fut(conn, finish, (buf, cbuf, conn), late, submit, from_stash,
                              attempt, self._undo_bytes(conn))

    def recv_into(self, conn, buf, flags=0, try_now=False):
        self._check_closed()
        _check_writable(buf, "recv_into")
        fd = _fileno(conn)
        cbuf = ffi.from_buffer(buf, require_writable=True)
        nbytes = len(cbuf)
        lib = self._lib
        is_socket = isinstance(conn, socket.socket)

        def submit(token):
            if is_socket:
                return lib.kloop_submit_recv(self._ptr, token, fd, cbuf, nbytes, flags)
            return lib.kloop_submit_read(self._ptr, token, fd, cbuf, nbytes, _OFFSET_CURRENT)

        def finish(res, data, aux):
            if res < 0:
                raise make_error(res)
            return res

        def late(res, data, aux):
            self._stash_put(conn, (ffi.buffer(cbuf, res)[:], None))

        def from_stash(q):
            data = self._take_bytes(conn, q, nbytes)[0]
            ffi.memmove(cbuf, data, len(data))
            return len(data)

        attempt = None
        if self._can_try(conn, try_now):
            def attempt():
                return conn.recv_into(buf, nbytes, flags)

        return self._read_fut(conn, finish, (buf, cbuf, conn), late, submit, from_stash,
                              attempt, self._undo_into(conn, buf))

    def recvfrom(self, conn, nbytes, flags=0, try_now=False):
        self._check_closed()
        if conn.family not in _CODEC_FAMILIES:
            return self._readiness(conn, _POLLIN, lambda: conn.recvfrom(nbytes, flags))
        fd = _fileno(conn)
        buf = self._buffer(nbytes)
        cbuf = ffi.from_buffer(buf)
        lib = self._lib

        def submit(token):
            return lib.kloop_submit_recvmsg(self._ptr, token, fd, cbuf, nbytes, flags)

        def finish(res, data, aux):
            if res < 0:
                self._release(buf)
                raise make_error(res)
            out = _head(buf, res)
            self._release(buf)
            return out, self._addr_of(data, aux)

        def late(res, data, aux):
            self._stash_put(conn, (_head(buf, res), self._addr_of(data, aux)))
            self._release(buf)

        def from_stash(q):
            self._release(buf)
            return self._take_bytes(conn, q, nbytes)

        attempt = None
        if self._can_try(conn, try_now):
            def attempt():
                return conn.recvfrom(nbytes, flags)

        fut = self._new(finish, (buf, cbuf, conn), late)
        fut._finish_zero_is_data = conn.type != socket.SOCK_STREAM  # empty datagrams count
        fut._undo = self._undo_bytes(conn)
        fut._conn = conn
        fut._submit = submit
        fut._from_stash = from_stash
        return self._start(fut, "r", attempt)

    def recvfrom_into(self, conn, buf, flags=0, try_now=False):
        self._check_closed()
        _check_writable(buf, "recvfrom_into")
        if conn.family not in _CODEC_FAMILIES:
            return self._readiness(conn, _POLLIN, lambda: conn.recvfrom_into(buf, 0, flags))
        fd = _fileno(conn)
        cbuf = ffi.from_buffer(buf, require_writable=True)
        nbytes = len(cbuf)
        lib = self._lib

        def submit(token):
            return lib.kloop_submit_recvmsg(self._ptr, token, fd, cbuf, nbytes, flags)

        def finish(res, data, aux):
            if res < 0:
                raise make_error(res)
            return res, self._addr_of(data, aux)

        def late(res, data, aux):
            self._stash_put(conn, (ffi.buffer(cbuf, res)[:], self._addr_of(data, aux)))

        def from_stash(q):
            data, addr = self._take_bytes(conn, q, nbytes)
            ffi.memmove(cbuf, data, len(data))
            return len(data), addr

        attempt = None
        if self._can_try(conn, try_now):
            def attempt():
                return conn.recvfrom_into(buf, nbytes, flags)

        fut = self._new(finish, (buf, cbuf, conn), late)
        fut._finish_zero_is_data = conn.type != socket.SOCK_STREAM
        fut._undo = self._undo_into(conn, buf)
        fut._conn = conn
        fut._submit = submit
        fut._from_stash = from_stash
        return self._start(fut, "r", attempt)

    # -- writes --------------------------------------------------------------

    def send(self, conn, buf, flags=0, try_now=False):
        """Send all of ``buf`` (stream sockets and pipes: short writes are
        resubmitted; datagram sockets: one datagram). Result: bytes sent."""
        self._check_closed()
        if _unix_dgram(conn):
            return self._readiness(conn, _POLLOUT, lambda: conn.send(buf, flags))
        fd = _fileno(conn)
        cbuf = buf if isinstance(buf, bytes) else ffi.from_buffer(buf)
        total = len(buf) if isinstance(buf, bytes) else len(cbuf)
        is_socket = isinstance(conn, socket.socket)
        whole = not is_socket or conn.type == socket.SOCK_STREAM
        lib = self._lib
        state = [0, None]  # bytes sent, pointer cdata for resubmission

        def submit_at(token, offset):
            if offset:
                if state[1] is None:
                    state[1] = ffi.from_buffer(buf)
                    keep.append(state[1])
                ptr = state[1] + offset
            else:
                ptr = cbuf
            if is_socket:
                return lib.kloop_submit_send(self._ptr, token, fd, ptr, total - offset, flags)
            return lib.kloop_submit_write(self._ptr, token, fd, ptr, total - offset,
                                          _OFFSET_CURRENT)

        def finish(res, data, aux):
            if res < 0:
                raise make_error(res)
            state[0] += res
            if whole and state[0] < total and res > 0:
                rc = submit_at(fut._token, state[0])
                if rc < 0:
                    raise make_error(rc)
                fut._live = True
                self._cache[fut._token] = fut
                return _PENDING
            return state[0]

        attempt = None
        if self._can_try(conn, try_now):
            def attempt():
                n = conn.send(buf, flags)
                if n >= total or not whole:
                    return n
                state[0] = n
                return _PENDING

        keep = [buf, cbuf, conn]
        fut = self._new(finish, keep)
        fut._conn = conn
        fut._submit = lambda token: submit_at(token, state[0])
        return self._start(fut, "w", attempt)

    def sendto(self, conn, buf, flags=0, addr=None, try_now=False):
        self._check_closed()
        if _unix_dgram(conn):
            if addr is None:
                return self._readiness(conn, _POLLOUT, lambda: conn.send(buf, flags))
            return self._readiness(conn, _POLLOUT, lambda: conn.sendto(buf, flags, addr))
        if addr is not None and conn.family not in _CODEC_FAMILIES:
            return self._readiness(conn, _POLLOUT, lambda: conn.sendto(buf, flags, addr))
        fd = _fileno(conn)
        if addr is None:
            raw = ffi.NULL
            rawlen = 0
        else:
            raw = _sockaddr.encode(conn.family, addr)
            rawlen = len(raw)
        cbuf = buf if isinstance(buf, bytes) else ffi.from_buffer(buf)
        length = len(buf) if isinstance(buf, bytes) else len(cbuf)
        lib = self._lib

        def finish(res, data, aux):
            if res < 0:
                raise make_error(res)
            return res

        attempt = None
        if self._can_try(conn, try_now):
            if addr is None:
                def attempt():
                    return conn.send(buf, flags)
            else:
                def attempt():
                    return conn.sendto(buf, flags, addr)

        fut = self._new(finish, (buf, cbuf, conn))
        fut._conn = conn
        fut._submit = lambda token: lib.kloop_submit_sendmsg(
            self._ptr, token, fd, cbuf, length, raw, rawlen, flags)
        return self._start(fut, "w", attempt)

    # -- connections ---------------------------------------------------------

    def accept(self, listener, try_now=False):
        self._check_closed()
        fd = _fileno(listener)
        family, type_, proto = listener.family, listener.type, listener.proto
        lib = self._lib

        def make(res, data, aux):
            conn = socket.socket(family, type_, proto, fileno=res)
            conn.settimeout(listener.gettimeout())
            addr = None
            if data and aux:
                try:
                    addr = _sockaddr.decode(ffi.unpack(ffi.cast("char *", data), aux))
                except NotImplementedError:
                    addr = None
            if addr is None:
                try:
                    addr = conn.getpeername()
                except OSError:
                    addr = None
            return conn, addr

        def finish(res, data, aux):
            if res < 0:
                raise make_error(res)
            return make(res, data, aux)

        def late(res, data, aux):
            self._stash_put(listener, make(res, data, aux))

        def from_stash(q):
            item = q.popleft()
            if not q:
                self._stash.pop(listener.fileno(), None)
            return item

        attempt = None
        if self._can_try(listener, try_now):
            def attempt():
                return listener.accept()

        def undo(item):
            self._stash_put(listener, item, front=True)

        return self._read_fut(listener, finish, (listener,), late,
                              lambda token: lib.kloop_submit_accept(self._ptr, token, fd, 0),
                              from_stash, attempt, undo)

    def connect(self, conn, address):
        """Connect ``conn``; result None.

        connect(2) is called at once (non-blocking), and only the wait for
        its outcome goes through the ring (a poll for writability, then
        SO_ERROR), exactly as the selector loop does it. An io_uring connect
        would start only at the next loop iteration, and code that connects
        and then, in the same iteration, expects the peer to see the
        connection (a listener's blocking accept()) would hang.
        """
        self._check_closed()
        if conn.type == socket.SOCK_DGRAM:
            # Connecting a datagram socket does no I/O.
            conn.connect(address)
            return self._result(None)
        try:
            conn.connect(address)
        except (BlockingIOError, InterruptedError):
            pass
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            fut = self._loop.create_future()
            fut.set_exception(exc)
            return fut
        else:
            return self._result(None)

        def check():
            err = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err != 0:
                # Worded as asyncio's selector loop words it.
                raise OSError(err, f"Connect call failed {address}")

        return self._readiness(conn, _POLLOUT, check)

    def sendfile(self, sock, file, offset, count):
        """Send ``count`` bytes of ``file`` from ``offset`` (os.sendfile(2),
        waiting for writability on the ring). Result: bytes sent."""
        self._check_closed()
        in_fd = file.fileno()
        out_fd = _fileno(sock)
        fut = self._loop.create_future()
        state = [offset, 0]
        holder = [None]

        def attempt(res=0, flags=0, data=0, aux=0):
            holder[0] = None
            if fut.done():
                return
            if res < 0 and res != -_ECANCELED:
                fut.set_exception(make_error(res))
                return
            while state[1] < count:
                try:
                    sent = os.sendfile(out_fd, in_fd, state[0], count - state[1])
                except (BlockingIOError, InterruptedError):
                    holder[0] = self._poll_internal(out_fd, _POLLOUT, attempt)
                    return
                except OSError as exc:
                    fut.set_exception(exc)
                    return
                if sent == 0:
                    break
                state[0] += sent
                state[1] += sent
            fut.set_result(state[1])

        def on_done(f):
            if f.cancelled() and holder[0] is not None:
                self._cancel_token(holder[0])

        fut.add_done_callback(on_done)
        attempt()
        return fut

    # -- readiness helpers ---------------------------------------------------

    def _poll_internal(self, fd, events, callback, keep=None):
        """One-shot poll calling ``callback(res, flags, data, aux)``; returns the token."""
        entry = _Internal(callback, keep)
        entry._token = self._next_token()
        rc = self._lib.kloop_submit_poll(self._ptr, entry._token, fd, events, 0)
        self._register(entry, rc)
        return entry._token

    def ready(self, fd, events):
        """(future, token): the future gets the revents (or -errno) of a
        one-shot poll of ``fd`` for ``events``; cancel the poll with
        ``cancel_ready(token)`` when the future is abandoned."""
        self._check_closed()
        fut = self._loop.create_future()
        token = self._next_token()
        rc = self._lib.kloop_submit_poll(self._ptr, token, fd, events, 0)
        if rc < 0:
            raise make_error(rc)
        self._cache[token] = _Ready(fut, token)
        return fut, token

    def cancel_ready(self, token):
        if token in self._cache:
            self._cancel_token(token)

    def _readiness(self, conn, events, call):
        """Future of ``call()`` run once ``conn`` is ready: for families and
        calls the engine has no operation for."""
        self._check_closed()
        fut = self._loop.create_future()
        holder = [None]

        def attempt(res=0, flags=0, data=0, aux=0):
            holder[0] = None
            if fut.done():
                return
            try:
                value = call()
            except (BlockingIOError, InterruptedError):
                holder[0] = self._poll_internal(_fileno(conn), events, attempt)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(value)

        def on_done(f):
            if f.cancelled() and holder[0] is not None:
                self._cancel_token(holder[0])

        fut.add_done_callback(on_done)
        holder[0] = self._poll_internal(_fileno(conn), events, attempt)
        return fut

    # -- add_reader / add_writer ---------------------------------------------
    #
    # The selector loop calls a reader's handle on every iteration in which
    # the fd is readable (level-triggered). The kernel's multishot poll
    # reports wake-ups (edge-like): a reader that leaves data behind would
    # never hear of it again. The engine's level-triggered multishot poll
    # (KLOOP_OP_MULTISHOT without KLOOP_POLL_EDGE) re-arms a one-shot poll
    # after each report, at the next kloop_poll() -- after the handle queued
    # here has run -- and arming checks readiness at once. The re-arm is one
    # SQE in the next poll's submission, not a system call of its own.

    def watch(self, fd, fileobj, events, handle):
        """Register (or replace the handle of) a reader/writer on ``fd``."""
        self._check_closed()
        table = self._readers if events == selectors.EVENT_READ else self._writers
        w = table.get(fd)
        if w is not None:
            old = w.handle
            w.handle = handle
            w.fileobj = fileobj
            if old is not None and old is not handle:
                old.cancel()
            return
        w = _Watch(fd, fileobj, events, handle)
        table[fd] = w
        self._arm(w)

    def unwatch(self, fd, events):
        """Remove a reader/writer; True if there was one."""
        table = self._readers if events == selectors.EVENT_READ else self._writers
        w = table.pop(fd, None)
        if w is None:
            return False
        w.active = False
        if w.handle is not None:
            w.handle.cancel()
        if w.armed and self._ptr is not None:
            self._cancel_token(w.token)
        return True

    def get_key(self, fd):
        """selectors-style key of the readers/writers on ``fd`` (KeyError if none)."""
        r = self._readers.get(fd)
        w = self._writers.get(fd)
        if r is None and w is None:
            raise KeyError(f"{fd!r} is not registered")
        events = (selectors.EVENT_READ if r else 0) | (selectors.EVENT_WRITE if w else 0)
        fileobj = (r or w).fileobj
        return selectors.SelectorKey(fileobj, fd, events,
                                     (r.handle if r else None, w.handle if w else None))

    def _arm(self, w):
        token = self._next_token()
        poll_events = _POLLIN if w.events == selectors.EVENT_READ else _POLLOUT
        rc = self._lib.kloop_submit_poll(self._ptr, token, w.fd, poll_events,
                                         _ffi.OP_MULTISHOT)
        if rc < 0:
            raise make_error(rc)
        w.token = token
        w.armed = True
        self._watches[token] = w

    def _watch_fired(self, w, res, more):
        if not more:
            w.armed = False
        if not w.active:
            return
        if res < 0:
            if res != -_ECANCELED:
                # The fd is gone (EBADF) or cannot be polled: epoll would
                # have dropped it silently; stay registered, never fire.
                logger.debug("kloop: poll on fd %d failed: %s", w.fd, os.strerror(-res))
            return
        handle = w.handle
        if handle._cancelled:
            # As the selector loop: a cancelled handle unregisters itself.
            self.unwatch(w.fd, w.events)
            return
        self._loop._ready.append(handle)
        if not more:
            self._arm(w)

    # -- streams -------------------------------------------------------------

    def stream_attach(self, transport, fd, flags):
        """Attach ``fd`` as an engine stream reporting to ``transport``."""
        self._check_closed()
        token = self._next_token()
        rc = self._lib.kloop_stream_attach(self._ptr, token, fd, flags)
        if rc < 0:
            raise make_error(rc)
        self._streams[token] = transport
        return token

    # -- the poll ------------------------------------------------------------

    def select(self, timeout=None, *, _defer=True):
        """Poll the ring once and queue what completed.

        add_reader/add_writer handles are appended to the ready queue here,
        as the selector loop's _process_events() does. Everything else --
        stream events, operation results -- is batched and run by one handle
        appended to the ready queue: in the selector loop the I/O callback
        that resolves a sock_recv() future or calls data_received() runs
        after the callbacks that were already ready, and code relies on it
        (a task cancelled by an earlier callback of the same iteration must
        see its read not done yet, so that the data is not lost).
        """
        ptr = self._ptr
        if ptr is None:
            raise RuntimeError("IouringProactor is closed")
        if self._batch:
            # An earlier iteration was interrupted before its batch ran: run
            # it now, while the buffers it points into are still valid.
            self._dispatch()
        if timeout is None:
            tns = -1
        elif timeout <= 0:
            tns = 0
        else:
            tns = math.ceil(timeout * 1e9)
        n = self._lib.kloop_poll(ptr, self._cq, self._cq_len, tns)
        if n <= 0:
            if n == 0 or n == -_EINTR:
                return ()
            if n == -_EBADFD or self._generation != _fork_generation:
                raise fork_error(self._pid)
            raise make_error(n)
        cache = self._cache
        batch = self._batch
        for rec in self._iter_unpack(self._cq_view[:n << 5]):
            if rec[4]:
                batch.append(rec)
                continue
            tok = rec[0]
            if rec[2] & _MORE:
                entry = cache.get(tok)
            else:
                entry = cache.pop(tok, None)
            if entry is not None:
                batch.append((entry, rec[1], rec[2], rec[3], 0, rec[5]))
                continue
            if rec[2] & _MORE:
                w = self._watches.get(tok)
                if w is not None:
                    self._watch_fired(w, rec[1], True)
            else:
                w = self._watches.pop(tok, None)
                if w is not None:
                    self._watch_fired(w, rec[1], False)
        if batch:
            if _defer:
                self._loop._ready.append(self._dispatch_handle)
            else:
                self._dispatch()
        return ()

    def _dispatch(self):
        """Run the stream events and deferred completions of the last poll."""
        batch = self._batch
        if not batch:
            return
        self._batch = []
        it = iter(batch)
        try:
            self._dispatch_records(it)
        except BaseException:
            # KeyboardInterrupt or SystemExit from a protocol callback: keep
            # the records not run yet (a CLOSED among them must not be lost)
            # for the next select(), which runs them before it polls.
            rest = list(it)
            if rest:
                self._batch = rest + self._batch
            raise

    def _join_run(self, it, off, res):
        """The bytes of a run of DATA records of one stream, as one object.

        The engine flags (KLOOP_COMPLETION_DATA_NEXT) every record of the run
        but its last, so the records that follow in `it` are this stream's:
        a message larger than one receive buffer reaches data_received() in
        one call, as it does from the stock loop's 256 KiB reads. Like those,
        a piece stops at 256 KiB: records held while reading was paused can
        make a run of megabytes, and the rest of it makes further pieces.
        """
        view = self._arena_view
        base = self._arena_base
        parts = [view[off:off + res]]
        size = res
        for rec in it:
            off = rec[3] - base
            parts.append(view[off:off + rec[1]])
            size += rec[1]
            if not rec[2] & 2 or size >= _JOIN_MAX:
                break
        return b"".join(parts)

    def _run_views(self, it, off, res):
        """Views of the arena over a run of DATA records of one stream (see
        _join_run), the first at `off`, `res` bytes; the rest taken from `it`."""
        view = self._arena_view
        base = self._arena_base
        views = [view[off:off + res]]
        for rec in it:
            off = rec[3] - base
            views.append(view[off:off + rec[1]])
            if not rec[2] & 2:
                break
        return views

    def _dispatch_records(self, it):
        get = self._streams.get
        base = self._arena_base
        arena = self._arena
        lent = self._lent
        for tok, res, flags, data, ev, aux in it:
            if ev == 1:                                  # KLOOP_EVENT_DATA
                t = get(tok)
                if t is not None:
                    if t._fast:
                        # protocol.data_received(bytes) in the transport's
                        # context, without a Python frame in between.
                        off = data - base
                        if flags & 2:                    # KLOOP_COMPLETION_DATA_NEXT
                            chunk = self._join_run(it, off, res)
                        else:
                            chunk = arena[off:off + res]
                        try:
                            t._context_run(t._protocol_data_received, chunk)
                        except (SystemExit, KeyboardInterrupt):
                            raise
                        except BaseException as exc:
                            t._fatal_error(exc, "Fatal error: protocol.data_received() "
                                                "call failed.")
                    elif flags & 2 and t._buffered and not t._rblock:
                        # A run of this stream's records: into the
                        # protocol's buffers without a bytes in between.
                        t._feed_buffered_run(self._run_views(it, data - base, res))
                    else:
                        t._data_received(data - base, res)
            elif ev == 0:
                tok._complete(res, flags, data, aux)     # an operation's entry
            elif ev == 5:                                # KLOOP_EVENT_CLOSED
                t = self._streams.pop(tok, None)
                if t is not None:
                    t._on_closed(res)
            elif ev == 8:                                # KLOOP_EVENT_WRITE_RELEASE
                lent.pop(data, None)
            else:
                t = get(tok)
                if t is not None:
                    if ev == 2:                          # KLOOP_EVENT_EOF
                        t._on_eof(aux)
                    elif ev == 4:                        # KLOOP_EVENT_WRITE_LOW
                        t._on_write_low()
                    elif ev == 3:                        # KLOOP_EVENT_ERROR
                        t._on_error(res, aux)
                    elif ev == 6:                        # KLOOP_EVENT_WRITE_DONE
                        t._on_write_done(res)
                    elif ev == 7:                        # KLOOP_EVENT_HANDSHAKE
                        t._on_handshake(res, aux)

    # -- shutdown ------------------------------------------------------------

    def _stop_serving(self, obj):
        self._stopped_serving.add(obj)

    def close(self):
        if self._ptr is None:
            return
        if self._generation != _fork_generation:
            # Forked child: the engine frees user-space memory only.
            self._lib.kloop_destroy(self._ptr)
            with self._wake_lock:
                self._ptr = None
            self._cache.clear()
            self._lent.clear()
            self._streams.clear()
            return

        for w in list(self._readers.values()) + list(self._writers.values()):
            self.unwatch(w.fd, w.events)
        for waiters in list(self._waiting.values()):
            for fut in waiters:
                fut.cancel()
        self._waiting.clear()
        for entry in list(self._cache.values()):
            if isinstance(entry, _OpFuture):
                if not entry.cancelled():
                    try:
                        entry.cancel()
                    except OSError as exc:
                        if self._loop is not None:
                            self._loop.call_exception_handler({
                                "message": "Cancelling a future failed",
                                "exception": exc,
                                "future": entry,
                            })
                else:
                    self._cancel_token(entry._token)
            else:
                self._cancel_token(entry._token)
        for token, transport in list(self._streams.items()):
            transport._proactor_closing()
            rc = self._lib.kloop_stream_abort(self._ptr, token)
            if rc < 0 and rc != -errno.EALREADY:
                logger.debug("kloop: aborting stream %d failed: %s", token, os.strerror(-rc))

        # Wait until the kernel has let go of every buffer handed to it.
        if self._foreign_thread():
            # Only the thread that runs the ring may poll it: let
            # kloop_destroy() reap everything, then finish on our side.
            self._finish_unpolled()
        else:
            msg_update = 1.0
            start_time = time.monotonic()
            next_msg = start_time + msg_update
            while self._cache or self._streams or self._watches:
                now = time.monotonic()
                if next_msg <= now:
                    logger.debug("%r is running after closing for %.1f seconds",
                                 self, now - start_time)
                    next_msg = now + msg_update
                if now - start_time > CLOSE_TIMEOUT:
                    # A final completion that never comes would be an engine
                    # bug; kloop_destroy() still reaps what the kernel holds.
                    logger.error("kloop: %d operations and %d streams still had no final "
                                 "completion %.0f s after closing; destroying the ring",
                                 len(self._cache) + len(self._watches), len(self._streams),
                                 CLOSE_TIMEOUT)
                    self._finish_unpolled()
                    break
                try:
                    self.select(msg_update, _defer=False)
                except OSError as exc:  # pragma: no cover - engine failure
                    logger.error("kloop: polling while closing failed: %s", exc)
                    self._finish_unpolled()
                    break

        for fd, (ref, q) in list(self._stash.items()):
            for item in q:
                if isinstance(item, tuple) and item and isinstance(item[0], socket.socket):
                    item[0].close()
        self._stash.clear()
        self._pool.clear()
        with self._wake_lock:
            ptr = self._ptr
            self._ptr = None
        self._lib.kloop_destroy(ptr)
        # The engine reads no lent bytes any more (no release records come).
        self._lent.clear()
        # Streams finished without their CLOSED event: the engine has let go
        # of their fds now.
        streams, self._destroy_first = self._destroy_first, ()
        for transport in streams:
            transport._on_closed(-_ECANCELED)
        for entry in self._unpinned_later:
            entry._unpin()
        self._unpinned_later = ()

    # -- threads ---------------------------------------------------------------
    #
    # With IORING_SETUP_SINGLE_ISSUER (the default where the kernel has it)
    # a ring belongs to the thread that first polls it; the kernel refuses
    # the others. asyncio lets any thread run a loop in turn, and close it.
    # The first is refused with a clear error (a loop for that is made with
    # KLOOP_CONFIG_NO_DEFER_TASKRUN); the second works.

    def claim_thread(self):
        """Called by the loop when it starts running in the current thread."""
        ident = threading.get_ident()
        if self._owner is None:
            self._owner = ident
        elif self._owner != ident and self._single_issuer:
            raise RuntimeError(
                "kloop: this loop's io_uring ring belongs to the thread that ran it "
                "first, and the kernel refuses it to other threads "
                "(IORING_SETUP_SINGLE_ISSUER); run the loop from that thread, or "
                "create it with kloop.IouringProactorEventLoop(kloop.IouringProactor("
                "config={'flags': kloop._ffi.CONFIG_NO_DEFER_TASKRUN})) to use it "
                "from several threads in turn")

    def _foreign_thread(self):
        return (self._single_issuer and self._owner is not None
                and self._owner != threading.get_ident())

    def _finish_unpolled(self):
        # kloop_destroy() will cancel and reap everything; what Python holds
        # is finished here as if the final completions had come.
        later = []
        for entry in list(self._cache.values()):
            if isinstance(entry, _OpFuture):
                entry._live = False
                entry._key = None
                later.append(entry)
        self._unpinned_later = later
        self._cache.clear()
        self._watches.clear()
        self._inflight.clear()
        streams = list(self._streams.values())
        self._streams.clear()
        self._batch = []
        self._destroy_first = streams

    def __del__(self):
        if getattr(self, "_ptr", None) is not None:
            try:
                self.close()
            except Exception:  # pragma: no cover
                pass


def _check_writable(buf, what):
    # The TypeError socket.recv_into() raises for a read-only buffer.
    try:
        with memoryview(buf) as view:
            readonly = view.readonly
    except TypeError:
        readonly = True
    if readonly:
        raise TypeError(f"{what}() argument 'buffer' must be read-write bytes-like "
                        f"object, not {type(buf).__name__}")


def _unix_dgram(conn):
    """True for a Unix datagram socket. io_uring's send on one whose receiver
    is full waits and then sends the datagram empty (result 0; seen on
    kernel 6.18 with plain liburing too), so such sockets send with send(2)
    after the ring reports them writable."""
    return (isinstance(conn, socket.socket) and conn.family == socket.AF_UNIX
            and conn.type == socket.SOCK_DGRAM)


def _head(buf, n):
    """bytes of the first n bytes of bytearray `buf`, copied once (bytes(buf[:n])
    copies twice: the slice is a bytearray of its own)."""
    with memoryview(buf) as m:
        return bytes(m[:n])


def _fileno(obj):
    fd = obj if isinstance(obj, int) else obj.fileno()
    if fd < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    return fd
