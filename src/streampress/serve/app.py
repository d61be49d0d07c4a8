"""The FastAPI application: the Realtime WebSocket, the HTTP API, health, metrics, the page.

:func:`create_app` wires an :class:`~streampress.serve.engine.Engine` (started and stopped
with the application) to the routes below. Every error is JSON in OpenAI's shape
``{"error": {"type", "code", "message", "param"}}`` with a 4xx (or 5xx) status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from .config import ServeError
from .engine import Engine
from .images import decode_data_url, decode_image
from .realtime import RealtimeConnection, ResponseEvents

__all__ = ["create_app", "STATIC_DIR", "PUBLIC_PATHS", "MAX_FRAMES_PER_REQUEST"]

STATIC_DIR = Path(__file__).with_name("static")
PUBLIC_PATHS = ("/", "/static")  # files only: no model access, no stream data; served without a key
MAX_FRAMES_PER_REQUEST = 16
KEY_PROTOCOL = "openai-insecure-api-key."  # how browsers (which cannot set headers on a socket) pass the key


def create_app(engine: Engine, api_key: str | None = None, allow_pull: bool = False,
               static_dir: str | Path | None = None, manage_engine: bool = True):
    """The application. ``api_key``: required as ``Authorization: Bearer KEY`` on every
    endpoint but the static page (constant-time comparison); ``allow_pull``: allow streams
    the server reads itself (files, URLs, cameras on the server's machine); ``manage_engine``:
    start the engine with the application and stop it at shutdown."""
    static = Path(static_dir) if static_dir is not None else STATIC_DIR
    expected = api_key.encode() if api_key else None

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.stop)

    app = FastAPI(title="streampress", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    def key_ok(given: str | None) -> bool:
        return expected is None or (given is not None and hmac.compare_digest(given.encode(), expected))

    def bearer(header: str | None) -> str | None:
        if header and header[:7].lower() == "bearer ":
            return header[7:].strip()
        return None

    def error_response(exc: ServeError) -> JSONResponse:
        return JSONResponse({"error": exc.as_dict()}, status_code=exc.status,
                            headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        path = request.url.path
        public = path == "/" or any(path.startswith(p + "/") for p in PUBLIC_PATHS if p != "/")
        if not public and not key_ok(bearer(request.headers.get("authorization"))):
            engine.count_error("unauthorized")
            return error_response(ServeError("missing or wrong API key: send Authorization: Bearer KEY",
                                             code="invalid_api_key", status=401))
        return await call_next(request)

    @app.exception_handler(ServeError)
    async def on_serve_error(request, exc: ServeError):
        engine.count_error(exc.code)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(ServeError(str(exc.detail), code=code, status=exc.status_code))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return error_response(ServeError(f"{where}: {first.get('msg', 'invalid request')}", param=where or None))

    # ------------------------------------------------------------------ page, health, metrics
    @app.get("/", include_in_schema=False)
    async def index():
        page = static / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return PlainTextResponse("streampress serve: no web page installed; the API is at /v1 (see the README)\n")

    app.mount("/static", StaticFiles(directory=static, check_dir=False), name="static")

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics_text(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ WebSocket
    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket):
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        from_protocol = next((p[len(KEY_PROTOCOL):] for p in offered if p.startswith(KEY_PROTOCOL)), None)
        given = bearer(websocket.headers.get("authorization")) or from_protocol
        refusal = None
        if not key_ok(given):
            refusal = ServeError("missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key",
                                 status=401)
        elif engine.count(include_closing=False) >= engine.limits.max_sessions:
            refusal = ServeError(f"the server is at its limit of {engine.limits.max_sessions} sessions",
                                 code="too_many_sessions", status=503, type="server_error")
        if refusal is not None:
            engine.count_error(refusal.code)
            if "websocket.http.response" in websocket.scope.get("extensions", {}):
                await websocket.send_denial_response(error_response(refusal))
            else:
                await websocket.close(code=1008 if refusal.status == 401 else 1013, reason=refusal.code)
            return
        subprotocol = "realtime" if "realtime" in offered else None
        await websocket.accept(subprotocol=subprotocol)
        try:
            await RealtimeConnection(websocket, engine).run()
        except ServeError as exc:  # e.g. the session limit reached in between
            await websocket.send_text(json.dumps({"type": "error", "event_id": "event_refused",
                                                  "error": exc.as_dict()}))
            await websocket.close(1013)

    # ------------------------------------------------------------------ HTTP streams
    async def json_body(request: Request, allow_empty: bool = True) -> dict:
        raw = await request.body()
        if not raw.strip():
            if allow_empty:
                return {}
            raise ServeError("expected a JSON object body", code="invalid_json")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ServeError("the body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ServeError("expected a JSON object body", code="invalid_json")
        return body

    @app.get("/v1/streams")
    async def list_streams():
        return {"object": "list", "data": [engine.stream_stats(s) for s in engine.streams()]}

    @app.post("/v1/streams", status_code=201)
    async def create_stream(request: Request):
        return await new_stream(request, None)

    @app.put("/v1/streams/{stream_id}", status_code=201)
    async def create_named_stream(stream_id: str, request: Request):
        """A stream with an id the client chose: every request of the stream then carries
        the id in its path, for a load balancer to pin the stream to one server."""
        return await new_stream(request, stream_id)

    async def new_stream(request: Request, stream_id: str | None):
        body = await json_body(request)
        source = body.pop("source", None)
        rate_given = "realtime" in body
        realtime_rate = body.pop("realtime", True)
        settings = engine.defaults.updated(body, engine.limits)
        if source is not None:
            if not allow_pull:
                raise ServeError("pull mode is off: start the server with --allow-pull to let it read files, "
                                 "URLs or cameras itself", code="pull_disabled", status=403, param="source")
            if isinstance(source, bool) or not isinstance(source, (str, int)) or source == "":
                raise ServeError("source: expected a file or folder path, a stream URL or a camera index",
                                 param="source")
            if not isinstance(realtime_rate, bool):
                raise ServeError("realtime: expected true or false", param="realtime")
        elif rate_given:
            raise ServeError("realtime: applies to pull mode (with source) only", param="realtime")
        s = engine.create_stream(settings, kind="pull" if source is not None else "push", stream_id=stream_id)
        if source is not None:
            engine.pull(s, source, realtime=realtime_rate)
        return JSONResponse(engine.stream_stats(s), status_code=201)

    @app.get("/v1/streams/{stream_id}")
    async def get_stream(stream_id: str):
        return engine.stream_stats(engine.get(stream_id))

    @app.patch("/v1/streams/{stream_id}")
    async def update_stream(stream_id: str, request: Request):
        s = engine.get(stream_id)
        engine.update(s, await json_body(request, allow_empty=False))
        return engine.stream_stats(s)

    @app.delete("/v1/streams/{stream_id}")
    async def delete_stream(stream_id: str):
        s = engine.get(stream_id)
        engine.close_stream(s, "deleted")
        return {"id": s.id, "object": "streampress.stream", "deleted": True}

    @app.post("/v1/streams/{stream_id}/frames", status_code=202)
    async def push_frames(stream_id: str, request: Request):
        s = engine.get(stream_id)
        if s.kind == "pull":
            raise ServeError("this stream reads its own source; frames cannot be pushed to it",
                             code="pull_stream", status=409)
        limits = engine.limits
        length = request.headers.get("content-length")
        cap = MAX_FRAMES_PER_REQUEST * (limits.max_frame_bytes * 4 // 3 + 4096)
        if length is not None and length.isdigit() and int(length) > cap:
            raise ServeError(f"the request is {length} bytes, over the limit of {cap} bytes", status=413,
                             code="request_too_large")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        items = []  # (decode thunk, timestamp, param)
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=MAX_FRAMES_PER_REQUEST, max_fields=2 * MAX_FRAMES_PER_REQUEST,
                                          max_part_size=64 * 1024)
            except Exception as exc:
                raise ServeError(f"the multipart body cannot be read: {getattr(exc, 'detail', exc)}",
                                 code="invalid_body") from None
            files = form.getlist("frame")
            stamps = form.getlist("timestamp")
            if not files or not all(hasattr(f, "read") for f in files):
                raise ServeError("expected one or more files in the form field 'frame'", param="frame")
            if stamps and len(stamps) != len(files):
                raise ServeError(f"timestamp: give one per frame ({len(files)} frames, {len(stamps)} timestamps) "
                                 "or none", param="timestamp")
            for i, f in enumerate(files):
                data = await f.read(limits.max_frame_bytes + 1)
                stamp = _number(stamps[i], f"timestamp[{i}]") if stamps else None
                items.append((lambda data=data, i=i: decode_image(data, limits, engine.size, f"frame[{i}]"),
                              stamp, f"frame[{i}]"))
        elif kind in ("image/jpeg", "image/png"):
            data = await request.body()
            stamp = request.query_params.get("timestamp")
            stamp = _number(stamp, "timestamp") if stamp is not None else None
            expected = "JPEG" if kind == "image/jpeg" else "PNG"
            items.append((lambda: decode_image(data, limits, engine.size, "body", expected), stamp, "body"))
        elif kind in ("application/json", ""):
            body = await json_body(request, allow_empty=False)
            entries = body.get("frames", [body]) if "frames" in body else [body]
            if not isinstance(entries, list) or not entries or len(entries) > MAX_FRAMES_PER_REQUEST:
                raise ServeError(f"frames: expected a list of 1 to {MAX_FRAMES_PER_REQUEST} frames", param="frames")
            for i, entry in enumerate(entries):
                where = f"frames[{i}]" if "frames" in body else ""
                if not isinstance(entry, dict) or "image_url" not in entry:
                    raise ServeError(f"{where or 'body'}: expected an object with image_url (a data URL) and "
                                     "optionally timestamp", param=f"{where}.image_url".lstrip("."))
                items.append((lambda e=entry, w=where: decode_data_url(e["image_url"], limits, engine.size,
                                                                        f"{w}.image_url".lstrip(".")),
                              entry.get("timestamp"), where))
        else:
            raise ServeError(f"unsupported content type {kind!r}: send multipart/form-data (field frame), "
                             "application/json (image_url data URLs) or image/jpeg / image/png",
                             code="unsupported_media_type", status=415)
        if len(items) > MAX_FRAMES_PER_REQUEST:
            raise ServeError(f"at most {MAX_FRAMES_PER_REQUEST} frames per request", param="frame")
        results = []
        for decode, stamp, where in items:
            prefix = f"{where}." if where else ""
            try:
                t, keep = engine.admit(s, stamp)
            except ServeError as exc:
                if exc.param and prefix:
                    exc.param = prefix + exc.param
                raise
            status = "skipped"
            if keep:
                try:
                    image = await asyncio.to_thread(decode)
                except ServeError:
                    engine.reject(s, "invalid_image")
                    raise
                status = engine.push(s, image, t)
            results.append({"timestamp": t, "status": status})
        return JSONResponse({"id": s.id, "frames": results, "waiting": len(s.queue)}, status_code=202)

    @app.post("/v1/streams/{stream_id}/ask")
    async def ask(stream_id: str, request: Request):
        s = engine.get(stream_id)
        body = await json_body(request, allow_empty=False)
        unknown = sorted(set(body) - {"question", "max_new_tokens", "options", "stream"})
        if unknown:
            raise ServeError(f"{unknown[0]}: unknown field; expected question, max_new_tokens, options, stream",
                             param=unknown[0])
        streamed = body.get("stream", True)
        if not isinstance(streamed, bool):
            raise ServeError("stream: expected true or false", param="stream")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind, data):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, data))
            except RuntimeError:
                pass

        job = engine.ask(s, body.get("question"), emit, body.get("max_new_tokens"), body.get("options"))
        events = ResponseEvents(job.id, job.max_new_tokens)
        if not streamed:
            try:
                while True:
                    kind, data = await queue.get()
                    if kind == "done":
                        return {"id": job.id, "object": "streampress.answer", **{k: v for k, v in data.items()
                                                                                 if k != "id"}}
            finally:
                engine.cancel(job, "client_disconnected")

        async def sse():
            try:
                for event in events.created():
                    yield _sse(event)
                while True:
                    kind, data = await queue.get()
                    for event in events.on(kind, data):
                        yield _sse(event)
                    if kind == "done":
                        yield "data: [DONE]\n\n"
                        return
            finally:
                engine.cancel(job, "client_disconnected")  # no-op when the answer is done

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _sse(event: dict) -> str:
    from .engine import new_id

    event.setdefault("event_id", new_id("event"))
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


def _number(text, param: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ServeError(f"{param}: expected seconds, got {text!r}", param=param) from None
