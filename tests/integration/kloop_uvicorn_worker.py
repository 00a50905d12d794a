"""gunicorn worker classes running uvicorn on a chosen loop.

    gunicorn -k kloop_uvicorn_worker.KloopUvicornWorker app:app

uvicorn's own UvicornWorker (Debian 12: uvicorn 0.17.6) takes its loop
from CONFIG_KWARGS["loop"], a fixed list. This subclass sets it to "none"
(use the loop the event loop policy makes) and installs kloop's policy in
each worker process, after gunicorn forked it. AsyncioUvicornWorker is the
stock-loop twin the tests compare against.
"""

from uvicorn.workers import UvicornWorker


class KloopUvicornWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "none", "http": "auto"}

    def init_process(self):
        import kloop

        kloop.install()
        super().init_process()


class AsyncioUvicornWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "asyncio", "http": "auto"}
