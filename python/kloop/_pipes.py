"""Pipe transports.

Read pipes are engine streams (``_EngineReadPipeTransport``): the engine
reads them with read(2) on the ring, as it reads sockets, and the transport
behaves as asyncio's ``_UnixReadPipeTransport``.

Write pipes are asyncio's own ``_UnixWritePipeTransport`` on top of the
loop's ``_add_reader``/``_add_writer`` (level-triggered multishot polls on
the ring, see IouringProactor.watch), with one thing fixed: the order in
which a reader and a writer of the same fd are called.

The selector loop calls the reader of an fd before its writer when both are
ready in one iteration, and asyncio's write pipe transport relies on it: it
watches its pipe for *readability* to learn that the read end has gone
(EPOLLERR), and its reader then closes the transport with BrokenPipeError
and cancels the pending writer -- no write(2) is made into the broken pipe.
On the ring, the reader and the writer are two polls whose completions can
arrive in either order; when the writer ran first, it wrote into the broken
pipe, which raises SIGPIPE, and a process that restored SIGPIPE's default
action (a common idiom in command-line tools) was killed.

``_WritePipeTransport._write_ready`` therefore asks first, with a zero
timeout poll(2) (only on the slow path, after the pipe was full), whether
the reader would have fired, and runs it first if so. (Write pipes are not
engine streams for the same reason: an engine writev() into a broken pipe
raises SIGPIPE.)
"""

import collections
import errno
import os
import select
import stat
import sys
import warnings

from asyncio import futures
from asyncio import transports
from asyncio import unix_events
from asyncio.log import logger

from . import _ffi
from ._errors import make_error

#: Read pipes on engine streams (KLOOP_STREAM_FILE) instead of asyncio's
#: read pipe transport on add_reader().
_ENGINE_READ_PIPES = True

_READABLE = select.POLLIN | select.POLLERR | select.POLLHUP


class _WritePipeTransport(unix_events._UnixWritePipeTransport):

    def __init__(self, loop, pipe, protocol, waiter=None, extra=None):
        super().__init__(loop, pipe, protocol, waiter, extra)
        # asyncio watches the write end for readability on FIFOs and sockets.
        self._kloop_reader_watch = False
        if self._pipe is not None:
            mode = os.fstat(self._fileno).st_mode
            self._kloop_reader_watch = (
                stat.S_ISSOCK(mode) or
                (stat.S_ISFIFO(mode) and not sys.platform.startswith("aix")))

    def _write_ready(self):
        if self._kloop_reader_watch and self._pipe is not None:
            p = select.poll()
            p.register(self._fileno, select.POLLIN)
            try:
                ready = p.poll(0)
            except OSError:
                ready = ()
            if ready and ready[0][1] & _READABLE:
                # As the selector loop would: the reader first.
                self._read_ready()
                if self._pipe is None or self._closing and not self._buffer:
                    return
        super()._write_ready()


