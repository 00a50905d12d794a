"""IouringProactorEventLoop: asyncio's proactor event loop over io_uring.

The loop is asyncio's own ``BaseProactorEventLoop`` (as Windows'
ProactorEventLoop is), so ``create_connection`` (happy eyeballs),
``create_server``, ``start_tls``/sslproto, the sendfile fallback and debug
mode are the stock code. kloop supplies:

* the proactor (``_proactor.IouringProactor``), polled once per iteration;
* engine-driven stream transports for TCP and Unix sockets
  (``transports.SocketTransport``), and a multishot accept for servers;
* the Unix parts Windows lacks: ``add_reader``/``add_writer`` (polls on
  the ring), signal handlers (``signal.set_wakeup_fd`` into a socketpair
  whose read end the ring reads), Unix sockets and pipes, subprocesses
  (pidfd, reaped by the ring), with the semantics of asyncio's Unix
  selector loop -- the signal and pipe code *is* asyncio's.
"""

import _socket
import contextvars
import errno
import heapq
import ipaddress
import logging
import os
import selectors
import socket
import sys
import warnings
try:
    import ssl
except ImportError:  # pragma: no cover - Python without ssl
    ssl = None
import weakref

from asyncio import base_events
from asyncio import constants
from asyncio import events
from asyncio import exceptions
from asyncio import format_helpers
from asyncio import proactor_events
from asyncio import trsock
from asyncio import unix_events
from asyncio.log import logger

from . import _datagram
from . import _proactor
from . import transports as _transports

__all__ = ("IouringProactorEventLoop", "EventLoop")

_unix = unix_events._UnixSelectorEventLoop

# socket.socket.type without its conversion to a SocketKind (a property
# that costs more than the send it guards).
_sock_type = _socket.socket.type.__get__
_SOCK_STREAM = int(socket.SOCK_STREAM)
_POLLIN = 0x001


def _fileobj_to_fd(fileobj):
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


def _close_sendfile_pipes(loop):
    if getattr(loop, "_kloop_splice_pipes", None) is not None:
        from . import _sendfile
        _sendfile.close_pipes(loop)


