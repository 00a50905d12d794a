"""A pre-fork server: parent and child share one listening socket.

The child serves for a moment, then stops serving (what a gunicorn worker
does when it restarts). The socket must go on listening for the parent and
the other workers. On kloop, Server.close() in the child shuts the socket
down (shutdown(2) acts on the socket every process shares), so the
parent's connection attempt is refused.
"""

import asyncio
import os
import socket
import sys

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


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "kloop"
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    addr = lsock.getsockname()
    pid = os.fork()
    if pid == 0:
        async def serve_briefly():
            loop = asyncio.get_running_loop()
            server = await loop.create_server(asyncio.Protocol, sock=lsock)
            await asyncio.sleep(0.1)
            server.close()
            await server.wait_closed()

        with asyncio.Runner(loop_factory=factory(name)) as runner:
            runner.run(serve_briefly())
        os._exit(0)
    os.waitpid(pid, 0)
    try:
        socket.create_connection(addr, timeout=2).close()
        print(f"{name}: the parent's socket still listens: OK")
    except OSError as exc:
        print(f"{name}: the parent's socket no longer listens: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
