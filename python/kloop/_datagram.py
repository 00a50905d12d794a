"""Datagram transports: asyncio's own selector datagram transport, with
readiness from the ring.

A datagram socket is read and written with recvfrom(2)/sendto(2) from
Python when the ring says it is readable (a multishot poll, as
add_reader()) or, for sends that meet a full socket, writable. This is the
stock Unix loop's transport, so its behaviour is the stock loop's
(error_received(), empty datagrams, flow control, close). Two reasons
against one io_uring operation per datagram, as the proactor transport did:
- speed: a future, a buffer and a completion per datagram cost more than
  the two system calls (UDP echo, 1 KiB, 10 clients: 28k datagrams/s with
  the proactor transport against 42k for the stock loop; see
  docs/performance.md for the figures of this one);
- Linux 6.18's io_uring mishandles a send on a non-blocking AF_UNIX
  SOCK_DGRAM socket whose receiver's queue is full: the kernel waits for
  room itself and then sends the datagram *empty* (the completion says 0
  bytes, the receiver gets b""; reproduced with plain liburing).
"""

from asyncio import selector_events


def make_datagram_transport(loop, sock, protocol, address=None, waiter=None, extra=None):
    return selector_events._SelectorDatagramTransport(
        loop, sock, protocol, address, waiter, extra)
