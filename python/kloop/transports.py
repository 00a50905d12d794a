"""Engine-driven stream transports for TCP and Unix sockets.

The engine reads into its receive buffers and writes from its own queue
(``kloop_stream_*``); this transport only relays events to the protocol.
It keeps the socket object (the stream is attached without
KLOOP_STREAM_CLOSE_FD) and closes it after the engine's CLOSED event, so
the fd is never closed while the kernel still has an operation on it.

Behaviour follows asyncio's selector socket transport
(Lib/asyncio/selector_events.py, _SelectorSocketTransport): when
connection_made(), data_received(), eof_received() and connection_lost()
are called, what a write after close does, flow control, and the
ResourceWarning of a transport that was never closed.

Differences in timing, not in order: the bytes given to write() are
copied into the engine's queue and sent at the next loop iteration (the
selector transport tries a send(2) at once); connection_lost() is called
on the iteration after close() when nothing is queued, as asyncio does, but
the socket itself is closed once the engine has let go of it.
"""

import collections
import contextvars
import errno
import os
import selectors
import socket
import ssl
import sys
import warnings

from asyncio import base_events
from asyncio import constants
from asyncio import exceptions
from asyncio import futures
from asyncio import protocols
from asyncio import sslproto
from asyncio import transports
from asyncio import trsock
from asyncio.log import logger

from . import _ffi
from ._errors import make_error

__all__ = ("SocketTransport", "SSLEngineTransport", "TLSTransport")

_STREAM_PAUSED = _ffi.STREAM_PAUSED
_ENOENT = errno.ENOENT
_EPIPE = errno.EPIPE
_from_buffer = _ffi.ffi.from_buffer
_release = _ffi.ffi.release
_EVENT_READ = selectors.EVENT_READ
_MSG_DONTWAIT = socket.MSG_DONTWAIT


def _call(fn):
    return fn()


# Held read events (while reading is paused): kinds
_H_DATA = 0
_H_EOF = 1
_H_ERROR = 2


# The connections a server accepts share their local address, and the
# peers' addresses share the host: equal, immutable values kept once
# instead of once per connection (~200 bytes of each idle connection).
# The last value of each kind is remembered, so nothing grows with the
# number of distinct addresses. (Loops in other threads may race here;
# the worst case is a value not shared.)
_last_address = [None, None, None]   # sockname, peername, host
_SOCKNAME, _PEERNAME = 0, 1


def _shared_address(addr, which):
    if type(addr) is not tuple or len(addr) < 2:
        return addr
    last = _last_address[which]
    if addr == last:
        return last
    host = addr[0]
    if type(host) is str:
        if host == _last_address[2]:
            addr = (_last_address[2],) + addr[1:]
        else:
            _last_address[2] = host
    _last_address[which] = addr
    return addr


