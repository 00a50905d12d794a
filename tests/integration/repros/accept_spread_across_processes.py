"""Two processes accept on one shared listening socket (gunicorn's model).

20 bursts of 50 concurrent connections. With the stock loop and uvloop
both processes take a share; with kloop one process accepts them all.
(kloop's child also reports "Accept failed on a socket ... EINVAL" at the
end: the other process's server.close() shut the shared socket down, see
stop_serving_shared_listener.py.)
"""

import asyncio
import os
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "python"))


def factory(name):
    if name == "kloop":
        import kloop
        return kloop.new_event_loop
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def child(name, lsock, w):
    count = 0

    def on_connection(reader, writer):
        nonlocal count
        count += 1
        writer.close()

    async def serve():
        server = await asyncio.start_server(on_connection, sock=lsock)
        await asyncio.sleep(3)
        server.close()

    with asyncio.Runner(loop_factory=factory(name)) as runner:
        runner.run(serve())
    os.write(w, f"{os.getpid()}:{count}\n".encode())
    os._exit(0)


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "kloop"
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(512)
    addr = lsock.getsockname()
    r, w = os.pipe()
    kids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            child(name, lsock, w)
        kids.append(pid)
    os.close(w)
    time.sleep(0.5)
    for _ in range(20):
        socks = [socket.create_connection(addr) for _ in range(50)]
        for s in socks:
            s.recv(1)
            s.close()
    for pid in kids:
        os.waitpid(pid, 0)
    counts = os.read(r, 1000).decode().split()
    print(f"{name}: connections accepted per process: {counts}")
    if any(c.endswith(":0") for c in counts):
        sys.exit(1)


if __name__ == "__main__":
    main()
