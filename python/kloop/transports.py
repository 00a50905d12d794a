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
import functools
import warnings

from asyncio import base_events
from asyncio import constants
from asyncio import futures
from asyncio import protocols
from asyncio import sslproto
from asyncio import transports
from asyncio import trsock
from asyncio.log import logger

from . import _ffi
from ._errors import make_error

__all__ = ("SocketTransport",)

_STREAM_PAUSED = _ffi.STREAM_PAUSED
_ENOENT = errno.ENOENT
_EPIPE = errno.EPIPE

# Held read events (while reading is paused): kinds
_H_DATA = 0
_H_EOF = 1
_H_ERROR = 2


class SocketTransport(transports._FlowControlMixin, transports.Transport):
    """A connected stream socket driven by a kloop engine stream."""

    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE

    def __init__(self, loop, sock, protocol, waiter=None, extra=None, server=None,
                 context=None):
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
        self._token = proactor.stream_attach(self, self._sock_fd, _STREAM_PAUSED)

        # Bytes a cancelled sock_recv() took out of the kernel come first.
        stashed = proactor.take_stashed_bytes(sock)
        if stashed:
            self._held = collections.deque([(_H_DATA, stashed)])

        self._loop.call_soon(self._protocol.connection_made, self)
        # only start reading when connection_made() has been called
        self._loop.call_soon(self._start_reading)
        if waiter is not None:
            # only wake up the waiter when connection_made() has been called
            self._loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    # -- extra info -----------------------------------------------------------

    def _set_socket_extra(self, sock):
        self._extra["socket"] = trsock.TransportSocket(sock)
        try:
            self._extra["sockname"] = sock.getsockname()
        except OSError:
            self._extra["sockname"] = None
        if "peername" not in self._extra:
            try:
                self._extra["peername"] = sock.getpeername()
            except OSError:
                self._extra["peername"] = None

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
        if self._protocol is not None and self._protocol_paused:
            # The new protocol (start_tls' SSLProtocol) never saw the
            # pause_writing() of the old one: it must not get its
            # resume_writing(). The engine's queue can be above the high mark
            # here where the selector loop's would already be in the kernel,
            # since the engine sends at the next iteration.
            self._protocol_paused = False
        if isinstance(protocol, protocols.BufferedProtocol):
            self._buffered = True
        else:
            self._buffered = False
        self._protocol = protocol
        self._protocol_data_received = getattr(protocol, "data_received", None)
        # What IouringProactor._dispatch() calls with the bytes of a DATA
        # record while self._fast holds.
        self._sink = functools.partial(self._context_run, self._protocol_data_received)
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
            self._engine_call(self._klib.kloop_stream_resume)

    def pause_reading(self):
        if self._closing or self._paused:
            return
        self._paused = True
        self._rblock = True
        if self._started and not self._read_done:
            self._engine_call(self._klib.kloop_stream_pause)
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
                    self._engine_call(self._klib.kloop_stream_resume)
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
            self._engine_call(self._klib.kloop_stream_resume)

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
        self._feed_buffered(self._arena_view[off:off + n])

    def _deliver(self, data):
        if self._buffered:
            self._feed_buffered(memoryview(data))
            return
        try:
            self._context_run(self._protocol_data_received, data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _feed_buffered(self, view):
        # Copy into the protocol's buffers, in as many pieces as they need.
        protocol = self._protocol
        run = self._context_run
        total = len(view)
        pos = 0
        while pos < total:
            try:
                buf = run(protocol.get_buffer, total - pos)
                dst = memoryview(buf).cast("B")
                if not len(dst):
                    raise RuntimeError("get_buffer() returned an empty buffer")
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
                return
            n = min(len(dst), total - pos)
            dst[:n] = view[pos:pos + n]
            dst.release()
            pos += n
            try:
                run(protocol.buffer_updated, n)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")
                return
            if pos < total and (self._rblock or self._protocol is not protocol):
                if self._closing:
                    return
                rest = bytes(view[pos:])
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

    def _on_eof(self):
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

    def _eof_received(self):
        if self._loop.get_debug():
            logger.debug("%r received EOF", self)
        try:
            keep_open = self._context_run(self._protocol.eof_received)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    def _on_error(self, res):
        # A read or a write error. Read errors stay behind data held while
        # paused (the engine holds the ones it has not handed out yet); with
        # nothing held the error is reported at once, so that a write error
        # ends a connection whose reading is paused, as in asyncio.
        exc = make_error(res)
        if self._held and not self._closing:
            self._hold(_H_ERROR, exc)
            return
        self._read_error(exc)

    def _read_error(self, exc):
        self._read_done = True
        if self._conn_lost:
            return
        self._fatal_error(exc, "Fatal read error on socket transport")

    # -- writing ------------------------------------------------------------

    def write(self, data):
        # Fast path: bytes, on a transport that takes writes (_wok is false
        # after write_eof(), during sendfile and once the connection is lost).
        if self._wok and type(data) is bytes:
            if data:
                size = self._kwrite(self._kptr, self._token, data, len(data))
                if size > self._high_water:
                    if not self._protocol_paused:
                        self._pause_protocol()
                elif size < 0:
                    self._write_failed(size)
            return
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
                self._engine_call(self._klib.kloop_stream_pause)
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
            self._protocol_data_received = None
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


def make_ssl_transport(loop, rawsock, protocol, sslcontext, waiter=None, *,
                       server_side=False, server_hostname=None, extra=None,
                       server=None, ssl_handshake_timeout=None,
                       ssl_shutdown_timeout=None, context=None):
    """asyncio's SSLProtocol over an engine stream transport."""
    ssl_protocol = sslproto.SSLProtocol(
        loop, protocol, sslcontext, waiter, server_side, server_hostname,
        ssl_handshake_timeout=ssl_handshake_timeout,
        ssl_shutdown_timeout=ssl_shutdown_timeout)
    SocketTransport(loop, rawsock, ssl_protocol, extra=extra, server=server,
                    context=context)
    return ssl_protocol._app_transport