class SocketTransport(transports._FlowControlMixin, transports.Transport):
    """A connected stream socket driven by a kloop engine stream."""

    # Slots: a plain instance of 3.11 keeps its attributes in a shared-key
    # dict only up to 30 of them; past that every transport gets a dict of
    # its own (~1.5 KiB per connection). `__dict__` stays for subclasses and
    # for code that sets attributes of its own on a transport.
    __slots__ = (
        "_arena", "_arena_view", "_buffered", "_called_connection_lost",
        "_close_pending", "_closing", "_conn_lost", "_context_run", "_drain_limits",
        "_empty_waiter", "_engine_closed", "_eof", "_fast", "_held", "_klib", "_kptr",
        "_kwrite", "_loop_closing", "_paused", "_protocol", "_protocol_connected",
        "_protocol_data_received", "_rblock_", "_read_done", "_rmode", "_rwatching",
        "_server", "_sock", "_sock_fd", "_started", "_token", "_wok", "__dict__",
        "__weakref__")

    # Whether a BufferedProtocol may read by readiness (see _read_ready);
    # not for TLS, where the engine must see every byte.
    _readiness_ok = True

    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE

    # bytes objects this large are lent to the engine, not copied
    # (kloop_stream_write_ref). Smaller ones go to kloop_stream_write(),
    # which sends a write of 16 KiB or more to an idle stream at once and
    # copies only what waits: a lent object would live until its send
    # completes, and a server answering many streams would free many
    # together, which makes glibc trim and regrow its heap (a brk and page
    # faults per answer). From 1 MiB, objects come from mmap, not the heap,
    # and copying them is what costs. docs/design.md, "Lent writes".
    _lend_min = 1 << 20

    def __init__(self, loop, sock, protocol, waiter=None, extra=None, server=None,
                 context=None):
        self._init_stream(loop, sock, protocol, extra, server, context)
        self._loop.call_soon(self._protocol.connection_made, self)
        # only start reading when connection_made() has been called
        self._loop.call_soon(self._start_reading)
        if waiter is not None:
            # only wake up the waiter when connection_made() has been called
            self._loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    def _init_stream(self, loop, sock, protocol, extra, server, context, token=None):
        # Everything but telling the protocol: attach `sock` as a paused
        # engine stream reporting to this transport (or, with `token`, take
        # over that stream: start_tls in place).
        super().__init__(extra, loop)
        self._sock = sock
        self._sock_fd = sock.fileno()
        self._set_socket_extra(sock)
        self._context_run = (context or contextvars.copy_context()).run
        self._protocol = None
        self._protocol_connected = False
        self._protocol_paused = False
        self._rblock_ = True           # read events must take the slow path
        self._fast = False             # not _rblock and not _buffered
        self._rmode = False            # reading by readiness (_read_ready)
        self._rwatching = False        # ... and the fd is watched now
        self.set_protocol(protocol)
        self._server = server
        self._closing = False          # close() or a fatal error happened
        self._conn_lost = 0
        self._eof = False              # write_eof() called
        self._paused = False           # pause_reading() in force
        self._read_done = False        # EOF or read error seen
        self._started = False          # reading enabled after connection_made()
        self._held = None              # read events kept while paused
        self._empty_waiter = None
        self._close_pending = False    # close() waits for the queue to drain
        self._drain_limits = False     # the engine's marks are held at 0
        self._called_connection_lost = False
        self._wok = True               # write() may take the fast path
        self._engine_closed = False    # CLOSED received: the engine let go of the fd
        self._loop_closing = False     # the proactor aborted us at loop close
        if self._server is not None:
            self._server._attach()
        loop._transports[self._sock_fd] = self
        base_events._set_nodelay(sock)

        proactor = loop._proactor
        self._arena = proactor._arena
        self._arena_view = proactor._arena_view
        self._kptr = proactor._ptr
        self._klib = lib = proactor._lib
        self._kwrite = lib.kloop_stream_write
        if token is not None:
            self._token = token
            proactor._streams[token] = self
            return
        self._token = proactor.stream_attach(self, self._sock_fd, _STREAM_PAUSED)
        # A transport born with a BufferedProtocol reads as the selector
        # loop does: when the socket is readable, get_buffer() and recv(2)
        # straight into it; the engine stream only writes. A later
        # set_protocol() with a plain Protocol hands reading to the engine
        # for good.
        self._rmode = self._buffered and self._readiness_ok

        # Bytes a cancelled sock_recv() took out of the kernel come first.
        stashed = proactor.take_stashed_bytes(sock)
        if stashed:
            self._held = collections.deque([(_H_DATA, stashed)])

    # -- extra info -----------------------------------------------------------

    def _set_socket_extra(self, sock):
        extra = self._extra
        extra["socket"] = trsock.TransportSocket(sock)
        try:
            extra["sockname"] = _shared_address(sock.getsockname(), _SOCKNAME)
        except OSError:
            extra["sockname"] = None
        if "peername" not in extra:
            try:
                extra["peername"] = _shared_address(sock.getpeername(), _PEERNAME)
            except OSError:
                extra["peername"] = None

    def __repr__(self):
        info = [self.__class__.__name__]
        if self._sock is None:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._sock_fd}")
        if self._sock is not None and not self._engine_closed:
            info.append("read=" + ("polling" if self.is_reading() else "idle"))
            size = self.get_write_buffer_size()
            info.append(f"write=<{'polling' if size else 'idle'}, bufsize={size}>")
        return "<{}>".format(" ".join(info))

    # -- protocol -------------------------------------------------------------

    @property
    def _rblock(self):
        return self._rblock_

    @_rblock.setter
    def _rblock(self, value):
        self._rblock_ = value
        self._fast = not value and not self._buffered

    def set_protocol(self, protocol):
        if (self._protocol is not None and self._protocol_paused
                and isinstance(protocol, sslproto.SSLProtocol)):
            # start_tls' SSLProtocol never saw the pause_writing() of the old
            # protocol and asserts on a resume_writing() it did not ask for.
            # The engine's queue can be above the high mark here where the
            # selector loop's would already be in the kernel, since the
            # engine sends at the next iteration. Any other new protocol
            # inherits the paused state, as on asyncio's transports: the
            # sendfile fallback's protocol waits for that resume_writing().
            self._protocol_paused = False
        if isinstance(protocol, protocols.BufferedProtocol):
            self._buffered = True
        else:
            self._buffered = False
        self._protocol = protocol
        if self._rmode and not self._buffered:
            self._leave_rmode()
        # IouringProactor._dispatch() calls it, through self._context_run,
        # with the bytes of a DATA record while self._fast holds (no
        # functools.partial of the two: 192 bytes per connection for ~4 ns
        # per call).
        self._protocol_data_received = getattr(protocol, "data_received", None)
        self._protocol_connected = True
        self._fast = not self._rblock_ and not self._buffered

    def get_protocol(self):
        return self._protocol

    def is_closing(self):
        return self._closing

    def is_reading(self):
        return not self._paused and not self._closing

    # -- reading ----------------------------------------------------------------

    def _start_reading(self):
        if self._closing or self._engine_closed:
            return
        self._started = True
        if self._paused:
            return
        if self._held:
            self._deliver_held()
            if self._paused or self._closing:
                return
        self._rblock = False
        if not self._read_done:
            self._read_resume()

    def pause_reading(self):
        if self._closing or self._paused:
            return
        self._paused = True
        self._rblock = True
        if self._started and not self._read_done:
            self._read_pause()
        if self._loop.get_debug():
            logger.debug("%r pauses reading", self)

    def resume_reading(self):
        if self._closing or not self._paused:
            return
        self._paused = False
        if self._started:
            if self._held:
                # Call the protocol on the next iteration, as asyncio's
                # transports do after resume_reading().
                self._loop.call_soon(self._resume_held)
            else:
                self._rblock = False
                if not self._read_done:
                    self._read_resume()
        if self._loop.get_debug():
            logger.debug("%r resumes reading", self)

    def _resume_held(self):
        if self._paused or self._closing:
            return
        self._deliver_held()
        if self._paused or self._closing:
            return
        self._rblock = False
        if not self._read_done:
            self._read_resume()

    def _read_resume(self):
        if not self._rmode:
            self._engine_call(self._klib.kloop_stream_resume)
        elif not self._rwatching:
            from .events import _Handle
            self._rwatching = True
            handle = _Handle(self._read_ready, (), self._loop, self._context_run.__self__)
            self._loop._proactor.watch(self._sock_fd, self._sock, _EVENT_READ, handle)

    def _read_pause(self):
        if not self._rmode:
            self._engine_call(self._klib.kloop_stream_pause)
        elif self._rwatching:
            self._rwatching = False
            self._loop._proactor.unwatch(self._sock_fd, _EVENT_READ)

    def _leave_rmode(self):
        # A plain Protocol now: the engine reads from here on (nothing it
        # holds can be older than what was read here: it never read).
        reading = self._rwatching
        self._read_pause()
        self._rmode = False
        if reading:
            self._engine_call(self._klib.kloop_stream_resume)

    def _read_ready(self):
        # Readable (readiness mode): asyncio's _read_ready__get_buffer().
        if self._conn_lost or self._closing:
            return
        protocol = self._protocol
        try:
            buf = protocol.get_buffer(-1)
            if not len(buf):
                raise RuntimeError("get_buffer() returned an empty buffer")
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
            return
        try:
            nbytes = self._sock.recv_into(buf, 0, _MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._read_error(exc)
            return
        if not nbytes:
            self._read_done = True
            self._read_pause()
            self._eof_received(_call)
            return
        try:
            protocol.buffer_updated(nbytes)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")

    def _deliver_held(self):
        held = self._held
        while held and not self._paused and not self._closing:
            kind, value = held.popleft()
            if kind == _H_DATA:
                self._deliver(value)
            elif kind == _H_EOF:
                self._eof_received()
            else:
                self._read_error(value)
        if not held:
            self._held = None

    def _engine_call(self, fn):
        # pause/resume: -ENOENT/-EPIPE mean the stream is already ending,
        # which the transport learns from its own events.
        if self._engine_closed:
            return
        rc = fn(self._kptr, self._token)
        if rc < 0 and rc != -_ENOENT and rc != -_EPIPE:
            raise make_error(rc)

    def _hold(self, kind, value):
        if self._held is None:
            self._held = collections.deque()
        self._held.append((kind, value))

    def _data_received(self, off, n):
        # Called by IouringProactor._dispatch() for each DATA record; the
        # bytes at [off, off + n) of the arena are valid until the next poll.
        if self._fast:
            try:
                self._context_run(self._protocol_data_received, self._arena[off:off + n])
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
            return
        if self._rblock:
            if self._closing:
                return  # close() stops reading: asyncio drops what follows
            self._hold(_H_DATA, self._arena[off:off + n])
            return
        # BufferedProtocol, one record: copied into the buffer get_buffer()
        # returns when it fits (the common case), else piece by piece.
        protocol = self._protocol
        dst = self._protocol_buffer(protocol, n)
        if dst is None:
            return
        if len(dst) < n:
            # Smaller: filled, and more buffers asked for, piece by piece.
            self._feed_buffered_run((self._arena_view[off:off + n],), dst)
            return
        dst[:n] = self._arena_view[off:off + n]
        dst.release()
        try:
            self._context_run(protocol.buffer_updated, n)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")

    def _deliver(self, data):
        if self._buffered:
            self._feed_buffered_run((memoryview(data),))
            return
        try:
            self._context_run(self._protocol_data_received, data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _protocol_buffer(self, protocol, size):
        # The byte view of protocol.get_buffer(size), checked as the stock
        # loop's recv_into() would find it; None after a fatal error.
        try:
            dst = memoryview(self._context_run(protocol.get_buffer, size)).cast("B")
            if not len(dst):
                raise RuntimeError("get_buffer() returned an empty buffer")
            if dst.readonly:
                raise TypeError("get_buffer() returned a read-only buffer")
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
            return None
        return dst

    def _feed_buffered_run(self, views, first=None):
        # Copy the bytes of `views` (one DATA record, or a run of records of
        # this stream) into the protocol's buffers: each buffer get_buffer()
        # returns is filled from as many records as it takes before
        # buffer_updated() is called, as the stock loop's recv_into() fills
        # it from what the socket holds. `first`: a buffer _protocol_buffer()
        # already returned for these bytes.
        protocol = self._protocol
        run = self._context_run
        left = 0
        for v in views:
            left += len(v)
        i = pos = 0
        while left:
            if first is not None:
                dst = first
                first = None
            else:
                dst = self._protocol_buffer(protocol, left)
                if dst is None:
                    return
            cap = len(dst)
            n = 0
            while n < cap and left:
                v = views[i]
                take = min(cap - n, len(v) - pos)
                dst[n:n + take] = v[pos:pos + take]
                n += take
                pos += take
                left -= take
                if pos == len(v):
                    i += 1
                    pos = 0
            dst.release()
            try:
                run(protocol.buffer_updated, n)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")
                return
            if left and (self._rblock or self._protocol is not protocol):
                if self._closing:
                    return
                rest = b"".join([views[i][pos:], *views[i + 1:]])
                if self._paused:
                    # Paused in buffer_updated(): the rest waits for
                    # resume_reading(), ahead of anything held already.
                    if self._held is None:
                        self._held = collections.deque()
                    self._held.appendleft((_H_DATA, rest))
                else:
                    # The protocol was swapped (start_tls): the rest goes to
                    # the new one.
                    self._deliver(rest)
                return

    def _on_eof(self, aux=0):
        self._read_done = True
        # The engine can hand over the last bytes and the EOF in one batch.
        # The selector loop reads once per iteration, so it reports EOF at
        # the earliest one iteration after the data before it; protocols and
        # tests rely on that (e.g. sslproto's transport must still have its
        # socket when the coroutine waiting for the handshake resumes).
        # Report EOF one iteration later, as the stock loop would.
        self._loop.call_soon(self._on_eof_later)

    def _on_eof_later(self):
        if self._conn_lost:
            return
        if self._rblock:
            if self._closing:
                return
            self._hold(_H_EOF, None)
            return
        if self._closing:
            return  # close() stopped reading, as the selector loop's does
        self._eof_received()

    def _eof_received(self, run=None):
        # `run`: how to call the protocol (_read_ready runs in its context
        # already).
        if self._loop.get_debug():
            logger.debug("%r received EOF", self)
        try:
            keep_open = (run or self._context_run)(self._protocol.eof_received)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    _read_error_message = "Fatal read error on socket transport"

    def _on_error(self, res, aux=0):
        # A read or a write error. Read errors stay behind data held while
        # paused (the engine holds the ones it has not handed out yet); with
        # nothing held the error is reported at once, so that a write error
        # ends a connection whose reading is paused, as in asyncio.
        exc = self._event_error(res, aux)
        if exc is None:
            return
        if self._held and not self._closing:
            self._hold(_H_ERROR, exc)
            return
        self._read_error(exc)

    def _event_error(self, res, aux):
        """The exception for an ERROR record, None to ignore it."""
        return make_error(res)

    def _read_error(self, exc):
        self._read_done = True
        if self._conn_lost:
            return
        self._fatal_error(exc, self._read_error_message)

    # -- writing ------------------------------------------------------------

    def write(self, data):
        # Fast path: bytes (and bytearray, which the engine copies or sends
        # before this returns), on a transport that takes writes (_wok is
        # false after write_eof(), during sendfile and once the connection
        # is lost).
        if self._wok:
            t = type(data)
            if t is bytes:
                n = len(data)
                if not n:
                    return
                if n < self._lend_min:
                    size = self._kwrite(self._kptr, self._token, data, n)
                else:
                    size = self._lend(data, n)
            elif t is bytearray:
                n = len(data)
                if not n:
                    return
                buf = _from_buffer(data)
                size = self._kwrite(self._kptr, self._token, buf, n)
                _release(buf)
            else:
                self._write_slow(data)
                return
            if size > self._high_water:
                if not self._protocol_paused:
                    self._pause_protocol()
            elif size < 0:
                self._write_failed(size)
            return
        self._write_slow(data)

    def _lend(self, data, n):
        # A large bytes object: the engine sends from it instead of copying
        # it (bytes cannot change). The proactor keeps it alive until the
        # engine's WRITE_RELEASE record for `ref`.
        proactor = self._loop._proactor
        ref = proactor._lend_seq = proactor._lend_seq + 1
        buf = _ffi.ffi.from_buffer(data)
        size = self._klib.kloop_stream_write_ref(self._kptr, self._token, buf, n, ref)
        if size >= 0:
            proactor._lent[ref] = buf   # the cdata keeps `data` alive
        return size

    def _write_slow(self, data):
        # Any bytes-like object, and the cases the fast path leaves out.
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, "
                            f"not {type(data).__name__!r}")
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._empty_waiter is not None:
            raise RuntimeError("unable to write; sendfile is in progress")
        if not data:
            return
        if self._conn_lost:
            if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            self._update_wok()
            return
        self._write_buffer(data)

    def _write_buffer(self, data):
        buf = _ffi.ffi.from_buffer(data)
        try:
            size = self._kwrite(self._kptr, self._token, buf, len(buf))
        finally:
            _ffi.ffi.release(buf)   # the engine has copied the bytes
        if size > self._high_water:
            if not self._protocol_paused:
                self._pause_protocol()
        elif size < 0:
            self._write_failed(size)

    def _pause_protocol(self):
        # The queue is above the high mark (kloop_stream_write said so).
        # Called from write(), in the caller's context, as asyncio does.
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler({
                "message": "protocol.pause_writing() failed",
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            })

    def _update_wok(self):
        self._wok = not (self._conn_lost or self._eof or self._empty_waiter is not None)

    def writelines(self, list_of_data):
        data = b"".join(list_of_data)
        if data:
            self.write(data)
        elif self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")

    def _write_failed(self, rc):
        if rc == -_EPIPE:
            # The engine's write side already failed: the ERROR event that
            # says why is on its way; drop the data like asyncio does after
            # a connection is lost.
            self._conn_lost += 1
            self._update_wok()
            return
        exc = make_error(rc)
        self._fatal_error(exc, "Fatal write error on socket transport")

    def _on_write_low(self):
        # The engine's queue fell to the low mark (to 0 while _drain_watch
        # holds both marks at 0). The protocol is resumed without looking at
        # the size again: the engine reports the mark once per excursion
        # above the high mark, so a protocol that wrote while paused must
        # not be left paused with no report to come.
        if self._protocol_paused:
            self._resume_protocol()
        if self._drain_wanted and self._engine_size() == 0:
            self._drained()

    def _resume_protocol(self):
        self._protocol_paused = False
        try:
            self._context_run(self._protocol.resume_writing)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler({
                "message": "protocol.resume_writing() failed",
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            })

    def _engine_size(self):
        if self._engine_closed:
            return 0
        size = self._klib.kloop_stream_write_size(self._kptr, self._token)
        return size if size > 0 else 0

    def get_write_buffer_size(self):
        return self._engine_size()

    def set_write_buffer_limits(self, high=None, low=None):
        # Validates and stores the limits (and pauses the protocol if the
        # queue is already above the new high mark), then tells the engine,
        # unless a drain watch holds the engine's marks at 0 for now.
        self._set_write_buffer_limits(high=high, low=low)
        if not self._drain_wanted and not self._engine_closed:
            self._klib.kloop_stream_set_limits(self._kptr, self._token, self._high_water,
                                               self._low_water)
        self._maybe_pause_protocol()

    def can_write_eof(self):
        return True

    def write_eof(self):
        if self._closing or self._eof:
            return
        self._eof = True
        self._update_wok()
        rc = self._klib.kloop_stream_shutdown(self._kptr, self._token)
        if rc < 0 and rc != -_EPIPE and rc != -_ENOENT:
            self._fatal_error(make_error(rc), "Fatal write error on socket transport")

    def _on_write_done(self, res):
        if res < 0 and res not in (-errno.ENOTCONN, -errno.ECANCELED):
            if not self._conn_lost:
                self._fatal_error(make_error(res), "Fatal write error on socket transport")

    # -- waiting for the engine's queue to drain -------------------------------
    #
    # The engine sends WRITE_LOW once its queue falls to the low mark after
    # having exceeded the high mark. With both marks at 0 that event means
    # "the queue is empty": this is how the transport learns that a close()
    # has flushed, or that sendfile may start. The user's marks are restored
    # afterwards; meanwhile resume_writing() is called when the queue is
    # empty rather than at the low mark.

    @property
    def _drain_wanted(self):
        return self._close_pending or (self._empty_waiter is not None and
                                       not self._empty_waiter.done())

    def _drain_watch(self):
        if not self._drain_limits and not self._engine_closed:
            self._drain_limits = True
            self._klib.kloop_stream_set_limits(self._kptr, self._token, 0, 0)

    def _drain_unwatch(self):
        if self._drain_limits and not self._drain_wanted:
            self._drain_limits = False
            if not self._engine_closed:
                self._klib.kloop_stream_set_limits(self._kptr, self._token,
                                                   self._high_water, self._low_water)

    def _drained(self):
        waiter = self._empty_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._close_pending:
            self._close_pending = False
            self._close_now()
        self._drain_unwatch()

    # -- sendfile support (BaseProactorEventLoop._sendfile_native) -----------

    def _make_empty_waiter(self):
        if self._empty_waiter is not None:
            raise RuntimeError("Empty waiter is already set")
        self._empty_waiter = self._loop.create_future()
        self._update_wok()
        if self._conn_lost:
            self._empty_waiter.set_exception(ConnectionError("Connection is closed by peer"))
        elif self._engine_size() == 0:
            self._empty_waiter.set_result(None)
        else:
            self._drain_watch()
        return self._empty_waiter

    def _reset_empty_waiter(self):
        self._empty_waiter = None
        self._update_wok()
        self._drain_unwatch()

    # -- closing --------------------------------------------------------------

    def close(self):
        if self._closing:
            return
        self._closing = True
        self._rblock = True
        self._held = None
        if self._rwatching:
            self._read_pause()
        if self._engine_size() == 0 and not self._protocol_paused:
            self._close_now()
        else:
            # (A paused protocol with an empty queue has a WRITE_LOW on its
            # way, and may write more when it is resumed: sslproto does.)
            # As asyncio: stop reading, flush what is queued -- and accept
            # further writes meanwhile (sslproto writes its close_notify
            # after close()) -- then lose the connection. The engine refuses
            # writes once kloop_stream_close() is called, so that call waits
            # until the queue is empty.
            if self._started and not self._read_done:
                self._read_pause()
            self._close_pending = True
            self._drain_watch()

    def _close_now(self):
        # Nothing queued: the protocol hears of it on the next iteration, as
        # with asyncio; the socket is closed once the engine lets go (CLOSED).
        if not self._engine_closed:
            self._klib.kloop_stream_close(self._kptr, self._token)
        if not self._conn_lost:
            self._conn_lost += 1
            self._update_wok()
            self._loop.call_soon(self._call_connection_lost, None)

    def abort(self):
        self._force_close(None)

    def _fatal_error(self, exc, message="Fatal error on transport"):
        # Should be called from exception handler only.
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler({
                "message": message,
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            })
        self._force_close(exc)

    def _force_close(self, exc):
        if self._empty_waiter is not None and not self._empty_waiter.done():
            if exc is None:
                self._empty_waiter.set_result(None)
            else:
                self._empty_waiter.set_exception(exc)
        if self._conn_lost:
            return
        self._closing = True
        self._rblock = True
        self._held = None
        if self._rwatching:
            self._read_pause()
        self._close_pending = False
        self._conn_lost += 1
        self._update_wok()
        if not self._engine_closed:
            self._klib.kloop_stream_abort(self._kptr, self._token)
        self._loop.call_soon(self._call_connection_lost, exc)

    def _on_closed(self, res):
        # The engine's final event: it no longer uses the fd.
        self._engine_closed = True
        self._read_done = True
        self._close_pending = False
        if self._empty_waiter is not None and not self._empty_waiter.done():
            if res < 0 and res != -errno.ECANCELED:
                self._empty_waiter.set_exception(make_error(res))
            else:
                self._empty_waiter.set_result(None)
        if self._loop_closing:
            # Loop teardown: keep self._sock so that __del__ reports the
            # transport that was never closed, like asyncio.
            return
        if not self._conn_lost:
            # A graceful close that had to flush: report how it ended.
            self._conn_lost += 1
            self._update_wok()
            exc = None
            if res < 0 and res != -errno.ECANCELED:
                exc = make_error(res)
            self._call_connection_lost(exc)
        elif self._called_connection_lost:
            self._close_socket()

    def _proactor_closing(self):
        # IouringProactor.close() is about to abort the stream.
        if not self._closing:
            self._loop_closing = True
        self._closing = True
        self._rblock = True

    def _call_connection_lost(self, exc):
        if self._called_connection_lost:
            return
        try:
            if self._protocol_connected:
                self._context_run(self._protocol.connection_lost, exc)
        finally:
            self._called_connection_lost = True
            self._protocol = None
            self._protocol_data_received = None  # a protocol that keeps its
            self._fast = False                   # transport would keep both alive
            server = self._server
            if server is not None:
                server._detach()
                self._server = None
            if self._engine_closed:
                self._close_socket()

    def _close_socket(self):
        sock = self._sock
        if sock is not None:
            self._sock = None
            if self._loop._transports.get(self._sock_fd) is self:
                del self._loop._transports[self._sock_fd]
            sock.close()

    def __del__(self, _warn=warnings.warn):
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            if self._engine_closed:
                self._sock.close()
            self._sock = None

    def get_write_buffer_limits(self):
        return (self._low_water, self._high_water)


# -- TLS in the engine --------------------------------------------------------
#
# Behaviour follows asyncio's sslproto (Lib/asyncio/sslproto.py,
# SSLProtocol and _SSLProtocolTransport): connection_made() and the waiter
# only after the handshake; a handshake that fails, times out or meets EOF
# ends the connection with the exception sslproto gives; EOF (with or
# without the peer's close_notify) calls eof_received() and then closes;
# close() sends close_notify after the queued data and waits at most
# ssl_shutdown_timeout for the peer's; write_eof() is not supported; writes
# after close() are dropped. Which connections come here: _tls.py.

_HS = 1         # handshake running
_WRAPPED = 2    # application data flows
_SHUTDOWN = 3   # close() called: close_notify sent, the peer's awaited
_DONE = 4       # failed, aborted or lost

_ERROR_TLS = _ffi.ERROR_TLS
_EOF_UNCLEAN = _ffi.EOF_UNCLEAN


def _ssl_timeouts(handshake, shutdown):
    # As SSLProtocol.__init__: None means asyncio's default.
    if handshake is None:
        handshake = constants.SSL_HANDSHAKE_TIMEOUT
    elif handshake <= 0:
        raise ValueError(f"ssl_handshake_timeout should be a positive number, "
                         f"got {handshake}")
    if shutdown is None:
        shutdown = constants.SSL_SHUTDOWN_TIMEOUT
    elif shutdown <= 0:
        raise ValueError(f"ssl_shutdown_timeout should be a positive number, "
                         f"got {shutdown}")
    return handshake, shutdown


class SSLEngineTransport(SocketTransport):
    """A stream whose TLS the engine runs (kloop_stream_start_tls).

    (The name says "SSL" as asyncio's SSL transports' names do: code and
    CPython's tests recognise TLS transports by it.)"""

    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.FALLBACK
    _readiness_ok = False

    _tls_state = _HS
    _hs_handle = None
    _sd_handle = None
    _hs_start = None
    _waiter = None
    _dropped_writes = 0
    _eof_unclean = False
    _ktls = 0  # KLOOP_HANDSHAKE_KTLS_* bits of the handshake
    _eof_called = False

    # TLS encrypts into the engine's queue, a copy anyway: never lend.
    _lend_min = sys.maxsize

    def __init__(self, loop, sock, protocol, sslobj, ssl_ptr, sslcontext, waiter=None, *,
                 server_side=False, extra=None, server=None, ssl_handshake_timeout=None,
                 ssl_shutdown_timeout=None, context=None):
        self._init_stream(loop, sock, protocol, extra, server, context)
        self._setup_tls(sslobj, sslcontext, waiter, True, ssl_handshake_timeout,
                        ssl_shutdown_timeout)
        rc = self._klib.kloop_stream_start_tls(self._kptr, self._token,
                                               _ffi.ffi.cast("void *", ssl_ptr))
        if rc < 0:
            self._tls_state = _DONE
            self._fatal_error(make_error(rc), "kloop_stream_start_tls() failed")
            return
        self._start_handshake_timer()

    @classmethod
    def _take_over(cls, old, protocol, sslobj, sslcontext, waiter, ssl_handshake_timeout,
                   ssl_shutdown_timeout):
        """The transport start_tls() returns: it takes over the engine stream
        of `old` (on which kloop_stream_start_tls() was called already)."""
        self = cls.__new__(cls)
        server, old._server = old._server, None
        sock = old._sock
        context = old._context_run.__self__
        _UpgradedTransport._retire(old, self)
        self._init_stream(old._loop, sock, protocol, dict(old._extra), None, context,
                          token=old._token)
        self._server = server
        self._setup_tls(sslobj, sslcontext, waiter, False, ssl_handshake_timeout,
                        ssl_shutdown_timeout)
        self._start_handshake_timer()
        return self

    def _setup_tls(self, sslobj, sslcontext, waiter, call_connection_made, handshake_timeout,
                   shutdown_timeout):
        self._sslobj = sslobj
        self._extra["sslcontext"] = sslcontext
        self._waiter = waiter
        self._call_made = call_connection_made
        # The app protocol hears of the connection after the handshake.
        self._protocol_connected = False
        self._ssl_handshake_timeout = handshake_timeout
        self._ssl_shutdown_timeout = shutdown_timeout
        self._tls_state = _HS
        self._read_limits = sslproto.add_flowcontrol_defaults(
            None, None, constants.FLOW_CONTROL_HIGH_WATER_SSL_READ)
        self._klib.kloop_stream_set_limits(self._kptr, self._token, self._high_water,
                                           self._low_water)

    def _start_handshake_timer(self):
        loop = self._loop
        if loop.get_debug():
            logger.debug("%r starts SSL handshake", self)
            self._hs_start = loop.time()
        self._hs_handle = loop.call_later(self._ssl_handshake_timeout,
                                          self._check_handshake_timeout)

    def __repr__(self):
        state = {_HS: "handshake", _WRAPPED: "wrapped", _SHUTDOWN: "shutdown",
                 _DONE: "done"}[self._tls_state]
        return super().__repr__()[:-1] + f" tls={state}>"

    # -- handshake ------------------------------------------------------------

    def _on_handshake(self, res, aux=0):
        if self._tls_state != _HS:
            return
        self._cancel_timer("_hs_handle")
        if res < 0:
            if res == -errno.EPROTO:
                exc = self._tls_error()
            elif res == -errno.ECONNRESET:
                exc = ConnectionResetError()   # what sslproto gives for EOF here
            else:
                exc = make_error(res)
            self._handshake_failed(exc)
            return
        sslobj = self._sslobj
        try:
            peercert = sslobj.getpeercert()
        except Exception as exc:
            self._handshake_failed(exc)
            return
        self._tls_state = _WRAPPED
        loop = self._loop
        if loop.get_debug() and self._hs_start is not None:
            logger.debug("%r: SSL handshake took %.1f ms", self,
                         (loop.time() - self._hs_start) * 1e3)
        self._extra.update(peercert=peercert, cipher=sslobj.cipher(),
                           compression=sslobj.compression(), ssl_object=sslobj)
        if aux & _ffi.HANDSHAKE_KTLS_TX:
            # The kernel encrypts what this socket sends: loop.sendfile()
            # can splice the file into it (after the queue is flushed) like
            # on a plain socket, instead of reading it through Python.
            self._sendfile_compatible = constants._SendfileMode.TRY_NATIVE
        self._ktls = aux & (_ffi.HANDSHAKE_KTLS_TX | _ffi.HANDSHAKE_KTLS_RX)
        self._protocol_connected = True
        if self._call_made:
            try:
                self._context_run(self._protocol.connection_made, self)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.connection_made() call failed.")
                return
        self._wake_waiter(None)
        self._start_reading()

    def _handshake_failed(self, exc):
        self._tls_state = _DONE
        if not self._call_made:
            # start_tls(): the protocol was connected before the upgrade and
            # hears of the loss, as with sslproto.
            self._protocol_connected = True
        if isinstance(exc, ssl.CertificateError):
            msg = "SSL handshake failed on verifying the certificate"
        else:
            msg = "SSL handshake failed"
        self._fatal_error(exc, msg)
        self._wake_waiter(exc)

    def _check_handshake_timeout(self):
        self._hs_handle = None
        if self._tls_state == _HS:
            self._tls_state = _DONE
            msg = (f"SSL handshake is taking longer than {self._ssl_handshake_timeout} "
                   f"seconds: aborting the connection")
            self._fatal_error(ConnectionAbortedError(msg))

    def _wake_waiter(self, exc):
        waiter = self._waiter
        if waiter is None:
            return
        self._waiter = None
        if not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def _tls_error(self):
        ffi = _ffi.ffi
        err = ffi.new("struct kloop_tls_error *")
        err.size = ffi.sizeof("struct kloop_tls_error")
        rc = -errno.ENOENT
        if not self._engine_closed:
            rc = self._klib.kloop_stream_tls_error(self._kptr, self._token, err)
        if rc < 0:
            return make_error(-errno.EPROTO)
        from . import _tls
        return _tls.tls_exception(err, self._sslobj.server_hostname)

    def _cancel_timer(self, name):
        handle = getattr(self, name)
        if handle is not None:
            handle.cancel()
            setattr(self, name, None)

    # -- reading ----------------------------------------------------------------

    def _on_eof(self, aux=0):
        if aux & _EOF_UNCLEAN:
            self._eof_unclean = True
        if self._tls_state == _HS:
            self._read_done = True
            return  # the HANDSHAKE record says how the handshake ended
        super()._on_eof(aux)

    def _eof_received(self):
        # sslproto calls eof_received() when the peer's close_notify arrives
        # and also when the connection ends without one, then closes.
        if self._loop.get_debug():
            logger.debug("%r received EOF%s", self,
                         " without close_notify" if self._eof_unclean else "")
        if self._tls_state != _WRAPPED or self._eof_called:
            return
        self._eof_called = True
        try:
            keep_open = self._context_run(self._protocol.eof_received)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Error calling eof_received()")
            return
        if keep_open:
            logger.warning("returning true from eof_received() has no effect when using ssl")
        self.close()

    _read_error_message = "Fatal error on SSL protocol"

    def _event_error(self, res, aux):
        if self._tls_state == _HS:
            return None  # the HANDSHAKE record says how the handshake ended
        return self._tls_error() if aux & _ERROR_TLS else make_error(res)

    def set_read_buffer_limits(self, high=None, low=None):
        # The engine decrypts into its receive buffers and hands the bytes
        # over at once: there is no read buffer to limit. The limits are
        # kept for get_read_buffer_limits(), as sslproto's transport has them.
        self._read_limits = sslproto.add_flowcontrol_defaults(
            high, low, constants.FLOW_CONTROL_HIGH_WATER_SSL_READ)

    def get_read_buffer_limits(self):
        high, low = self._read_limits
        return (low, high)

    def get_read_buffer_size(self):
        return 0

    # -- writing --------------------------------------------------------------

    def _update_wok(self):
        self._wok = not (self._conn_lost or self._closing or self._empty_waiter is not None)

    # write() is SocketTransport's (its fast path); the rest as sslproto's
    # transport has it.
    def _write_slow(self, data):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data: expecting a bytes-like instance, "
                            f"got {type(data).__name__}")
        if not data:
            return
        if self._closing or self._conn_lost:
            # As sslproto: dropped, with a warning after a few.
            if self._dropped_writes >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("SSL connection is closed")
            self._dropped_writes += 1
            return
        self._write_buffer(data)

    def _write_failed(self, rc):
        if rc == -_EPIPE:
            self._dropped_writes += 1
            return
        self._fatal_error(make_error(rc), "Fatal error on SSL protocol")

    def writelines(self, list_of_data):
        data = b"".join(list_of_data)
        if data:
            self.write(data)

    def _set_write_buffer_limits(self, high=None, low=None):
        self._high_water, self._low_water = sslproto.add_flowcontrol_defaults(
            high, low, constants.FLOW_CONTROL_HIGH_WATER_SSL_WRITE)

    def can_write_eof(self):
        return False

    def write_eof(self):
        raise NotImplementedError

    # -- closing --------------------------------------------------------------

    def close(self):
        if self._closing:
            return
        if self._tls_state != _WRAPPED:
            # During the handshake sslproto aborts.
            self._force_close(None)
            return
        self._tls_state = _SHUTDOWN
        self._closing = True
        self._rblock = True
        self._held = None
        self._update_wok()
        if (self._read_done and self._eof_called and self._engine_size() == 0
                and not self._engine_closed):
            # The peer has finished (close_notify or EOF came, eof_received()
            # was called) and nothing waits to be sent: as sslproto, the
            # protocol hears of the end at once; the engine sends what is
            # left (close_notify) and lets go of the socket on its own.
            self._close_now()
            return
        if not self._engine_closed:
            # close_notify after the queued data; CLOSED once the peer's
            # close_notify (or EOF) came. The timer bounds the wait.
            self._klib.kloop_stream_close(self._kptr, self._token)
            self._sd_handle = self._loop.call_later(self._ssl_shutdown_timeout,
                                                    self._check_shutdown_timeout)

    def _check_shutdown_timeout(self):
        self._sd_handle = None
        if self._tls_state == _SHUTDOWN and not self._conn_lost:
            self._force_close(exceptions.TimeoutError("SSL shutdown timed out"))

    def _force_close(self, exc):
        self._cancel_timer("_hs_handle")
        self._cancel_timer("_sd_handle")
        self._wake_waiter(exc)
        self._tls_state = _DONE
        super()._force_close(exc)

    def _on_closed(self, res):
        self._cancel_timer("_hs_handle")
        self._cancel_timer("_sd_handle")
        if (self._tls_state == _SHUTDOWN and res >= 0 and not self._conn_lost
                and not self._eof_called and not self._loop_closing):
            # The peer answered our close_notify (or closed): sslproto tells
            # the protocol with eof_received() before connection_lost().
            self._eof_called = True
            try:
                self._context_run(self._protocol.eof_received)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Error calling eof_received()")
        if self._tls_state == _HS:
            # Gone before the handshake said anything (loop teardown).
            self._tls_state = _DONE
            self._wake_waiter(make_error(res) if res < 0 and res != -errno.ECANCELED
                              else None)
        super()._on_closed(res)

    def _call_connection_lost(self, exc):
        self._cancel_timer("_hs_handle")
        self._cancel_timer("_sd_handle")
        super()._call_connection_lost(exc)