class _Acceptor:
    """A multishot accept on a listening socket feeding a Server."""

    def __init__(self, loop, protocol_factory, sock, sslcontext, server,
                 ssl_handshake_timeout, ssl_shutdown_timeout):
        self._loop = loop
        self._proactor = loop._proactor
        self._protocol_factory = protocol_factory
        self._sock = sock
        self._fd = sock.fileno()
        self._family, self._type, self._proto = sock.family, sock.type, sock.proto
        self._sslcontext = sslcontext
        self._server = server
        self._ssl_handshake_timeout = ssl_handshake_timeout
        self._ssl_shutdown_timeout = ssl_shutdown_timeout
        self._context = contextvars.copy_context()
        self._token = None
        self._stopped = False
        self._retry = None

    def start(self):
        if self._stopped or self._loop.is_closed():
            return
        self._retry = None
        proactor = self._proactor
        entry = _proactor._Internal(self._completed)
        entry._token = proactor._next_token()
        rc = proactor._lib.kloop_submit_accept(proactor._ptr, entry._token, self._fd,
                                               _proactor._ffi.OP_MULTISHOT)
        try:
            proactor._register(entry, rc)
        except OSError as exc:
            self._failed(exc)
            return
        self._token = entry._token

    def cancel(self):
        """Stop accepting; True if an accept was still in the kernel."""
        if self._stopped:
            return False
        self._stopped = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._token is not None:
            # At once, not at the next poll: the kernel then no longer holds
            # the listening socket, and closing it stops it listening.
            self._proactor._cancel_token(self._token, now=True)
            return True
        return False

    def _completed(self, res, flags, data, aux):
        final = not flags & _proactor._MORE
        if final:
            self._token = None
        if res >= 0:
            if self._stopped or self._loop.is_closed():
                os.close(res)
            else:
                self._context.run(self._new_connection, res)
        elif res != -errno.ECANCELED or not self._stopped:
            err = -res
            if err in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of a system resource: as the selector loop, report it
                # and try again a little later.
                self._loop.call_exception_handler({
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(err, os.strerror(err)),
                    "socket": trsock.TransportSocket(self._sock),
                })
                if final and not self._stopped:
                    self._retry = self._loop.call_later(constants.ACCEPT_RETRY_DELAY,
                                                        self.start)
                return
            if err in (errno.ECONNABORTED, errno.EAGAIN, errno.EINTR, errno.EPROTO,
                       errno.ECANCELED):
                pass  # the peer gave up: keep accepting
            else:
                self._failed(OSError(err, os.strerror(err)))
                return
        if final and not self._stopped and not self._loop.is_closed():
            self.start()

    def _failed(self, exc):
        if self._sock.fileno() != -1:
            self._loop.call_exception_handler({
                "message": "Accept failed on a socket",
                "exception": exc,
                "socket": trsock.TransportSocket(self._sock),
            })
        elif self._loop.get_debug():
            logger.debug("Accept failed on socket %r", self._sock, exc_info=True)
        self.cancel()

    def _new_connection(self, fd):
        loop = self._loop
        try:
            conn = socket.socket(self._family, self._type, self._proto, fileno=fd)
        except OSError:
            os.close(fd)
            raise
        conn.settimeout(0)
        if loop._debug:
            logger.debug("%r got a new connection: %r", self._server, conn)
        try:
            protocol = self._protocol_factory()
            if self._sslcontext is not None:
                loop._make_ssl_transport(
                    conn, protocol, self._sslcontext, server_side=True,
                    server=self._server,
                    ssl_handshake_timeout=self._ssl_handshake_timeout,
                    ssl_shutdown_timeout=self._ssl_shutdown_timeout)
            else:
                loop._make_socket_transport(conn, protocol, server=self._server)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            conn.close()
            loop.call_exception_handler({
                "message": "Error on transport creation for incoming connection",
                "exception": exc,
            })


def _numeric_host_port(host, port):
    """True when ``host`` is an IP address literal and ``port`` is None or a
    number: getaddrinfo() then resolves nothing."""
    if isinstance(port, bytes):
        port = port.decode("ascii", "replace")
    if port is not None and not isinstance(port, int) and not (
            isinstance(port, str) and port.isdigit()):
        return False
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str) or not host:
        return False
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


class _SlowCallbackStats(logging.Filter):
    """Adds the engine's state to asyncio's slow-callback warnings."""

    def filter(self, record):
        if isinstance(record.msg, str) and record.msg.startswith("Executing %s took"):
            loop = events._get_running_loop()
            if isinstance(loop, IouringProactorEventLoop) and not loop.is_closed():
                try:
                    st = loop._proactor.stats()
                except (OSError, RuntimeError):
                    return True
                record.msg += " [kloop: %d ops in flight, %d buffers in use, %d CQ overflows]"
                record.args = tuple(record.args or ()) + (
                    st["ops_in_flight"], st["buffers_in_use"], st["cq_overflows"])
        return True


_slow_filter = None


def _install_slow_callback_stats():
    global _slow_filter
    if _slow_filter is None:
        _slow_filter = _SlowCallbackStats()
        logger.addFilter(_slow_filter)


class _Handle(events.Handle):
    # What call_soon() makes outside debug mode: asyncio's Handle, set up
    # without asking the loop whether it is in debug mode (call_soon just
    # did) and without a source traceback, as asyncio's own does then.
    # Named like asyncio's class, so that repr() reads the same.
    __slots__ = ()

    def __init__(self, callback, args, loop, context):
        self._context = contextvars.copy_context() if context is None else context
        self._loop = loop
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._repr = None
        self._source_traceback = None


class _TimerHandle(events.TimerHandle):
    # The same for call_later()/call_at().
    __slots__ = ()

    def __init__(self, when, callback, args, loop, context):
        self._context = contextvars.copy_context() if context is None else context
        self._loop = loop
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._repr = None
        self._source_traceback = None
        self._when = when
        self._scheduled = False


