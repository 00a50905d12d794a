"""Native sendfile: file -> pipe -> socket with IORING_OP_SPLICE.

``loop.sock_sendfile()`` (and ``loop.sendfile()`` on a transport, which the
proactor loop implements with it) moves the file's pages into a pipe and
from the pipe into the socket, two splice operations on the ring; the bytes
are never copied into Python. The pipes are the loop's: a small pool of
pipe pairs (grown to 1 MiB where allowed), made on first use, one per
sendfile in progress, closed with the loop. A pipe that still holds bytes
when a sendfile ends early (error, cancellation) is closed instead of going
back to the pool.

Semantics are those of asyncio's Unix loop (``os.sendfile``):
  * a file without ``fileno()`` or that cannot be stat'ed, or a failure
    before the first byte was sent (e.g. the file is not a regular file:
    splice gives ESPIPE/EINVAL), raises SendfileNotAvailableError, and
    ``sock_sendfile(fallback=True)`` then falls back to read()+send();
  * ``count`` None or 0 sends up to the end of the file (the size at the
    start decides whether there is anything to send);
  * a failure after bytes were sent is raised; ENOTCONN after a wait is
    raised as ConnectionError;
  * the file position is left after the last byte sent, when any was.

The splice towards the socket is issued in the io_uring worker context and
honours the socket's O_NONBLOCK: a full socket completes with -EAGAIN, and
the next splice waits for POLLOUT on the ring first.

Where the loop has no splice (the kernel lacks IORING_OP_SPLICE), the
os.sendfile() path of events.py is used.
"""

import errno
import fcntl
import io
import os

from asyncio import exceptions

from . import _proactor

_POLLOUT = 0x004
_OFFSET_CURRENT = 0xFFFFFFFFFFFFFFFF
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_SPLICE_F_MORE = 4


class _PipePair:
    __slots__ = ("r", "w", "size")

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass
        try:
            self.size = fcntl.fcntl(self.w, _F_GETPIPE_SZ)
        except OSError:
            self.size = 65536

    def close(self):
        if self.r >= 0:
            os.close(self.r)
            os.close(self.w)
            self.r = self.w = -1

    @property
    def closed(self):
        return self.r < 0


class _Pipes:
    """The loop's pipe pairs: ``free`` ones and all of them (to close)."""

    def __init__(self):
        self.free = []
        self.all = set()

    def take(self):
        if self.free:
            return self.free.pop()
        pair = _PipePair()
        self.all.add(pair)
        return pair

    def give_back(self, pair):
        if not pair.closed:
            self.free.append(pair)

    def discard(self, pair):
        self.all.discard(pair)
        pair.close()

    def close(self):
        for pair in self.all:
            pair.close()
        self.all.clear()
        self.free.clear()


def has_splice(loop):
    ok = getattr(loop, "_kloop_has_splice", None)
    if ok is None:
        try:
            ok = "splice" in loop._proactor.caps()["enabled"]
        except Exception:
            ok = False
        loop._kloop_has_splice = ok
    return ok


def close_pipes(loop):
    """Close the loop's pipe pairs (after the proactor's final completions)."""
    pipes = getattr(loop, "_kloop_splice_pipes", None)
    if pipes is not None:
        pipes.close()
        loop._kloop_splice_pipes = None


def _pipes_of(loop):
    pipes = getattr(loop, "_kloop_splice_pipes", None)
    if pipes is None:
        pipes = loop._kloop_splice_pipes = _Pipes()
    return pipes


def regular_file(file):
    """(fileno, size) of a file native sendfile can read, else
    SendfileNotAvailableError (asyncio then falls back)."""
    try:
        fileno = file.fileno()
    except (AttributeError, io.UnsupportedOperation):
        raise exceptions.SendfileNotAvailableError("not a regular file")
    try:
        return fileno, os.fstat(fileno).st_size
    except OSError:
        raise exceptions.SendfileNotAvailableError("not a regular file")