TLSTransport = SSLEngineTransport


class _UpgradedTransport(SocketTransport):
    """What a plain transport becomes once start_tls() upgraded its stream
    in place: the TLS transport it returned owns the socket and the engine
    stream. Writing here would put plaintext into the TLS stream, so it
    raises; close() and abort() end the TLS connection (as closing the raw
    transport under sslproto does)."""

    @staticmethod
    def _retire(old, new):
        old.__class__ = _UpgradedTransport
        old._upgraded_to = new
        old._engine_closed = True      # no engine call from here any more
        old._closing = True
        old._rblock = True
        old._held = None
        old._conn_lost = 1
        old._wok = False
        old._called_connection_lost = True
        old._sock = None               # owned by the TLS transport now

    def write(self, data):
        raise RuntimeError("this transport was upgraded by start_tls(); write to the "
                           "transport start_tls() returned")

    def writelines(self, list_of_data):
        self.write(b"")

    def close(self):
        self._upgraded_to.abort()

    def abort(self):
        self._upgraded_to.abort()

    def is_closing(self):
        return True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def get_write_buffer_size(self):
        return 0

    def __repr__(self):
        return f"<{self.__class__.__name__} upgraded to {self._upgraded_to!r}>"


def make_ssl_transport(loop, rawsock, protocol, sslcontext, waiter=None, *,
                       server_side=False, server_hostname=None, extra=None,
                       server=None, ssl_handshake_timeout=None,
                       ssl_shutdown_timeout=None, context=None):
    """A TLS transport: the engine's TLS where it is safe, else asyncio's
    SSLProtocol over an engine stream transport (see _tls.py)."""
    from . import _tls
    handshake_timeout, shutdown_timeout = _ssl_timeouts(ssl_handshake_timeout,
                                                        ssl_shutdown_timeout)
    if not sslcontext:
        sslcontext = sslproto._create_transport_context(server_side, server_hostname)
    hostname = server_hostname if server_hostname and not server_side else None
    what = f"{'server' if server_side else 'client'} connection on fd {rawsock.fileno()}"
    reason = _tls.choose(loop, sslcontext, rawsock)
    if reason is None:
        sslobj, ptr = _tls.prepare(sslcontext, server_side, hostname)
        if isinstance(ptr, str):
            reason = ptr
        else:
            _tls.log_path(loop, what, _tls.ENGINE)
            return TLSTransport(loop, rawsock, protocol, sslobj, ptr, sslcontext, waiter,
                                server_side=server_side, extra=extra, server=server,
                                ssl_handshake_timeout=handshake_timeout,
                                ssl_shutdown_timeout=shutdown_timeout, context=context)
    _tls.log_path(loop, what, _tls.SSLPROTO, reason)
    ssl_protocol = sslproto.SSLProtocol(
        loop, protocol, sslcontext, waiter, server_side, server_hostname,
        ssl_handshake_timeout=ssl_handshake_timeout,
        ssl_shutdown_timeout=ssl_shutdown_timeout)
    SocketTransport(loop, rawsock, ssl_protocol, extra=extra, server=server,
                    context=context)
    return ssl_protocol._app_transport


