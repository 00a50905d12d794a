"""Run uvicorn on a chosen event loop (the launcher the tests start).

    python serve_uvicorn.py --loop kloop --app integ_apps:starlette_app --port 8000

Debian 12's uvicorn (0.17.6) takes --loop from a fixed list (auto, asyncio,
uvloop, none). kloop is selected the way docs/integrations.md shows: install
kloop's event loop policy, then run uvicorn with loop="none", so that the
asyncio.run() inside uvicorn makes a kloop loop.
"""

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--loop", choices=["asyncio", "kloop", "uvloop"], required=True)
    p.add_argument("--app", default="integ_apps:starlette_app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uds")
    p.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    p.add_argument("--ws", default="auto", choices=["auto", "none", "websockets", "wsproto"])
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--log-level", default="info")
    p.add_argument("--ssl-certfile")
    p.add_argument("--ssl-keyfile")
    args = p.parse_args(argv)

    import uvicorn

    if args.loop == "kloop":
        import kloop

        kloop.install()
        loop_setting = "none"
    else:
        loop_setting = args.loop
    kw = {"uds": args.uds} if args.uds else {"host": args.host, "port": args.port}
    if args.ssl_certfile:
        kw.update(ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    uvicorn.run(args.app, loop=loop_setting, http=args.http, ws=args.ws,
                access_log=args.access_log, log_level=args.log_level,
                timeout_keep_alive=30, **kw)


if __name__ == "__main__":
    sys.exit(main())