_Handle.__name__ = _Handle.__qualname__ = "Handle"
_TimerHandle.__name__ = _TimerHandle.__qualname__ = "TimerHandle"


class IouringProactorEventLoop(proactor_events.BaseProactorEventLoop):
    """asyncio event loop doing its I/O through io_uring (libkloop)."""

    def __init__(self, proactor=None):
        if proactor is None:
            try:
                proactor = _proactor.IouringProactor()
            except BaseException:
                self._closed = True   # nothing to release in __del__
                raise
        # BaseProactorEventLoop.__init__ would install the signal wakeup fd
        # at once, as Windows needs; on Unix it is installed by
        # add_signal_handler() only, like the selector loop does.
        base_events.BaseEventLoop.__init__(self)
        logger.debug("Using proactor: %s", proactor.__class__.__name__)
        self._proactor = proactor
        self._selector = proactor   # convenient alias (asyncio's own name)
        self._self_reading_future = None
        self._accept_futures = {}   # socket file descriptor => _Acceptor
        self._transports = weakref.WeakValueDictionary()
        self._datagram_view = None  # _datagram.DatagramTransport's buffer
        self._signal_handlers = {}
        self._pid = os.getpid()
        self._generation = _proactor._fork_generation
        self._self_reading_token = None
        proactor.set_loop(self)
        self._make_self_pipe()
        self._start_self_reading()

    def __repr__(self):
        return (f"<{self.__class__.__name__} running={self.is_running()} "
                f"closed={self.is_closed()} debug={self.get_debug()}>")

    # -- the iteration --------------------------------------------------------
    #
    # asyncio's call_soon(), call_later(), call_at() and _run_once() with less
    # Python in between: no _call_soon()/call_at() frame, no Handle._run()
    # frame per callback. The order of
    # work, the timer purge rules and what reaches the exception handler are
    # the stock loop's; debug mode (checks, source tracebacks, slow-callback
    # warnings) and a closed loop take asyncio's own code.

    def call_soon(self, callback, *args, context=None):
        if self._debug or self._closed:
            return super().call_soon(callback, *args, context=context)
        handle = _Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_later(self, delay, callback, *args, context=None):
        if self._debug or self._closed or delay is None:
            return super().call_later(delay, callback, *args, context=context)
        timer = _TimerHandle(self.time() + delay, callback, args, self, context)
        heapq.heappush(self._scheduled, timer)
        timer._scheduled = True
        return timer

    def call_at(self, when, callback, *args, context=None):
        if self._debug or self._closed or when is None:
            return super().call_at(when, callback, *args, context=context)
        timer = _TimerHandle(when, callback, args, self, context)
        heapq.heappush(self._scheduled, timer)
        timer._scheduled = True
        return timer

    def _run_once(self):
        if self._debug:
            return super()._run_once()
        scheduled = self._scheduled
        if scheduled:
            n = len(scheduled)
            if (n > base_events._MIN_SCHEDULED_TIMER_HANDLES and
                    self._timer_cancelled_count / n >
                    base_events._MIN_CANCELLED_TIMER_HANDLES_FRACTION):
                kept = []
                for h in scheduled:
                    if h._cancelled:
                        h._scheduled = False
                    else:
                        kept.append(h)
                heapq.heapify(kept)
                self._scheduled = scheduled = kept
                self._timer_cancelled_count = 0
            else:
                while scheduled and scheduled[0]._cancelled:
                    self._timer_cancelled_count -= 1
                    heapq.heappop(scheduled)._scheduled = False
        ready = self._ready
        if ready or self._stopping:
            timeout = 0
        elif scheduled:
            timeout = min(max(0, scheduled[0]._when - self.time()),
                          base_events.MAXIMUM_SELECT_TIMEOUT)
        else:
            timeout = None
        # The proactor runs its completions itself (_process_events is a
        # no-op on proactor loops).
        self._selector.select(timeout)
        if scheduled:
            end = self.time() + self._clock_resolution
            while scheduled and scheduled[0]._when < end:
                h = heapq.heappop(scheduled)
                h._scheduled = False
                ready.append(h)
        popleft = ready.popleft
        for _ in range(len(ready)):
            h = popleft()
            if h._cancelled:
                continue
            cls = type(h)
            if cls is not _Handle and cls is not _TimerHandle:
                h._run()
                continue
            try:
                h._context.run(h._callback, *h._args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._callback_failed(h, exc)
        h = None  # no cycle through a traceback

    def _callback_failed(self, h, exc):
        # What Handle._run() reports.
        cb = format_helpers._format_callback_source(h._callback, h._args)
        context = {
            "message": f"Exception in callback {cb}",
            "exception": exc,
            "handle": h,
        }
        if h._source_traceback:
            context["source_traceback"] = h._source_traceback
        self.call_exception_handler(context)

    # -- running and closing ------------------------------------------------

    def _check_fork(self):
        if _proactor.forked_since(self._generation):
            raise _proactor.fork_error(self._pid)

    def run_forever(self):
        self._check_fork()
        if self._proactor is not None:
            self._proactor.claim_thread()
        return super().run_forever()

    def run_until_complete(self, future):
        self._check_fork()   # before the coroutine is wrapped in a task
        if self._proactor is not None:
            self._proactor.claim_thread()
        return super().run_until_complete(future)

    async def getaddrinfo(self, host, port, *,
                          family=0, type=0, proto=0, flags=0):
        # Numeric fast path: an IP address with a numeric (or no) port needs
        # no resolver, so it is answered at once instead of through the
        # executor. Anything else, or a numeric lookup that fails, takes
        # asyncio's executor path, errors and debug logging included.
        if _numeric_host_port(host, port):
            numeric = flags | socket.AI_NUMERICHOST
            if port is not None:
                numeric |= socket.AI_NUMERICSERV
            try:
                return socket.getaddrinfo(host, port, family, type, proto, numeric)
            except (socket.gaierror, UnicodeError):
                pass
        return await super().getaddrinfo(host, port, family=family, type=type,
                                         proto=proto, flags=flags)

    def get_stats(self):
        """The engine's counters for this loop, as a dict.

        ``ops_in_flight``, ``streams``, ``buffers_in_use`` (now); ``polls``,
        ``enters``, ``sqes``, ``cqes``, ``completions``, ``cq_overflows``,
        ``enobufs``, ``direct_sends``, ``buffers_released`` (since the loop was
        created); and the derived ``sqes_per_poll`` and ``enters_per_poll``.
        """
        st = self._proactor.stats()
        polls = st["polls"] or 1
        st["sqes_per_poll"] = st["sqes"] / polls
        st["enters_per_poll"] = st["enters"] / polls
        return st

    def set_debug(self, enabled):
        super().set_debug(enabled)
        if enabled:
            _install_slow_callback_stats()

    def close(self):
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        if _proactor.forked_since(self._generation):
            # A forked child: nothing here may touch the parent's ring; the
            # engine only frees this process's copy of its memory.
            self._proactor.close()
            _close_sendfile_pipes(self)
            self._proactor = None
            self._selector = None
            self._signal_handlers.clear()
            self._ssock.close()
            self._csock.close()
            self._ssock = self._csock = None
            self._internal_fds -= 1
            base_events.BaseEventLoop.close(self)
            return
        # Call these methods before closing the event loop (before calling
        # BaseEventLoop.close), because they can schedule callbacks with
        # call_soon(), which is forbidden when the event loop is closed.
        self._stop_accept_futures()
        if not sys.is_finalizing():
            for sig in list(self._signal_handlers):
                self.remove_signal_handler(sig)
        elif self._signal_handlers:
            warnings.warn(f"Closing the loop {self!r} on interpreter shutdown "
                          f"stage, skipping signal handlers removal",
                          ResourceWarning, source=self)
            self._signal_handlers.clear()
        self._stop_self_reading()
        self._proactor.close()
        _close_sendfile_pipes(self)
        self._close_self_pipe()
        self._proactor = None
        self._selector = None
        base_events.BaseEventLoop.close(self)

    def _close_self_pipe(self):
        self._ssock.close()
        self._ssock = None
        self._csock.close()
        self._csock = None
        self._internal_fds -= 1

    # -- self pipe: signals --------------------------------------------------
    #
    # Python's C signal handler writes the signal number into the wakeup fd
    # (self._csock, set by add_signal_handler()); a receive on the ring keeps
    # reading self._ssock. call_soon_threadsafe() wakes the ring directly
    # with kloop_wake() and does not use the socketpair.

    def _start_self_reading(self):
        proactor = self._proactor
        buf = bytearray(4096)
        cbuf = _proactor.ffi.from_buffer(buf)
        entry = _proactor._Internal(None, (buf, cbuf))

        def completed(res, flags, data, aux):
            self._self_reading_token = None
            if res > 0:
                self._process_self_data(bytes(buf[:res]))
            elif res < 0 and res != -errno.ECANCELED and not self.is_closed():
                self.call_exception_handler({
                    "message": "Error on reading from the event loop self pipe",
                    "exception": OSError(-res, os.strerror(-res)),
                    "loop": self,
                })
                return
            if self._ssock is not None and self._proactor is not None and not self._closing_self:
                self._start_self_reading()

        entry._callback = completed
        entry._token = proactor._next_token()
        rc = proactor._lib.kloop_submit_recv(proactor._ptr, entry._token,
                                             self._ssock.fileno(), cbuf, len(buf), 0)
        proactor._register(entry, rc)
        self._self_reading_token = entry._token

    _closing_self = False

    def _stop_self_reading(self):
        self._closing_self = True
        if self._self_reading_token is not None:
            self._proactor._cancel_token(self._self_reading_token)
            self._self_reading_token = None

    def _loop_self_reading(self, f=None):
        # BaseProactorEventLoop's future-based self-pipe reader is replaced
        # by _start_self_reading().
        pass

    def _write_to_self(self):
        # May be called from another thread, possibly while or after the
        # loop closes: IouringProactor.wake() handles that.
        proactor = self._proactor
        if proactor is not None:
            proactor.wake()

    # Signal handling is asyncio's Unix code: it uses self._csock,
    # self._signal_handlers and self._process_self_data.
    _process_self_data = _unix._process_self_data
    add_signal_handler = _unix.add_signal_handler
    remove_signal_handler = _unix.remove_signal_handler
    _handle_signal = _unix._handle_signal
    _check_signal = _unix._check_signal

    # -- transports ------------------------------------------------------------

    def _make_socket_transport(self, sock, protocol, waiter=None,
                               extra=None, server=None):
        return _transports.SocketTransport(self, sock, protocol, waiter, extra, server)

    def _make_ssl_transport(
            self, rawsock, protocol, sslcontext, waiter=None,
            *, server_side=False, server_hostname=None,
            extra=None, server=None,
            ssl_handshake_timeout=None,
            ssl_shutdown_timeout=None):
        return _transports.make_ssl_transport(
            self, rawsock, protocol, sslcontext, waiter,
            server_side=server_side, server_hostname=server_hostname,
            extra=extra, server=server,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout)

    async def start_tls(self, transport, protocol, sslcontext, *,
                        server_side=False,
                        server_hostname=None,
                        ssl_handshake_timeout=None,
                        ssl_shutdown_timeout=None):
        """Upgrade transport to TLS.

        On a kloop stream transport the engine takes the TLS over in place
        where that is safe (transports.start_tls_in_place); otherwise, and
        for every argument check, this is asyncio's start_tls (sslproto).
        """
        started = None
        if (type(transport) is _transports.SocketTransport and ssl is not None
                and isinstance(sslcontext, ssl.SSLContext)):
            started = _transports.start_tls_in_place(
                self, transport, protocol, sslcontext, server_side, server_hostname,
                ssl_handshake_timeout, ssl_shutdown_timeout)
        if started is None:
            return await super().start_tls(
                transport, protocol, sslcontext, server_side=server_side,
                server_hostname=server_hostname,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout)
        new_transport, waiter = started
        try:
            await waiter
        except BaseException:
            new_transport.close()
            raise
        return new_transport

    def _make_datagram_transport(self, sock, protocol,
                                 address=None, waiter=None, extra=None):
        # The stock Unix loop's transport, woken by the ring's polls
        # (_add_reader/_add_writer below), reading a run of datagrams per
        # wake-up: _datagram.py. An io_uring operation per datagram cost a
        # future and a buffer each (UDP echo slower than the stock loop),
        # and on kernel 6.18 an io_uring send on an AF_UNIX SOCK_DGRAM
        # socket whose receiver is full sends the datagram empty (seen with
        # plain liburing). docs/guide.md, "Datagrams".
        return _datagram.DatagramTransport(self, sock, protocol, address, waiter, extra)

    def _make_duplex_pipe_transport(self, sock, protocol, waiter=None,
                                    extra=None):
        raise NotImplementedError

    # Pipes and Unix sockets: asyncio's Unix implementations, which rely on
    # the loop's _add_reader/_add_writer below (pipes: see _pipes.py for the
    # one thing the write pipe transport needs on the ring).
    def _make_read_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        from . import _pipes
        return _pipes.make_read_pipe_transport(self, pipe, protocol, waiter, extra)

    def _make_write_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        from . import _pipes
        return _pipes.make_write_pipe_transport(self, pipe, protocol, waiter, extra)

    create_unix_connection = _unix.create_unix_connection
    create_unix_server = _unix.create_unix_server

    # -- servers ---------------------------------------------------------------

    def _start_serving(self, protocol_factory, sock,
                       sslcontext=None, server=None, backlog=100,
                       ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
                       ssl_shutdown_timeout=constants.SSL_SHUTDOWN_TIMEOUT):
        acceptor = _Acceptor(self, protocol_factory, sock, sslcontext, server,
                             ssl_handshake_timeout, ssl_shutdown_timeout)
        self._accept_futures[sock.fileno()] = acceptor
        acceptor.start()

    def _stop_serving(self, sock):
        acceptor = self._accept_futures.pop(sock.fileno(), None)
        if acceptor is not None:
            # The accept is cancelled in the kernel before this returns
            # (kloop_cancel_now), so close() stops the socket listening at
            # once, as with the selector loop. No shutdown(): the socket may
            # be shared with other processes (pre-fork servers), and
            # shutdown() would stop it for all of them.
            acceptor.cancel()
        sock.close()

    # -- add_reader / add_writer ---------------------------------------------

    def _ensure_fd_no_transport(self, fd):
        fileno = fd
        if not isinstance(fileno, int):
            try:
                fileno = int(fileno.fileno())
            except (AttributeError, TypeError, ValueError):
                # This code matches selectors._fileobj_to_fd function.
                raise ValueError(f"Invalid file object: {fd!r}") from None
        try:
            transport = self._transports[fileno]
        except KeyError:
            pass
        else:
            if not transport.is_closing():
                raise RuntimeError(
                    f"File descriptor {fd!r} is used by transport {transport!r}")

    def _add_reader(self, fd, callback, *args):
        self._check_closed()
        handle = events.Handle(callback, args, self, None)
        self._proactor.watch(_fileobj_to_fd(fd), fd, selectors.EVENT_READ, handle)
        return handle

    def _remove_reader(self, fd):
        if self.is_closed():
            return False
        return self._proactor.unwatch(_fileobj_to_fd(fd), selectors.EVENT_READ)

    def _add_writer(self, fd, callback, *args):
        self._check_closed()
        handle = events.Handle(callback, args, self, None)
        self._proactor.watch(_fileobj_to_fd(fd), fd, selectors.EVENT_WRITE, handle)
        return handle

    def _remove_writer(self, fd):
        if self.is_closed():
            return False
        return self._proactor.unwatch(_fileobj_to_fd(fd), selectors.EVENT_WRITE)

    def add_reader(self, fd, callback, *args):
        """Add a reader callback."""
        self._ensure_fd_no_transport(fd)
        self._add_reader(fd, callback, *args)

    def remove_reader(self, fd):
        """Remove a reader callback."""
        self._ensure_fd_no_transport(fd)
        return self._remove_reader(fd)

    def add_writer(self, fd, callback, *args):
        """Add a writer callback.."""
        self._ensure_fd_no_transport(fd)
        self._add_writer(fd, callback, *args)

    def remove_writer(self, fd):
        """Remove a writer callback."""
        self._ensure_fd_no_transport(fd)
        return self._remove_writer(fd)

    # -- sock_* ----------------------------------------------------------------

    def _check_sock(self, sock, method):
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        if not isinstance(sock, socket.socket):
            # The selector loop calls sock.<method>() first: an object that
            # is not a socket fails there, with the same AttributeError.
            getattr(sock, method)
        self._ensure_fd_no_transport(sock)

    # sock_recv(), sock_recv_into() and sock_sendall() as the selector loop
    # has them: the system call at once on a non-blocking socket, and only a
    # call that would block takes the remaining checks (a transport on the
    # same fd) and the ring. A receive that would block then waits for
    # readability (a one-shot poll on the ring) and calls recv(2) again, as
    # the selector loop does with add_reader(): nothing is received into a
    # buffer of the loop, so a cancelled wait loses no bytes, and the wait
    # costs a C future instead of an operation future with its buffer (a
    # ring recv per wait ran at half the rate in the sock echo benchmark).
    # The call at once is made only when nothing of the same kind is on the
    # ring for the socket and no bytes of a cancelled read are kept (they
    # come first); otherwise the operation queues behind them on the ring.

    def _sock_idle(self, sock, kind):
        p = self._proactor
        return (isinstance(sock, socket.socket) and sock.gettimeout() == 0
                and not p._stash and (sock.fileno(), kind) not in p._inflight
                and not self._closed)

    async def sock_recv(self, sock, n):
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        if self._sock_idle(sock, "r"):
            try:
                return sock.recv(n)
            except (BlockingIOError, InterruptedError):
                pass
            self._ensure_fd_no_transport(sock)
            return await self._sock_when_readable(sock, sock.recv, n)
        self._check_sock(sock, 'recv')
        return await self._proactor.recv(sock, n, try_now=True)

    async def _sock_when_readable(self, sock, call, arg):
        p = self._proactor
        fd = sock.fileno()
        while True:
            fut, token = p.ready(fd, _POLLIN)
            try:
                res = await fut
            except BaseException:
                p.cancel_ready(token)
                raise
            try:
                return call(arg)
            except (BlockingIOError, InterruptedError):
                if res < 0:
                    raise OSError(-res, os.strerror(-res)) from None

    async def sock_recv_into(self, sock, buf):
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        if self._sock_idle(sock, "r"):
            try:
                return sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                pass
            self._ensure_fd_no_transport(sock)
            return await self._sock_when_readable(sock, sock.recv_into, buf)
        self._check_sock(sock, 'recv_into')
        return await self._proactor.recv_into(sock, buf, try_now=True)

    async def sock_recvfrom(self, sock, bufsize):
        self._check_sock(sock, 'recvfrom')
        return await self._proactor.recvfrom(sock, bufsize, try_now=True)

    async def sock_recvfrom_into(self, sock, buf, nbytes=0):
        self._check_sock(sock, 'recvfrom_into')
        if not nbytes:
            nbytes = len(buf)
        view = memoryview(buf)
        if nbytes < len(view):
            view = view[:nbytes]
        elif nbytes > len(view):
            raise ValueError("nbytes is greater than the length of the buffer")
        return await self._proactor.recvfrom_into(sock, view, try_now=True)

    async def sock_sendall(self, sock, data):
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        if (type(data) is bytes or type(data) is bytearray) and \
                self._sock_idle(sock, "w") and _sock_type(sock) == _SOCK_STREAM:
            try:
                n = sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n == len(data):
                return
            self._ensure_fd_no_transport(sock)
            await self._proactor.send(sock, memoryview(data)[n:] if n else data)
            return
        self._check_sock(sock, 'send')
        await self._proactor.send(sock, data, try_now=True)

    async def sock_sendto(self, sock, data, address):
        self._check_sock(sock, 'sendto')
        return await self._proactor.sendto(sock, data, 0, address, try_now=True)

    async def sock_connect(self, sock, address):
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        if sock.family == socket.AF_INET or (
                base_events._HAS_IPv6 and sock.family == socket.AF_INET6):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto,
                loop=self,
            )
            _, _, _, _, address = resolved[0]
        self._ensure_fd_no_transport(sock)
        await self._proactor.connect(sock, address)

    async def sock_accept(self, sock):
        self._check_sock(sock, 'accept')
        conn, address = await self._proactor.accept(sock, try_now=True)
        conn.setblocking(False)
        return conn, address

    async def _sock_sendfile_native(self, sock, file, offset, count):
        # splice(2) file -> pipe -> socket on the ring (_sendfile.py); where
        # the loop has no splice, os.sendfile(2) below.
        from . import _sendfile
        if _sendfile.has_splice(self):
            return await _sendfile.sock_sendfile(self, sock, file, offset, count)
        return await self._sock_sendfile_os(sock, file, offset, count)

    async def _sock_sendfile_os(self, sock, file, offset, count):
        # os.sendfile(2) with the waits for writability on the ring; errors,
        # fallback and file position as asyncio's Unix loop has them.
        from . import _sendfile
        fileno, fsize = _sendfile.regular_file(file)
        blocksize = count if count else fsize
        if not blocksize:
            return 0  # empty file

        fut = self.create_future()
        proactor = self._proactor
        fd = sock.fileno()
        state = {"offset": offset, "total": 0, "token": None, "waited": False}

        def update_filepos():
            if state["total"] > 0:
                os.lseek(fileno, state["offset"], os.SEEK_SET)

        def wait_writable():
            state["waited"] = True
            state["token"] = proactor._poll_internal(fd, 0x004, step)

        def step(res=0, flags=0, data=0, aux=0):
            state["token"] = None
            if fut.done():
                update_filepos()
                return
            size = blocksize
            if count:
                size = count - state["total"]
                if size <= 0:
                    update_filepos()
                    fut.set_result(state["total"])
                    return
            try:
                sent = os.sendfile(fd, fileno, state["offset"], size)
            except (BlockingIOError, InterruptedError):
                wait_writable()
            except OSError as exc:
                if (state["waited"] and exc.errno == errno.ENOTCONN and
                        type(exc) is not ConnectionError):
                    # The connection closed in the middle: normalize to
                    # ConnectionError as on every POSIX system.
                    new_exc = ConnectionError("socket is not connected", errno.ENOTCONN)
                    new_exc.__cause__ = exc
                    exc = new_exc
                update_filepos()
                if state["total"] == 0:
                    # e.g. not a regular file: fall back to send().
                    fut.set_exception(
                        exceptions.SendfileNotAvailableError("os.sendfile call failed"))
                else:
                    fut.set_exception(exc)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                update_filepos()
                fut.set_exception(exc)
            else:
                if sent == 0:
                    update_filepos()
                    fut.set_result(state["total"])
                else:
                    state["offset"] += sent
                    state["total"] += sent
                    wait_writable()

        def on_done(f):
            if f.cancelled():
                if state["token"] is not None:
                    proactor._cancel_token(state["token"])
                update_filepos()

        fut.add_done_callback(on_done)
        step()
        return await fut

    # -- subprocesses ----------------------------------------------------------

    async def _make_subprocess_transport(self, protocol, args, shell,
                                         stdin, stdout, stderr, bufsize,
                                         extra=None, **kwargs):
        from . import _subprocess
        return await _subprocess.make_subprocess_transport(
            self, protocol, args, shell, stdin, stdout, stderr, bufsize,
            extra=extra, **kwargs)


EventLoop = IouringProactorEventLoop
