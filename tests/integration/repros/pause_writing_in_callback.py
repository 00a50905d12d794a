"""A protocol that writes past the high-water mark from data_received().

asyncio calls pause_writing() and later resume_writing(). kloop's working
tree of 2026-11-21 ~07:40 (since fixed) called pause_writing() through the
transport's context while that context was already entered, and reported
"protocol.pause_writing() failed: RuntimeError('cannot enter context')".
"""

import asyncio
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "python"))


class Writer(asyncio.Protocol):
    def __init__(self):
        self.events = []

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=1024)

    def data_received(self, data):
        self.transport.write(b"x" * (1 << 20))

    def pause_writing(self):
        self.events.append("pause")

    def resume_writing(self):
        self.events.append("resume")


async def main():
    loop = asyncio.get_running_loop()
    errors = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    a, b = socket.socketpair()
    transport, protocol = await loop.create_connection(Writer, sock=a)
    b.setblocking(False)
    await loop.sock_sendall(b, b"go")
    got = 0
    while got < (1 << 20):
        got += len(await loop.sock_recv(b, 1 << 16))
    transport.close()
    b.close()
    await asyncio.sleep(0.05)
    return protocol.events, [(c["message"], c.get("exception")) for c in errors]


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "kloop"
    if name == "kloop":
        import kloop
        factory = kloop.new_event_loop
    elif name == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        events, errors = runner.run(main())
    print(f"{name}: protocol events {events}, exception handler calls {errors}")
    sys.exit(1 if errors or "pause" not in events else 0)