class _EngineReadPipeTransport(transports.ReadTransport):
    """A read pipe driven by an engine stream (KLOOP_STREAM_FILE).

    The engine reads the pipe with read(2) on the ring (a readiness poll
    after EAGAIN) and reports DATA, EOF and ERROR records; this transport
    relays them to the protocol with asyncio's _UnixReadPipeTransport
    behaviour: eof_received() then connection_lost(None) on EOF, EIO (a pty
    whose other side closed) ends the transport without calling the
    exception handler, other read errors call it; pause_reading() stops
    reading and keeps what already arrived; the pipe is closed after
    connection_lost(), once the engine has let go of the fd.
    """

    # What IouringProactor._dispatch_records() looks at for DATA records:
    # this transport always takes the _data_received() path.
    _fast = False

    def __init__(self, loop, pipe, protocol, waiter=None, extra=None):
        super().__init__(extra)
        self._extra["pipe"] = pipe
        self._loop = loop
        self._pipe = pipe
        self._fileno = pipe.fileno()
        self._protocol = protocol
        self._closing = False
        self._paused = False
        self._held = None
        self._conn_lost = False
        self._engine_closed = False
        self._loop_closing = False
        self._called_connection_lost = False

        mode = os.fstat(self._fileno).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
            self._pipe = None
            self._fileno = None
            self._protocol = None
            raise ValueError("Pipe transport is for pipes/sockets only.")
        os.set_blocking(self._fileno, False)

        proactor = loop._proactor
        self._arena = proactor._arena
        self._kptr = proactor._ptr
        self._klib = proactor._lib
        self._token = proactor.stream_attach(self, self._fileno,
                                             _ffi.STREAM_FILE | _ffi.STREAM_PAUSED)

        self._loop.call_soon(self._protocol.connection_made, self)
        # only start reading when connection_made() has been called
        self._loop.call_soon(self._start_reading)
        if waiter is not None:
            self._loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    def __repr__(self):
        info = [self.__class__.__name__]
        if self._pipe is None:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._fileno}")
        if self._pipe is not None:
            if self._loop.is_closed():
                info.append("open")
            else:
                info.append("idle" if self._paused else "polling")
        return "<{}>".format(" ".join(info))

    # -- engine calls ---------------------------------------------------------

    def _engine_call(self, fn):
        if self._engine_closed:
            return
        rc = fn(self._kptr, self._token)
        if rc < 0 and rc not in (-errno.ENOENT, -errno.EPIPE, -errno.EALREADY):
            raise make_error(rc)

    def _start_reading(self):
        if self._closing or self._paused:
            return
        if self._held:
            self._deliver_held()
            if self._closing or self._paused:
                return
        self._engine_call(self._klib.kloop_stream_resume)

    def pause_reading(self):
        if self._closing or self._paused:
            return
        self._paused = True
        self._engine_call(self._klib.kloop_stream_pause)
        if self._loop.get_debug():
            logger.debug("%r pauses reading", self)

    def resume_reading(self):
        if self._closing or not self._paused:
            return
        self._paused = False
        self._loop.call_soon(self._start_reading)
        if self._loop.get_debug():
            logger.debug("%r resumes reading", self)

    # -- records from the engine ------------------------------------------------

    def _hold(self, kind, value):
        if self._held is None:
            self._held = collections.deque()
        self._held.append((kind, value))

    def _deliver_held(self):
        held = self._held
        while held and not self._paused and not self._closing:
            kind, value = held.popleft()
            if kind == 0:
                self._call_data_received(value)
            elif kind == 1:
                self._eof()
            else:
                self._fatal_error(value, "Fatal read error on pipe transport")
        if not held:
            self._held = None

    def _data_received(self, off, n):
        if self._closing or self._loop_closing:
            return
        data = self._arena[off:off + n]
        if self._paused or self._held:
            self._hold(0, data)
            return
        self._call_data_received(data)

    def _call_data_received(self, data):
        # An exception from the protocol is reported as asyncio reports one
        # from its reader callback; the transport stays open.
        try:
            self._protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler({
                "message": "Exception in protocol.data_received() of a pipe transport",
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            })

    def _on_eof(self, aux=0):
        if self._closing or self._loop_closing:
            return
        if self._paused or self._held:
            self._hold(1, None)
            return
        self._eof()

    def _eof(self):
        if self._loop.get_debug():
            logger.info("%r was closed by peer", self)
        self._closing = True
        self._engine_call(self._klib.kloop_stream_abort)
        self._loop.call_soon(self._protocol.eof_received)
        self._loop.call_soon(self._call_connection_lost, None)

    def _on_error(self, res, aux=0):
        if self._closing or self._loop_closing:
            return
        exc = make_error(res)
        if self._paused or self._held:
            self._hold(2, exc)
            return
        self._fatal_error(exc, "Fatal read error on pipe transport")

    def _on_write_low(self):
        pass

    def _on_write_done(self, res):
        pass

    def _on_closed(self, res):
        # The engine's final record: it no longer uses the fd.
        self._engine_closed = True
        if self._called_connection_lost and not self._loop_closing:
            self._close_pipe()

    def _proactor_closing(self):
        # The loop is closing with this transport open: as with asyncio,
        # the transport does not become "closing" and the pipe stays open
        # until the transport is collected (and warns); no more records.
        if not self._closing:
            self._loop_closing = True

    # -- closing ----------------------------------------------------------------

    def set_protocol(self, protocol):
        self._protocol = protocol

    def get_protocol(self):
        return self._protocol

    def is_closing(self):
        return self._closing

    def close(self):
        if not self._closing:
            self._close(None)

    def _fatal_error(self, exc, message="Fatal error on pipe transport"):
        if isinstance(exc, OSError) and exc.errno == errno.EIO:
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler({
                "message": message,
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            })
        self._close(exc)

    def _close(self, exc):
        self._closing = True
        self._held = None
        self._engine_call(self._klib.kloop_stream_abort)
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc):
        if self._called_connection_lost:
            return
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._called_connection_lost = True
            self._protocol = None
            if self._engine_closed:
                self._close_pipe()

    def _close_pipe(self):
        pipe = self._pipe
        if pipe is not None:
            self._pipe = None
            pipe.close()

    def __del__(self, _warn=warnings.warn):
        if self._pipe is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._pipe.close()
            self._pipe = None


def make_read_pipe_transport(loop, pipe, protocol, waiter=None, extra=None):
    if _ENGINE_READ_PIPES:
        return _EngineReadPipeTransport(loop, pipe, protocol, waiter, extra)
    return unix_events._UnixReadPipeTransport(loop, pipe, protocol, waiter, extra)


def make_write_pipe_transport(loop, pipe, protocol, waiter=None, extra=None):
    return _WritePipeTransport(loop, pipe, protocol, waiter, extra)
