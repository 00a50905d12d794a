"""The datagram transport: the stock Unix loop's, reading a run per wake-up.

UDP and Unix datagram endpoints use asyncio's ``_SelectorDatagramTransport``
on the loop's ``_add_reader``/``_add_writer`` (level-triggered multishot
polls on the ring): its sending, queueing, flow control, error_received()
and closing are the stock loop's, unchanged. Two things differ in reading:

* When the ring reports the socket readable, the transport reads datagrams
  until the socket is empty or ``READ_BURST`` have been read, as libuv (and
  so uvloop) does. The stock transport reads one per readiness report, so
  that every datagram costs a trip through the loop: the poll's completion,
  its callback and a re-arm.
* Each datagram is received into one 256 KiB buffer of the loop and copied
  into a ``bytes`` of its own size. The stock transport asks recvfrom(2) for
  a fresh 256 KiB ``bytes`` object per datagram and shrinks it. The size
  limit is the same (``max_size``, 256 KiB: a longer Unix datagram is cut
  there, as on the stock loop).

Nothing else is observable: datagram_received() gets ``(bytes, address)``
with the same address forms; a closed transport stops the run; an OSError
of recvfrom(2) (an ICMP error on a connected socket) goes to
error_received() and ends the run, the next readiness report goes on.
"""

from asyncio import selector_events

#: Most datagrams read per readiness report (libuv reads up to 32).
READ_BURST = 32


class DatagramTransport(selector_events._SelectorDatagramTransport):

    def _read_ready(self):
        if self._conn_lost:
            return
        loop = self._loop
        view = loop._datagram_view
        if view is None:
            view = loop._datagram_view = memoryview(bytearray(self.max_size))
        recvfrom_into = self._sock.recvfrom_into
        for _ in range(READ_BURST):
            try:
                n, addr = recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, 'Fatal read error on datagram transport')
                return
            self._protocol.datagram_received(view[:n].tobytes(), addr)
            if self._conn_lost:
                return
