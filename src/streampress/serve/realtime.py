"""The WebSocket endpoint ``/v1/realtime``: OpenAI Realtime API text and image events.

One connection is one stream. See :mod:`streampress.serve` for the events supported and what
streampress adds; the event shapes follow the ``openai`` package's ``openai.types.realtime``
models, so the official client parses every server event.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..formatting import json_default
from .config import ServeError, check_max_new_tokens
from .engine import Engine, Job, Stream, new_id
from .images import decode_data_url

__all__ = ["RealtimeConnection", "ResponseEvents", "error_event", "session_object"]

CLIENT_EVENTS = ("session.update", "conversation.item.create", "response.create", "response.cancel",
                 "streampress.watch.create", "streampress.watch.delete")
UNSUPPORTED_EVENTS = ("input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
                      "output_audio_buffer.clear", "conversation.item.retrieve", "conversation.item.truncate",
                      "conversation.item.delete")
_CLOSE = object()


def error_event(error: ServeError | dict, event_id: str | None = None) -> dict:
    """An ``error`` server event (``RealtimeErrorEvent``)."""
    body = error.as_dict(event_id) if isinstance(error, ServeError) else {"param": None, **error}
    if event_id is not None:
        body.setdefault("event_id", event_id)
    return {"type": "error", "event_id": new_id("event"), "error": body}


def session_object(engine: Engine, stream: Stream, instructions: str = "") -> dict:
    """The ``session`` of ``session.created`` / ``session.updated`` (a
    ``RealtimeSessionCreateRequest``, with streampress's settings in ``streampress``)."""
    settings = stream.settings
    return {"type": "realtime", "object": "realtime.session", "id": stream.id, "model": engine.model_name,
            "output_modalities": ["text"], "instructions": instructions,
            "max_output_tokens": settings.max_new_tokens,
            "streampress": {**settings.public(), "stream_id": stream.id, "frames_per_item": engine.fpi,
                            "limits": engine.limits.public()}}


class ResponseEvents:
    """Turns a job's ``started`` / ``delta`` / ``done`` into Realtime server events:
    ``response.output_item.added``, ``conversation.item.created``,
    ``response.content_part.added``, ``response.output_text.delta``,
    ``response.output_text.done``, ``response.content_part.done``,
    ``response.output_item.done``, ``response.done``."""

    def __init__(self, response_id: str, max_output_tokens: int, conversation_id: str | None = None,
                 metadata: Any = None, previous_item_id: str | None = None):
        self.response_id = response_id
        self.item_id = new_id("item")
        self.max_output_tokens = max_output_tokens
        self.conversation_id = conversation_id
        self.metadata = metadata
        self.previous_item_id = previous_item_id
        self.started = False
        self.done = False

    def response(self, status: str = "in_progress", **extra) -> dict:
        return {"id": self.response_id, "object": "realtime.response", "status": status,
                "conversation_id": self.conversation_id, "output_modalities": ["text"],
                "max_output_tokens": self.max_output_tokens, "metadata": self.metadata, "output": [], **extra}

    def created(self) -> list[dict]:
        return [{"type": "response.created", "response": self.response()}]

    def _item(self, status: str, text: str | None) -> dict:
        content = [] if text is None else [{"type": "output_text", "text": text}]
        return {"id": self.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": content}

    def _where(self) -> dict:
        return {"response_id": self.response_id, "item_id": self.item_id, "output_index": 0, "content_index": 0}

    def on(self, kind: str, data: dict) -> list[dict]:
        if kind == "started":
            self.started = True
            return [{"type": "response.output_item.added", "response_id": self.response_id, "output_index": 0,
                     "item": self._item("in_progress", None)},
                    {"type": "conversation.item.created", "previous_item_id": self.previous_item_id,
                     "item": self._item("in_progress", None)},
                    {"type": "response.content_part.added", **self._where(), "part": {"type": "text", "text": ""}}]
        if kind == "delta":
            return [{"type": "response.output_text.delta", **self._where(), "delta": data["text"]}]
        if kind == "done":
            self.done = True
            events = []
            status, text = data["status"], data["text"]
            item_status = "completed" if status == "completed" else "incomplete"
            if self.started:
                events += [{"type": "response.output_text.done", **self._where(), "text": text},
                           {"type": "response.content_part.done", **self._where(),
                            "part": {"type": "text", "text": text}},
                           {"type": "response.output_item.done", "response_id": self.response_id, "output_index": 0,
                            "item": self._item(item_status, text)}]
            details = None
            if status != "completed":
                details = {"type": status, "reason": data.get("reason")}
                if data.get("error"):
                    details["error"] = data["error"]
            sp = dict(data["streampress"])
            sp.update(token_ids=data["token_ids"], question=data["question"])
            if data.get("choice") is not None:
                sp.update(choice=data["choice"], option_logits=data["option_logits"])
            usage = {"output_tokens": len(data["token_ids"]),
                     "input_token_details": {"image_tokens": sp.get("visual_tokens")}}
            events.append({"type": "response.done", "response": self.response(
                status, status_details=details, output=[self._item(item_status, text)] if self.started else [],
                usage=usage, streampress=sp)})
            return events
        return []


class RealtimeConnection:
    """One WebSocket connection (already accepted): one stream, one response at a time."""

    def __init__(self, websocket, engine: Engine, ping_timeout: float | None = None):
        self.ws = websocket
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.stream: Stream | None = None
        self.texts: list[str] = []
        self.instructions = ""
        self.job: Job | None = None
        self.events: ResponseEvents | None = None
        self.last_item: str | None = None
        self.conversation_id = new_id("conv")

    # ------------------------------------------------------------------ plumbing
    def post(self, event) -> None:
        self.outbox.put_nowait(event)

    def _from_worker(self, handler, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(handler, *args)
        except RuntimeError:  # the loop is gone: the connection ended
            pass

    async def _sender(self) -> None:
        while True:
            event = await self.outbox.get()
            if event is _CLOSE:
                await self.ws.close(1000)
                return
            event.setdefault("event_id", new_id("event"))
            await self.ws.send_text(json.dumps(event, default=json_default))

    async def run(self) -> None:
        from starlette.websockets import WebSocketDisconnect

        self.stream = self.engine.create_stream(listener=lambda kind, data: self._from_worker(
            self._on_stream_event, kind, data))
        sender = asyncio.create_task(self._sender())
        self.post({"type": "session.created", "session": session_object(self.engine, self.stream)})
        try:
            while not sender.done():
                receive = asyncio.create_task(self.ws.receive())
                done, _ = await asyncio.wait({receive, sender}, return_when=asyncio.FIRST_COMPLETED)
                if receive not in done:
                    receive.cancel()
                    break
                message = receive.result()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is not None:
                    await self.handle(message["text"])
                else:
                    self.post(error_event(ServeError("binary messages are not supported: send JSON events as text",
                                                     code="invalid_event")))
        except WebSocketDisconnect:
            pass
        finally:
            if self.job is not None:
                self.engine.cancel(self.job, "client_disconnected")
            self.engine.close_stream(self.stream, "disconnected")
            if not sender.done():
                # let queued events (a final error) go out briefly, then stop
                self.post(_CLOSE)
                try:
                    await asyncio.wait_for(sender, 1.0)
                except (asyncio.TimeoutError, Exception):
                    sender.cancel()

    def _on_stream_event(self, kind: str, data: dict) -> None:
        if kind == "watch":  # a proactive answer (streampress addition)
            self.post({"type": "streampress.watch.answer", **data})
        elif kind == "error":
            self.post(error_event(data))
        elif kind == "closed":
            reason = data.get("reason")
            if reason not in ("disconnected",):
                code = "session_expired" if reason == "idle" else "session_closed"
                self.post(error_event({"type": "invalid_request_error", "code": code,
                                       "message": f"the session was closed ({reason})"}))
                self.post(_CLOSE)

    def _on_job_event(self, holder: dict, events: ResponseEvents, kind: str, data: dict) -> None:
        job = holder.get("job")
        for event in events.on(kind, data):
            self.post(event)
        if kind == "started":
            self.last_item = events.item_id
        if kind == "done" and self.job is job:
            self.job, self.events = None, None

    # ------------------------------------------------------------------ client events
    async def handle(self, text: str) -> None:
        event_id = None
        try:
            try:
                event = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                raise ServeError("the message is not valid JSON", code="invalid_json") from None
            if not isinstance(event, dict):
                raise ServeError("an event must be a JSON object with a type", code="invalid_event")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            kind = event.get("type")
            if not isinstance(kind, str):
                raise ServeError("the event has no type", code="invalid_event", param="type")
            if kind in UNSUPPORTED_EVENTS:
                raise ServeError(f"{kind} is not supported by streampress (text and image events only)",
                                 code="unsupported_event", param="type")
            if kind not in CLIENT_EVENTS:
                raise ServeError(f"unknown event type {kind!r}; supported: {', '.join(CLIENT_EVENTS)}",
                                 code="unknown_event", param="type")
            handler = {"session.update": self.session_update, "conversation.item.create": self.item_create,
                       "response.create": self.response_create, "response.cancel": self.response_cancel,
                       "streampress.watch.create": self.watch_create,
                       "streampress.watch.delete": self.watch_delete}[kind]
            await handler(event)
        except ServeError as exc:
            self.engine.count_error(exc.code)
            self.post(error_event(exc, event_id))

    async def watch_create(self, event: dict) -> None:
        """``streampress.watch.create`` {watch: {question, yes_no?, options?, min_interval?,
        max_new_tokens?}} -> ``streampress.watch.created`` {watch}; its proactive answers come
        as ``streampress.watch.answer`` {watch_id, watch, time, trigger_time, text}."""
        watch = self.engine.add_watch(self.stream, event.get("watch"))
        self.post({"type": "streampress.watch.created", "watch": watch})

    async def watch_delete(self, event: dict) -> None:
        """``streampress.watch.delete`` {watch_id} -> ``streampress.watch.deleted`` {watch_id}."""
        self.engine.remove_watch(self.stream, event.get("watch_id"))
        self.post({"type": "streampress.watch.deleted", "watch_id": event.get("watch_id")})

    async def session_update(self, event: dict) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise ServeError("session.update needs a session object", param="session")
        if session.get("type", "realtime") != "realtime":
            raise ServeError(f"session.type: only realtime sessions are supported, got {session.get('type')!r}",
                             param="session.type", code="unsupported_value")
        for key in ("output_modalities", "modalities"):
            if key in session and (not isinstance(session[key], list) or set(session[key]) != {"text"}):
                raise ServeError(f"session.{key}: streampress answers in text only; use [\"text\"]",
                                 param=f"session.{key}", code="unsupported_value")
        instructions = session.get("instructions", self.instructions)
        if not isinstance(instructions, str):
            raise ServeError("session.instructions: expected a string", param="session.instructions")
        patch = session.get("streampress", {})
        if not isinstance(patch, dict):
            raise ServeError("session.streampress: expected an object of streampress settings",
                             param="session.streampress")
        patch = dict(patch)
        if "max_output_tokens" in session:
            patch["max_new_tokens"] = check_max_new_tokens(session["max_output_tokens"], self.engine.limits,
                                                           "session.max_output_tokens")
        _prefixed(lambda: self.engine.update(self.stream, patch), "session.streampress.")
        self.instructions = instructions
        self.post({"type": "session.updated",
                   "session": session_object(self.engine, self.stream, self.instructions)})

    async def item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise ServeError("conversation.item.create needs an item object", param="item")
        if item.get("type", "message") != "message" or item.get("role") != "user":
            raise ServeError("item: only user messages (type message, role user) are supported",
                             param="item.role" if item.get("type", "message") == "message" else "item.type",
                             code="unsupported_value")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise ServeError("item.content: expected a non-empty list of input_image / input_text parts",
                             param="item.content")
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "input_text":
                if not isinstance(part.get("text"), str):
                    raise ServeError(f"item.content[{i}].text: expected a string", param=f"item.content[{i}].text")
                texts.append(part["text"])
            elif kind != "input_image":
                raise ServeError(f"item.content[{i}].type: expected input_image or input_text, got {kind!r}",
                                 param=f"item.content[{i}].type", code="unsupported_value")
        total = sum(map(len, self.texts)) + sum(map(len, texts))
        if total > self.engine.limits.max_question_chars:
            raise ServeError(f"the question would be {total} characters, over the limit of "
                             f"{self.engine.limits.max_question_chars}", param="item.content", code="question_too_long")
        frames, echoed = [], []
        for i, part in enumerate(content):
            if part["type"] == "input_text":
                echoed.append({"type": "input_text", "text": part["text"]})
                continue
            param = f"item.content[{i}]"
            t, keep = _prefixed(lambda part=part: self.engine.admit(self.stream, part.get("timestamp")), param + ".")
            status = "skipped"
            if keep:
                try:
                    image = await asyncio.to_thread(decode_data_url, part.get("image_url"), self.engine.limits,
                                                    self.engine.size, param + ".image_url")
                except ServeError:
                    self.engine.reject(self.stream, "invalid_image")
                    raise
                status = _prefixed(lambda image=image, t=t: self.engine.push(self.stream, image, t), param + ".")
            frames.append({"timestamp": t, "status": status})
            echoed.append({"type": "input_image", "detail": part.get("detail", "auto"), "timestamp": t})
        self.texts.extend(texts)
        item_id = item.get("id") if isinstance(item.get("id"), str) else new_id("item")
        self.post({"type": "conversation.item.created", "previous_item_id": self.last_item,
                   "item": {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                            "status": "completed", "content": echoed,
                            "streampress": {"frames": frames, "waiting": len(self.stream.queue)}}})
        self.last_item = item_id

    async def response_create(self, event: dict) -> None:
        if self.job is not None:
            raise ServeError(f"a response ({self.events.response_id}) is in progress; wait for its response.done "
                             "or send response.cancel", code="conversation_already_has_active_response")
        response = event.get("response", {})
        if response is None:
            response = {}
        if not isinstance(response, dict):
            raise ServeError("response: expected an object", param="response")
        if "input" in response:
            raise ServeError("response.input is not supported: send the question as input_text items",
                             param="response.input", code="unsupported_value")
        for key in ("output_modalities", "modalities"):
            if key in response and (not isinstance(response[key], list) or set(response[key]) != {"text"}):
                raise ServeError(f"response.{key}: streampress answers in text only", param=f"response.{key}",
                                 code="unsupported_value")
        max_tokens = None
        if "max_output_tokens" in response:
            max_tokens = check_max_new_tokens(response["max_output_tokens"], self.engine.limits,
                                              "response.max_output_tokens")
        extra = response.get("streampress", {})
        if not isinstance(extra, dict) or set(extra) - {"options"}:
            raise ServeError("response.streampress: expected an object with options only",
                             param="response.streampress")
        question = "\n".join(t for t in self.texts if t.strip())
        if not question.strip():
            raise ServeError("no question: send input_text items before response.create", code="empty_question")
        events = ResponseEvents(new_id("resp"), max_tokens or self.stream.settings.max_new_tokens,
                                self.conversation_id if response.get("conversation", "auto") != "none" else None,
                                response.get("metadata"), self.last_item)
        holder: dict = {}

        def emit(kind, data):
            self._from_worker(self._on_job_event, holder, events, kind, data)

        holder["job"] = job = _prefixed(lambda: self.engine.ask(self.stream, question, emit, max_tokens,
                                                                 extra.get("options")), "response.streampress.")
        events.response_id = job.id
        self.job, self.events = job, events
        self.texts.clear()
        for e in events.created():
            self.post(e)

    async def response_cancel(self, event: dict) -> None:
        wanted = event.get("response_id")
        if self.job is None or (wanted is not None and wanted != self.job.id):
            raise ServeError("no response in progress" + (f" with id {wanted!r}" if wanted else ""),
                             code="response_cancel_not_active", param="response_id" if wanted else None)
        self.engine.cancel(self.job, "client_cancelled")


def _prefixed(call, prefix: str):
    """``call()``, with the param of a ServeError it raises put under ``prefix``."""
    try:
        return call()
    except ServeError as exc:
        if exc.param and not exc.param.startswith(prefix.split(".")[0]):
            exc.param = prefix + exc.param
        raise


