"""Unix datagram transports: sends by send(2), waits on the ring.

Linux 6.18's io_uring mishandles a send on a non-blocking AF_UNIX
SOCK_DGRAM socket whose receiver's queue is full: the kernel waits for
room itself and then sends the datagram *empty* (the completion says 0
bytes, the receiver gets b""); reproduced with plain liburing (one
io_uring_prep_send after filling the receiver). The transport for Unix
datagram sockets therefore sends with send(2)/sendto(2) from Python, as
the selector loop does, and only waits for writability on the ring (a
poll) when the socket says EAGAIN. Receiving stays on the ring.

Behaviour as the stock loops: datagrams leave in order; a send error goes
to error_received() and drops that datagram; pause_writing()/
resume_writing() follow the queue; close() waits until the queue is sent.
"""

import socket

from . import events as _events

_POLLOUT = 0x004


class UnixDatagramTransport(_events._DatagramTransport):

    def _loop_writing(self, fut=None):
        try:
            if self._conn_lost:
                return
            assert fut is self._write_fut
            self._write_fut = None
            if fut:
                fut.result()  # the wait for writability
            sock = self._sock
            connected = self._address is not None
            while self._buffer:
                data, addr = self._buffer[0]
                try:
                    if connected:
                        sock.send(data)
                    else:
                        sock.sendto(data, addr)
                except (BlockingIOError, InterruptedError):
                    self._write_fut = self._loop._proactor._readiness(
                        sock, _POLLOUT, _nothing)
                    break
                except OSError as exc:
                    self._buffer.popleft()
                    self._buffer_size -= len(data)
                    self._maybe_resume_protocol()
                    self._protocol.error_received(exc)
                    return
                self._buffer.popleft()
                self._buffer_size -= len(data)
            else:
                self._maybe_resume_protocol()
                if self._closing:
                    self._loop.call_soon(self._call_connection_lost, None)
                return
        except OSError as exc:
            self._protocol.error_received(exc)
        except Exception as exc:
            self._fatal_error(exc, "Fatal write error on datagram transport")
        else:
            if self._write_fut is not None:
                self._write_fut.add_done_callback(self._loop_writing)
            self._maybe_resume_protocol()


def _nothing():
    return None


def make_datagram_transport(loop, sock, protocol, address=None, waiter=None, extra=None):
    if sock.family == socket.AF_UNIX:
        return UnixDatagramTransport(loop, sock, protocol, address, waiter, extra)
    return _events._DatagramTransport(loop, sock, protocol, address, waiter, extra)
