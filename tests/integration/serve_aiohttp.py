"""Run an aiohttp app with web.run_app() on a chosen loop.

    python serve_aiohttp.py --loop kloop --port 8080 [--static DIR]

run_app() takes the loop to run on (``loop=kloop.new_event_loop()``) and
stops on SIGINT/SIGTERM through the loop's signal handlers. The app's
on_shutdown and on_cleanup hooks print a line each, so a test can see that
the graceful path ran.
"""

import argparse
import asyncio
import sys

from aiohttp import web
from aiohttp.log import access_logger

import integ_apps


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--loop", choices=["asyncio", "kloop", "uvloop"], required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--static")
    p.add_argument("--access-log", action="store_true")
    args = p.parse_args(argv)

    if args.loop == "kloop":
        import kloop

        loop = kloop.new_event_loop()
    elif args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()

    app = integ_apps.make_aiohttp(args.static)

    async def on_shutdown(app):
        print("hook: on_shutdown", flush=True)

    async def on_cleanup(app):
        print("hook: on_cleanup", flush=True)

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    web.run_app(app, host=args.host, port=args.port, loop=loop, shutdown_timeout=10,
                access_log=access_logger if args.access_log else None,
                print=lambda *a: print(*a, flush=True))
    print("run_app returned", flush=True)


if __name__ == "__main__":
    sys.exit(main())
