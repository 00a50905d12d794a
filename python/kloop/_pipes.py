"""Pipe transports: asyncio's Unix pipe transports on the ring's polls.

connect_read_pipe/connect_write_pipe use asyncio's own
``_UnixReadPipeTransport``/``_UnixWritePipeTransport`` on top of the loop's
``_add_reader``/``_add_writer`` (level-triggered multishot polls on the
ring, see IouringProactor.watch). One thing needs help: the order in which
a reader and a writer of the same fd are called.

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
the reader would have fired, and runs it first if so.
"""

import os
import select
import stat
import sys

from asyncio import unix_events

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


def make_read_pipe_transport(loop, pipe, protocol, waiter=None, extra=None):
    return unix_events._UnixReadPipeTransport(loop, pipe, protocol, waiter, extra)


def make_write_pipe_transport(loop, pipe, protocol, waiter=None, extra=None):
    return _WritePipeTransport(loop, pipe, protocol, waiter, extra)
