"""Subprocesses: asyncio's Unix subprocess transport, reaped by the ring.

The process is started by asyncio's own ``_UnixSubprocessTransport``
(subprocess.Popen) and its pipes are ordinary loop pipe transports; instead
of a child watcher (a thread or SIGCHLD), the engine waits for the exit
with ``kloop_submit_child_exit()`` (IORING_OP_WAITID, or a pidfd poll) and
reaps the child.
"""

import errno
import os

from asyncio import unix_events

from . import _proactor


async def make_subprocess_transport(loop, protocol, args, shell, stdin, stdout, stderr,
                                    bufsize, extra=None, **kwargs):
    waiter = loop.create_future()
    transp = unix_events._UnixSubprocessTransport(
        loop, protocol, args, shell, stdin, stdout, stderr, bufsize,
        waiter=waiter, extra=extra, **kwargs)
    _watch_exit(loop, transp)
    try:
        await waiter
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        transp.close()
        await transp._wait()
        raise
    return transp


def _watch_exit(loop, transp):
    proactor = loop._proactor
    pid = transp.get_pid()

    def exited(res, flags, data, aux):
        if res >= 0:
            returncode = os.waitstatus_to_exitcode(res)
        else:
            # Someone else reaped it (Popen.poll(), a child watcher calling
            # waitpid(-1)): use what they saw, as asyncio's watchers do.
            returncode = transp._proc.returncode if transp._proc is not None else None
            if returncode is None:
                returncode = 255
            if res != -errno.ECHILD and res != -errno.ECANCELED:
                loop.call_exception_handler({
                    "message": f"kloop: waiting for child process {pid} failed",
                    "exception": OSError(-res, os.strerror(-res)),
                })
        if loop.is_closed():
            return
        # Let callbacks queued by this iteration (pipe data) run first, as
        # asyncio's child watcher callback does.
        loop.call_soon(loop.call_soon, transp._process_exited, returncode)

    entry = _proactor._Internal(exited)
    entry._token = proactor._next_token()
    rc = proactor._lib.kloop_submit_child_exit(proactor._ptr, entry._token, pid)
    proactor._register(entry, rc)