def _not_movable(old):
    """Why the stream of plain transport `old` cannot be upgraded in place."""
    if old._closing or old._conn_lost or old._engine_closed:
        return "the transport is closing"
    if old._held:
        return "bytes the transport received are held in Python (reading was paused)"
    if old._read_done:
        return "the transport's reading has ended"
    if old._eof:
        return "write_eof() was called on the transport"
    if old._empty_waiter is not None or old._close_pending:
        return "the transport is waiting for its write queue (sendfile or close)"
    token = old._token
    for rec in old._loop._proactor._batch:
        if rec[0] == token:
            # The last poll returned bytes for this stream that are not
            # dispatched yet (the peer sent its hello at once): they belong
            # to the TLS stream, and only sslproto can still take them.
            return "records of this stream from the last poll are not dispatched yet"
    return None


def start_tls_in_place(loop, old, protocol, sslcontext, server_side, server_hostname,
                       ssl_handshake_timeout, ssl_shutdown_timeout):
    """loop.start_tls() on a plain engine transport, on the engine path.

    Returns (new transport, waiter), or None when sslproto must do it (the
    reason is logged)."""
    from . import _tls
    handshake_timeout, shutdown_timeout = _ssl_timeouts(ssl_handshake_timeout,
                                                        ssl_shutdown_timeout)
    hostname = server_hostname if server_hostname and not server_side else None
    what = f"start_tls on fd {old._sock_fd}"
    reason = _tls.choose(loop, sslcontext) or _not_movable(old)
    if reason is None:
        sslobj, ptr = _tls.prepare(sslcontext, server_side, hostname)
        if isinstance(ptr, str):
            reason = ptr
    if reason is None:
        # The engine holds what arrives after the handshake until the new
        # transport resumes reading.
        reading = old._started and not old._paused
        if reading:
            old._read_pause()
        rc = old._klib.kloop_stream_start_tls(old._kptr, old._token, _ffi.ffi.cast("void *", ptr))
        if rc < 0:
            if reading:
                old._read_resume()
            reason = f"kloop_stream_start_tls() failed: {os.strerror(-rc)}"
    if reason is not None:
        _tls.log_path(loop, what, _tls.SSLPROTO, reason)
        return None
    _tls.log_path(loop, what, _tls.ENGINE)
    waiter = loop.create_future()
    new = TLSTransport._take_over(old, protocol, sslobj, sslcontext, waiter,
                                  handshake_timeout, shutdown_timeout)
    return new, waiter
