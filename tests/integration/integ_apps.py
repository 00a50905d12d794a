"""ASGI and aiohttp applications the integration tests serve.

Every app answers ``/loop`` with the class of the loop it runs on, so a
test can check that the server really runs on the loop it asked for.
"""

import asyncio
import hashlib
import os


def loop_class():
    cls = type(asyncio.get_running_loop())
    return f"{cls.__module__}.{cls.__qualname__}"


# -- a bare ASGI app (uvicorn hello-world benchmark) --------------------------

async def hello_asgi(scope, receive, send):
    """The smallest useful ASGI app: 13 bytes of text for any request."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/loop":
        body = loop_class().encode()
    else:
        body = b"Hello, world!"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- Starlette ----------------------------------------------------------------

def make_starlette():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route, WebSocketRoute

    async def hello(request):
        return PlainTextResponse("Hello, world!")

    async def loop(request):
        return PlainTextResponse(loop_class())

    async def pid(request):
        return PlainTextResponse(str(os.getpid()))

    async def peer(request):
        # The client's port tells requests on one connection apart from
        # requests on several (keep-alive).
        client = request.client
        return JSONResponse({"host": client.host if client else None,
                             "port": client.port if client else None})

    async def upload(request):
        h = hashlib.sha256()
        n = chunks = 0
        async for chunk in request.stream():
            h.update(chunk)
            n += len(chunk)
            chunks += bool(chunk)
        return JSONResponse({"size": n, "sha256": h.hexdigest(), "chunks": chunks})

    async def blob(request):
        size = int(request.query_params.get("size", "0"))
        return Response(_blob(size), media_type="application/octet-stream")

    async def stream(request):
        n = int(request.query_params.get("n", "10"))
        size = int(request.query_params.get("size", "100"))
        delay = float(request.query_params.get("delay", "0"))

        async def gen():
            for i in range(n):
                yield (b"%08d" % i) + b"s" * (size - 8)
                if delay:
                    await asyncio.sleep(delay)

        return StreamingResponse(gen(), media_type="application/octet-stream")

    async def slow(request):
        await asyncio.sleep(float(request.query_params.get("t", "1")))
        return PlainTextResponse("slow done")

    async def ws_echo(websocket):
        await websocket.accept()
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is not None:
                if msg["text"] == "close-please":
                    await websocket.close(code=4001)
                    return
                await websocket.send_text(msg["text"])
            else:
                await websocket.send_bytes(msg["bytes"])

    return Starlette(routes=[
        Route("/", hello),
        Route("/loop", loop),
        Route("/peer", peer),
        Route("/pid", pid),
        Route("/upload", upload, methods=["POST"]),
        Route("/blob", blob),
        Route("/stream", stream),
        Route("/slow", slow),
        WebSocketRoute("/ws", ws_echo),
    ])


def _blob(size):
    return (hashlib.sha256(b"blob").digest() * (size // 32 + 1))[:size]


# -- FastAPI ------------------------------------------------------------------

def make_fastapi():
    from fastapi import FastAPI, HTTPException, WebSocket
    from fastapi.responses import PlainTextResponse
    from pydantic import BaseModel

    app = FastAPI()
    items = {}

    class Item(BaseModel):
        name: str
        price: float
        tags: list = []

    @app.get("/", response_class=PlainTextResponse)
    async def hello():
        return "Hello, world!"

    @app.get("/loop", response_class=PlainTextResponse)
    async def loop():
        return loop_class()

    @app.post("/items/{item_id}")
    async def put_item(item_id: int, item: Item):
        items[item_id] = item
        return {"id": item_id, "name": item.name, "total": item.price * len(item.tags)}

    @app.get("/items/{item_id}")
    async def get_item(item_id: int):
        if item_id not in items:
            raise HTTPException(status_code=404, detail="no such item")
        return items[item_id]

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        async for text in websocket.iter_text():
            await websocket.send_json({"echo": text, "len": len(text)})

    return app


# -- aiohttp -------------------------------------------------------------------

def make_aiohttp(static_dir=None):
    from aiohttp import WSMsgType, web

    async def hello(request):
        return web.Response(text="Hello, world!")

    async def loop(request):
        return web.Response(text=loop_class())

    async def peer(request):
        host, port = request.transport.get_extra_info("peername")[:2] if isinstance(
            request.transport.get_extra_info("peername"), tuple) else (None, None)
        return web.json_response({"host": host, "port": port})

    async def upload(request):
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"size": n, "sha256": h.hexdigest()})

    async def stream(request):
        n = int(request.query.get("n", "10"))
        size = int(request.query.get("size", "100"))
        delay = float(request.query.get("delay", "0"))
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        for i in range(n):
            await resp.write((b"%08d" % i) + b"s" * (size - 8))
            if delay:
                await asyncio.sleep(delay)
        await resp.write_eof()
        return resp

    async def slow(request):
        await asyncio.sleep(float(request.query.get("t", "1")))
        return web.Response(text="slow done")

    async def ws_echo(request):
        ws = web.WebSocketResponse(max_msg_size=8 << 20)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data == "close-please":
                    await ws.close(code=4001, message=b"bye")
                    break
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/", hello)
    app.router.add_get("/loop", loop)
    app.router.add_get("/peer", peer)
    app.router.add_post("/upload", upload)
    app.router.add_get("/stream", stream)
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws", ws_echo)
    if static_dir:
        app.router.add_static("/static", static_dir)
    return app


class AiohttpServed:
    """An aiohttp app served on the running loop (TCP, TLS or Unix)."""

    def __init__(self, app, ssl_context=None, unix_path=None):
        self.app = app
        self.ssl_context = ssl_context
        self.unix_path = unix_path

    async def __aenter__(self):
        from aiohttp import web

        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        if self.unix_path:
            site = web.UnixSite(self.runner, self.unix_path)
        else:
            site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        if self.unix_path:
            self.url = "http://localhost"
        else:
            port = self.runner.addresses[0][1]
            scheme = "https" if self.ssl_context else "http"
            self.url = f"{scheme}://127.0.0.1:{port}"
            self.port = port
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


# Module-level apps for "integ_apps:starlette_app"-style import strings
# (uvicorn, gunicorn). Built lazily: importing this module stays cheap.
def __getattr__(name):
    if name == "starlette_app":
        return make_starlette()
    if name == "fastapi_app":
        return make_fastapi()
    raise AttributeError(name)