async def sock_sendfile(loop, sock, file, offset, count):
    fileno, fsize = regular_file(file)
    if not (count if count else fsize):
        return 0  # empty file

    proactor = loop._proactor
    lib = proactor._lib
    pipes = _pipes_of(loop)
    pair = pipes.take()
    fd = sock.fileno()
    fut = loop.create_future()
    st = {"offset": offset, "total": 0, "inpipe": 0, "token": None,
          "waited": False, "pair": pair}

    def finish_pipe():
        p = st["pair"]
        if p is None:
            return
        st["pair"] = None
        if st["inpipe"] or st["token"] is not None:
            pipes.discard(p)  # bytes left in it, or an op still on it
        else:
            pipes.give_back(p)

    def update_filepos():
        if st["total"] > 0:
            try:
                os.lseek(fileno, st["offset"], os.SEEK_SET)
            except OSError:
                pass

    def submit(fd_in, off_in, fd_out, length, flags, callback):
        entry = _proactor._Internal(callback)
        entry._token = proactor._next_token()
        rc = lib.kloop_submit_splice(proactor._ptr, entry._token, fd_in, off_in,
                                     fd_out, _OFFSET_CURRENT, length, flags)
        proactor._register(entry, rc)
        st["token"] = entry._token

    def fail(exc):
        update_filepos()
        if st["total"] == 0 and not isinstance(exc, exceptions.SendfileNotAvailableError):
            new = exceptions.SendfileNotAvailableError("splice call failed")
            new.__cause__ = exc
            exc = new
        finish_pipe()
        if not fut.done():
            fut.set_exception(exc)

    def succeed():
        update_filepos()
        finish_pipe()
        if not fut.done():
            fut.set_result(st["total"])

    def gone():
        # The future was cancelled, or the loop is closing under us.
        if fut.done() or proactor._ptr is None:
            update_filepos()
            finish_pipe()
            return True
        return False

    def fill():
        want = st["pair"].size
        if count:
            left = count - st["total"]
            if left <= 0:
                succeed()
                return
            want = min(want, left)
        try:
            submit(fileno, st["offset"] + st["inpipe"], st["pair"].w, want, 0, filled)
        except Exception as exc:
            fail(exc)

    def filled(res, flags, data, aux):
        st["token"] = None
        if res > 0:
            st["inpipe"] = res
        if gone():
            return
        if res < 0:
            fail(OSError(-res, os.strerror(-res)))
        elif res == 0:
            succeed()  # end of file
        else:
            drain()

    def drain():
        try:
            submit(st["pair"].r, _OFFSET_CURRENT, fd, st["inpipe"], _SPLICE_F_MORE, drained)
        except Exception as exc:
            fail(exc)

    def wait_writable():
        st["waited"] = True

        def ready(res, flags, data, aux):
            st["token"] = None
            if gone():
                return
            if res < 0:
                # Cancelled (the loop is closing) or the fd cannot be polled.
                fail(OSError(-res, os.strerror(-res)))
                return
            drain()

        try:
            st["token"] = proactor._poll_internal(fd, _POLLOUT, ready)
        except Exception as exc:
            fail(exc)

    def drained(res, flags, data, aux):
        st["token"] = None
        if res > 0:
            st["inpipe"] -= res
            st["offset"] += res
            st["total"] += res
        if gone():
            return
        if res == -errno.EAGAIN or res == -errno.EINTR:
            wait_writable()
            return
        if res < 0:
            exc = OSError(-res, os.strerror(-res))
            if res == -errno.ENOTCONN and st["waited"]:
                new = ConnectionError("socket is not connected", errno.ENOTCONN)
                new.__cause__ = exc
                exc = new
            elif res == -errno.EPIPE:
                exc = BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
            elif res == -errno.ECONNRESET:
                exc = ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
            fail(exc)
            return
        if res == 0:
            # The socket took nothing and said nothing: treat as closed.
            fail(ConnectionError("socket is not connected", errno.ENOTCONN))
            return
        if st["inpipe"]:
            drain()
        else:
            fill()

    def on_done(f):
        if f.cancelled() and st["token"] is not None:
            try:
                proactor._cancel_token(st["token"])
            except Exception:
                pass
            # The completion of the cancelled op hands the pipe back (gone()).

    fut.add_done_callback(on_done)
    fill()
    return await fut
