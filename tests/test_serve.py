"""``streampress serve``: the Realtime WebSocket, the HTTP API, limits, the scheduler and the
command, on the tiny random Qwen model, over loopback only, every test bounded in time.

One server (an engine with an API key and pull mode on) runs in-process on a free port for
the module; tests that need other limits build their own engine on the same model."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")
httpx = pytest.importorskip("httpx")

import websockets  # noqa: E402
from PIL import Image  # noqa: E402

import streampress  # noqa: E402
from streampress.serve import Engine, Limits, StreamSettings, create_app  # noqa: E402
from streampress.serve.server import BackgroundServer  # noqa: E402

TINY = "random:qwen2.5-vl-tiny"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SRC = Path(__file__).resolve().parents[1] / "src"
LIMITS = Limits(max_sessions=6, max_frame_bytes=300_000, max_frame_pixels=200 * 200, max_push_rate=1000,
                max_fps=30, max_question_chars=300, max_new_tokens=512, queue_frames=16, idle_timeout=120)
PRUNED = {"method": "streaming_assistant", "keep_ratio": 0.5}


# ---------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _deadline():
    """Every test stops after 60 s (SIGALRM interrupts a blocked main thread)."""
    def expired(*_):
        raise TimeoutError("test took longer than 60 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def frames_of(seed: int, n: int, size: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def image_item(image, timestamp=None) -> dict:
    part = {"type": "input_image", "image_url": data_url(image) if isinstance(image, np.ndarray) else image}
    if timestamp is not None:
        part["timestamp"] = timestamp
    return {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [part]}}


def text_item(text: str) -> dict:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


def in_process(model, frames, question, max_new_tokens, settings: dict | None = None):
    """What StreamingSession.ask gives on ``frames`` (at 0, 1, 2, ... s), fed one item at a time
    as the server feeds them."""
    s = StreamSettings().updated(settings or {}, LIMITS)
    session = streampress.StreamingSession(model, pruner=s.make_pruner(), cacher=s.make_cacher(),
                                           memory=s.make_memory())
    for i in range(0, len(frames), 2):
        session.add_frames(frames[i:i + 2], [float(t) for t in range(i, min(i + 2, len(frames)))])
    return session.ask(question, max_new_tokens=max_new_tokens)


class Client:
    """A WebSocket client of /v1/realtime (the websockets package), every wait bounded."""

    def __init__(self, ws):
        self.ws = ws

    @classmethod
    async def connect(cls, url, headers=AUTH):
        ws = await asyncio.wait_for(websockets.connect(url + "/v1/realtime", additional_headers=headers,
                                                       max_size=None), 10)
        OPEN.append(ws)
        client = cls(ws)
        created = await client.recv()
        assert created["type"] == "session.created" and created["session"]["type"] == "realtime"
        client.session = created["session"]
        return client

    async def send(self, event):
        await self.ws.send(json.dumps(event) if isinstance(event, dict) else event)

    async def recv(self, timeout: float = 20) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def call(self, event) -> dict:
        await self.send(event)
        return await self.recv()

    async def until(self, kind: str, timeout: float = 30) -> list[dict]:
        events = []
        deadline = time.monotonic() + timeout
        while not events or events[-1]["type"] != kind:
            events.append(await self.recv(max(0.1, deadline - time.monotonic())))
        return events

    async def ask(self, question: str, **response) -> list[dict]:
        assert (await self.call(text_item(question)))["type"] == "conversation.item.created"
        await self.send({"type": "response.create", **({"response": response} if response else {})})
        return await self.until("response.done")

    async def close(self):
        await self.ws.close()


def answer_of(events: list[dict]) -> tuple[str, dict]:
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = events[-1]["response"]
    assert done["status"] in ("completed", "incomplete"), done
    text = next(e["text"] for e in events if e["type"] == "response.output_text.done")
    assert deltas == text == done["output"][0]["content"][0]["text"]
    return text, done


async def stream_frames(client: Client, frames, settings: dict | None = None):
    if settings is not None:
        reply = await client.call({"type": "session.update", "session": {"streampress": settings}})
        assert reply["type"] == "session.updated", reply
    for i, image in enumerate(frames):
        reply = await client.call(image_item(image, float(i)))
        assert reply["type"] == "conversation.item.created", reply
        assert reply["item"]["streampress"]["frames"][0]["status"] == "queued"


OPEN: list = []  # sockets of the running test, closed whatever happens


def run(coro, timeout: float = 45):
    async def guarded():
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            while OPEN:
                await OPEN.pop().close()

    return asyncio.run(guarded())


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def model():
    import torch

    torch.set_num_threads(1)
    return streampress.load_model(TINY)


@pytest.fixture(scope="module")
def server(model):
    engine = Engine(model, StreamSettings(fps=30, max_new_tokens=8), LIMITS, model_name=TINY)
    with BackgroundServer(create_app(engine, api_key=KEY, allow_pull=True)) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        yield client


# ---------------------------------------------------------------------------- the command
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_and_stop(port: int, alive, send_sigterm, wait_exit) -> int:
    """Wait for /health, answer a question over the socket, SIGTERM with the socket open:
    the socket is closed and the process exits; returns its exit status."""
    deadline = time.monotonic() + 45
    while True:
        assert alive(), "the server process ended"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", headers=AUTH, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


    async def go():
        client = await Client.connect(f"ws://127.0.0.1:{port}")
        await stream_frames(client, frames_of(15, 1), {"fps": 30})
        events = await client.ask("Hi?", max_output_tokens=2)
        assert events[-1]["response"]["status"] in ("completed", "incomplete")
        send_sigterm()  # with a socket open
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await client.recv(timeout=15)

    run(go())
    return wait_exit()


def test_serve_command_stops_cleanly_on_sigterm(model):
    """``streampress serve`` (its main(), in a forked process holding the loaded model: this
    test runs first, before the module's server starts threads)."""
    port = free_port()

    def child():
        code = 1
        try:
            from streampress.cli import main
            from streampress.cli import model as model_arg

            model_arg.load = lambda *args, **kwargs: model
            code = main(["serve", "--model", TINY, "--port", str(port), "-q", "--api-key", KEY])
        finally:
            os._exit(code)

    proc = multiprocessing.get_context("fork").Process(target=child, daemon=True)
    proc.start()
    try:
        assert serve_and_stop(port, proc.is_alive, proc.terminate, lambda: (proc.join(15), proc.exitcode)[1]) == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


@pytest.mark.slow
def test_serve_command_starts_and_stops_as_a_process():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "STREAMPRESS_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "streampress.cli", "serve", "--model", TINY, "--port", str(port),
                             "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve_and_stop(port, lambda: proc.poll() is None, lambda: proc.send_signal(signal.SIGTERM),
                              lambda: proc.wait(timeout=15)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# ---------------------------------------------------------------------------- WebSocket
@pytest.mark.parametrize("settings", [{}, PRUNED], ids=["dense", "pruned"])
def test_realtime_answer_equals_in_process_ask(server, model, settings):
    frames = frames_of(1, 5)  # odd: the question also sees the frame still waiting for its partner

    async def go():
        client = await Client.connect(server.ws_url)
        await stream_frames(client, frames, settings)
        events = await client.ask("What happens?", max_output_tokens=12)
        await client.close()
        return events

    events = run(go())
    expected = in_process(model, frames, "What happens?", 12, settings)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.output_item.added", "conversation.item.created",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.done"]
    text, done = answer_of(events)
    sp = done["streampress"]
    assert sp["token_ids"] == expected.token_ids and text == expected.text
    assert (sp["frames"], sp["items"], sp["visual_tokens"]) == (5, 3, expected.visual_tokens)
    assert done["usage"]["output_tokens"] == len(expected.token_ids)
    assert done["usage"]["input_token_details"]["image_tokens"] == expected.visual_tokens
    assert sp["time_to_first_token"] > 0 and sp["first_token_latency"] >= sp["time_to_first_token"]
    if settings:
        assert sp["visual_tokens"] < 3 * 9 and sp["kept_fraction"] < 1
    assert all(e["event_id"].startswith("event_") for e in events)


def test_official_openai_realtime_client(server, model):
    openai = pytest.importorskip("openai")
    from openai.types.realtime import ResponseDoneEvent, ResponseTextDeltaEvent, SessionUpdatedEvent

    frames = frames_of(2, 2)

    async def go():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY)
        events = []
        async with client.realtime.connect(model=TINY) as conn:
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                               "streampress": {"fps": 30}})
            for i, image in enumerate(frames):
                await conn.conversation.item.create(item={
                    "type": "message", "role": "user",
                    "content": [{"type": "input_image", "image_url": data_url(image), "timestamp": float(i)}]})
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Describe it."}]})
            await conn.response.create(response={"max_output_tokens": 6})
            async for event in conn:
                events.append(event)
                if event.type == "response.done":
                    break
        return events

    events = run(go())
    assert isinstance(events[0], openai.types.realtime.SessionCreatedEvent)
    assert any(isinstance(e, SessionUpdatedEvent) for e in events)
    deltas = [e for e in events if isinstance(e, ResponseTextDeltaEvent)]
    done = events[-1]
    assert isinstance(done, ResponseDoneEvent) and done.response.status in ("completed", "incomplete")
    expected = in_process(model, frames, "Describe it.", 6)
    assert "".join(d.delta for d in deltas) == expected.text
    assert done.response.output[0].content[0].text == expected.text
    assert done.response.usage.output_tokens == len(expected.token_ids)


def test_two_concurrent_clients_get_what_each_gets_alone(server, model):
    work = [(frames_of(3, 4), "What is red?", {}), (frames_of(4, 3), "Where is it?", PRUNED)]

    async def one(frames, question, settings):
        client = await Client.connect(server.ws_url)
        await stream_frames(client, frames, settings)
        events = await client.ask(question, max_output_tokens=10)
        await client.close()
        return answer_of(events)[1]["streampress"]["token_ids"]

    async def both():
        return await asyncio.gather(*(one(*w) for w in work))

    got = run(both())
    for (frames, question, settings), ids in zip(work, got):
        assert ids == in_process(model, frames, question, 10, settings).token_ids


def test_disconnect_mid_answer_leaves_no_session(server):
    engine = server.engine
    before = engine.metrics.answers.get("cancelled", 0)
    refs = []

    async def go():
        client = await Client.connect(server.ws_url)
        await stream_frames(client, frames_of(5, 2))
        wait_for(lambda: any(s.session is not None for s in engine.streams()), what="the session")
        refs.extend(weakref.ref(s.session) for s in engine.streams())
        await client.send(text_item("Tell me everything."))
        await client.send({"type": "response.create", "response": {"max_output_tokens": 400}})
        await client.until("response.output_text.delta")
        await client.ws.close()  # mid-answer

    run(go())
    wait_for(lambda: engine.count() == 0, what="the stream to be freed")
    wait_for(lambda: engine.metrics.answers.get("cancelled", 0) > before, what="the cancelled answer")
    gc.collect()
    assert refs and all(r() is None for r in refs)


def test_realtime_bad_input_gets_error_events_and_the_session_goes_on(server, model):
    frames = frames_of(6, 3)
    big = np.zeros((250, 250, 3), np.uint8)  # over max_frame_pixels
    cases = [
        ("not json", "invalid_json", None),
        ("[1, 2]", "invalid_event", None),
        ({"event_id": "e1"}, "invalid_event", "type"),
        ({"type": "foo.bar"}, "unknown_event", "type"),
        ({"type": "input_audio_buffer.append", "audio": ""}, "unsupported_event", "type"),
        ({"type": "session.update"}, "invalid_value", "session"),
        ({"type": "session.update", "session": {"type": "transcription"}}, "unsupported_value", "session.type"),
        ({"type": "session.update", "session": {"output_modalities": ["audio"]}}, "unsupported_value",
         "session.output_modalities"),
        ({"type": "session.update", "session": {"max_output_tokens": 0}}, "invalid_value",
         "session.max_output_tokens"),
        ({"type": "session.update", "session": {"instructions": 5}}, "invalid_value", "session.instructions"),
        ({"type": "session.update", "session": {"streampress": {"method": "nope"}}}, "invalid_value",
         "session.streampress.method"),
        ({"type": "session.update", "session": {"streampress": {"keep_ratio": 2}}}, "invalid_value",
         "session.streampress.keep_ratio"),
        ({"type": "session.update", "session": {"streampress": {"fps": 100}}}, "invalid_value",
         "session.streampress.fps"),
        ({"type": "session.update", "session": {"streampress": {"memory": "window:-1"}}}, "invalid_value",
         "session.streampress.memory"),
        ({"type": "session.update", "session": {"streampress": {"colour": 1}}}, "invalid_value",
         "session.streampress.colour"),
        ({"type": "conversation.item.create"}, "invalid_value", "item"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "assistant", "content": []}},
         "unsupported_value", "item.role"),
        ({"type": "conversation.item.create", "item": {"type": "function_call"}}, "unsupported_value", "item.type"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": []}},
         "invalid_value", "item.content"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                       "content": [{"type": "input_audio"}]}},
         "unsupported_value", "item.content[0].type"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                       "content": [{"type": "input_text", "text": 3}]}},
         "invalid_value", "item.content[0].text"),
        (text_item("x" * 400), "question_too_long", "item.content"),
        (image_item("https://example.com/a.png"), "invalid_image", "item.content[0].image_url"),
        (image_item("data:image/gif;base64,R0lGOD"), "invalid_image", "item.content[0].image_url"),
        (image_item("data:image/png;base64,@@@@"), "invalid_image", "item.content[0].image_url"),
        (image_item("data:image/png;base64," + base64.b64encode(b"no image here").decode()), "invalid_image",
         "item.content[0].image_url"),
        (image_item("data:image/jpeg;base64," + base64.b64encode(png(frames[0])).decode()), "invalid_image",
         "item.content[0].image_url"),
        (image_item("data:image/png;base64," + "A" * 420_000), "frame_too_large", "item.content[0].image_url"),
        (image_item(big), "frame_too_large", "item.content[0].image_url"),
        (image_item(frames[0], "soon"), "invalid_value", "item.content[0].timestamp"),
        (image_item(frames[0], -1), "invalid_value", "item.content[0].timestamp"),
        ({"type": "response.create"}, "empty_question", None),
        ({"type": "response.create", "response": {"input": []}}, "unsupported_value", "response.input"),
        ({"type": "response.cancel"}, "response_cancel_not_active", None),
    ]

    async def go():
        client = await Client.connect(server.ws_url)
        for event, code, param in cases:
            reply = await client.call(event)
            assert reply["type"] == "error", (event, reply)
            assert (reply["error"]["code"], reply["error"]["param"]) == (code, param), (str(event)[:80], reply)
            assert reply["error"]["type"] in ("invalid_request_error", "server_error") and reply["error"]["message"]
        await client.send(b"\x00binary")
        assert (await client.recv())["error"]["code"] == "invalid_event"
        reply = await client.call({"type": "foo", "event_id": "evt_7"})
        assert reply["error"]["event_id"] == "evt_7"
        # frames: time may not go backwards, size may not change; fps thins them (before decoding)
        await stream_frames(client, frames[:2])
        reply = await client.call(image_item(frames[2], 0.5))
        assert reply["error"]["code"] == "timestamp_backwards"
        reply = await client.call(image_item(frames_of(7, 1, size=64)[0], 5.0))
        assert reply["error"]["code"] == "frame_size_changed"
        reply = await client.call(image_item(frames[2], 2.0))
        assert reply["item"]["streampress"]["frames"] == [{"timestamp": 2.0, "status": "queued"}]
        reply = await client.call({"type": "session.update", "session": {"streampress": {"fps": 1}}})
        assert reply["session"]["streampress"]["fps"] == 1
        reply = await client.call(image_item("not even a data url", 2.5))  # skipped before it is decoded
        assert reply["item"]["streampress"]["frames"][0]["status"] == "skipped"
        # one response at a time; response.cancel stops it
        await client.send(text_item("Long answer?"))
        await client.send({"type": "response.create", "response": {"max_output_tokens": 500}})
        await client.until("response.created")
        await client.send(text_item("Another?"))
        await client.send({"type": "response.create"})
        events = await client.until("error")
        assert events[-1]["error"]["code"] == "conversation_already_has_active_response"
        await client.send({"type": "response.cancel"})
        done = (await client.until("response.done"))[-1]["response"]
        assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
        # ...and the session is intact: the answer is the in-process one on the frames accepted
        events = await client.ask("Is it intact?", max_output_tokens=8)
        await client.close()
        return events

    events = run(go())
    expected = in_process(model, frames, "Another?\nIs it intact?", 8)
    assert answer_of(events)[1]["streampress"]["token_ids"] == expected.token_ids


def test_session_update_round_trip_and_reset(server):
    async def go():
        client = await Client.connect(server.ws_url)
        assert client.session["streampress"]["method"] == "none" and client.session["model"] == TINY
        reply = await client.call({"type": "session.update", "session": {
            "type": "realtime", "instructions": "Be brief.", "max_output_tokens": "inf", "audio": {},
            "streampress": {**PRUNED, "memory": "window:30", "cacher": True, "fps": 2}}})
        assert reply["type"] == "session.updated"
        sp = reply["session"]["streampress"]
        assert (sp["method"], sp["keep_ratio"], sp["memory"], sp["fps"]) == ("streaming_assistant", 0.5,
                                                                             "window:30", 2.0)
        assert sp["cacher"]["interval"] == 2 and reply["session"]["max_output_tokens"] == LIMITS.max_new_tokens
        assert reply["session"]["instructions"] == "Be brief."
        await stream_frames(client, frames_of(8, 2))
        events = await client.ask("What?", max_output_tokens=3)
        assert answer_of(events)[1]["streampress"]["frames"] == 2
        reply = await client.call({"type": "session.update", "session": {"streampress": {"method": "none"}}})
        assert reply["session"]["streampress"]["keep_ratio"] is None
        events = await client.ask("And now?", max_output_tokens=3)  # the stream started over
        assert events[-1]["response"]["streampress"]["frames"] == 0
        await client.close()

    run(go())


def test_socket_auth_and_session_limit(server):
    async def go():
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(websockets.exceptions.InvalidStatus) as info:
                await Client.connect(server.ws_url, headers=headers)
            assert info.value.response.status_code == 401
            assert json.loads(info.value.response.body)["error"]["code"] == "invalid_api_key"
        # browsers pass the key as a subprotocol
        ws = await websockets.connect(server.ws_url + "/v1/realtime",
                                      subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"])
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "session.created"
        clients = [await Client.connect(server.ws_url) for _ in range(LIMITS.max_sessions - 1)]
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            await Client.connect(server.ws_url)
        assert info.value.response.status_code == 503
        for c in clients:
            await c.close()
        await ws.close()

    run(go())
    wait_for(lambda: server.engine.count() == 0, what="the streams to close")


# ---------------------------------------------------------------------------- HTTP
def sse_events(response) -> list[dict]:
    events, done = [], False
    for line in response.iter_lines():
        if line.startswith("data: "):
            if line == "data: [DONE]":
                done = True
                break
            events.append(json.loads(line[6:]))
    assert done
    return events


def test_http_stream_lifecycle(server, http, model):
    frames = frames_of(9, 5)
    r = http.post("/v1/streams", json={"fps": 30, **PRUNED})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["settings"]["method"] == "streaming_assistant"
    assert sid in [s["id"] for s in http.get("/v1/streams").json()["data"]]
    # multipart (two frames), JSON data URL, JSON list, raw PNG body
    r = http.post(f"/v1/streams/{sid}/frames", files=[("frame", ("a.png", png(frames[0]), "image/png")),
                                                      ("frame", ("b.png", png(frames[1]), "image/png"))],
                  data={"timestamp": ["0", "1"]})
    assert r.status_code == 202, r.text
    assert [f["status"] for f in r.json()["frames"]] == ["queued", "queued"]
    r = http.post(f"/v1/streams/{sid}/frames", json={"image_url": data_url(frames[2]), "timestamp": 2})
    assert r.status_code == 202, r.text
    r = http.post(f"/v1/streams/{sid}/frames", json={"frames": [{"image_url": data_url(frames[3]), "timestamp": 3}]})
    assert r.status_code == 202, r.text
    r = http.post(f"/v1/streams/{sid}/frames?timestamp=4", content=png(frames[4]),
                  headers={"Content-Type": "image/png"})
    assert r.status_code == 202, r.text
    expected = in_process(model, frames, "What is there?", 10, PRUNED)
    with http.stream("POST", f"/v1/streams/{sid}/ask", json={"question": "What is there?", "max_new_tokens": 10}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    text, done = answer_of(events)
    assert done["streampress"]["token_ids"] == expected.token_ids and text == expected.text
    r = http.post(f"/v1/streams/{sid}/ask", json={"question": "What is there?", "max_new_tokens": 10,
                                                  "stream": False})
    assert r.status_code == 200 and r.json()["token_ids"] == expected.token_ids
    r = http.post(f"/v1/streams/{sid}/ask", json={"question": "Which?", "options": ["red", "blue"],
                                                  "max_new_tokens": 2, "stream": False})
    assert r.status_code == 200 and r.json()["choice"] in ("A", "B")
    stats = http.get(f"/v1/streams/{sid}").json()
    assert stats["frames"]["queued"] == 5 and stats["answers"]["incomplete"] + stats["answers"].get("completed", 0) == 3
    assert stats["session"]["visual_tokens_kept"] < stats["session"]["visual_tokens_seen"]
    r = http.put("/v1/streams/camera-7", json={"fps": 2})
    assert r.status_code == 201 and r.json()["id"] == "camera-7"
    for r, code in ((http.put("/v1/streams/camera-7"), "stream_exists"),
                    (http.put("/v1/streams/a b"), "invalid_value")):
        assert r.status_code in (409, 400) and r.json()["error"]["code"] == code
    http.delete("/v1/streams/camera-7")
    r = http.patch(f"/v1/streams/{sid}", json={"fps": 2})
    assert r.status_code == 200 and r.json()["settings"]["fps"] == 2
    assert http.delete(f"/v1/streams/{sid}").json()["deleted"] is True
    for r in (http.get(f"/v1/streams/{sid}"), http.delete(f"/v1/streams/{sid}"),
              http.post(f"/v1/streams/{sid}/ask", json={"question": "?"})):
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    wait_for(lambda: all(s.id != sid for s in server.engine.streams()) and not server.engine._closing,
             what="the stream to be freed")


def test_http_bad_input_gets_4xx_json_and_the_stream_goes_on(server, http, model):
    frames = frames_of(10, 2)
    sid = http.post("/v1/streams", json={"fps": 30}).json()["id"]
    f = f"/v1/streams/{sid}/frames"
    a = f"/v1/streams/{sid}/ask"
    cases = [
        (http.post("/v1/streams", json={"method": "nope"}), 400, "invalid_value"),
        (http.post("/v1/streams", json={"keep_ratio": 0.5}), 400, "invalid_value"),
        (http.post("/v1/streams", json={"colour": 1}), 400, "invalid_value"),
        (http.post("/v1/streams", content=b"{bad"), 400, "invalid_json"),
        (http.post("/v1/streams", json={"source": 3.5}), 400, "invalid_value"),
        (http.post("/v1/streams", json={"realtime": False}), 400, "invalid_value"),
        (http.patch(f"/v1/streams/{sid}", json={"fps": 0}), 400, "invalid_value"),
        (http.post(f, content=b"x", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
        (http.post(f, content=b"[1]", headers={"Content-Type": "application/json"}), 400, "invalid_json"),
        (http.post(f, json={"timestamp": 1}), 400, "invalid_value"),
        (http.post(f, json={"frames": []}), 400, "invalid_value"),
        (http.post(f, json={"image_url": "data:image/png;base64,AAAA"}), 400, "invalid_image"),
        (http.post(f, content=b"not a png", headers={"Content-Type": "image/png"}), 400, "invalid_image"),
        (http.post(f, content=png(frames[0]), headers={"Content-Type": "image/jpeg"}), 400, "invalid_image"),
        (http.post(f, content=png(np.zeros((250, 250, 3), np.uint8)), headers={"Content-Type": "image/png"}),
         413, "frame_too_large"),
        (http.post(f, content=b"\0" * 400_000, headers={"Content-Type": "image/png"}), 413, "frame_too_large"),
        (http.post(f, files=[("other", ("a.png", png(frames[0]), "image/png"))]), 400, "invalid_value"),
        (http.post(f, files=[("frame", ("a.png", png(frames[0]), "image/png"))], data={"timestamp": ["1", "2"]}),
         400, "invalid_value"),
        (http.post(f, files=[("frame", ("a.png", png(frames[0]), "image/png"))], data={"timestamp": "x"}),
         400, "invalid_value"),
        (http.post(a, json={"question": ""}), 400, "empty_question"),
        (http.post(a, json={"question": "x" * 400}), 400, "question_too_long"),
        (http.post(a, json={"question": "q", "max_new_tokens": 0}), 400, "invalid_value"),
        (http.post(a, json={"question": "q", "options": ["only one"]}), 400, "invalid_value"),
        (http.post(a, json={"question": "q", "stream": "yes"}), 400, "invalid_value"),
        (http.post(a, json={"question": "q", "temperature": 1}), 400, "invalid_value"),
        (http.post(a, content=b""), 400, "invalid_json"),
        (http.get("/v1/nothing"), 404, "not_found"),
        (http.put("/health"), 405, "method_not_allowed"),
    ]
    for i, (r, status, code) in enumerate(cases):
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (i, r.text)
        assert r.json()["error"]["message"]
    for i, image in enumerate(frames):
        assert http.post(f, json={"image_url": data_url(image), "timestamp": i + 1}).status_code == 202
    r = http.post(f, json={"image_url": data_url(frames[0]), "timestamp": 0.5})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "timestamp_backwards")
    r = http.post(f, json={"image_url": data_url(frames_of(1, 1, 64)[0]), "timestamp": 9})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "frame_size_changed")
    r = http.post(a, json={"question": "Still fine?", "max_new_tokens": 6, "stream": False})
    assert r.status_code == 200
    assert r.json()["token_ids"] == in_process(model, frames, "Still fine?", 6).token_ids
    stats = http.get(f"/v1/streams/{sid}").json()
    assert stats["frames"]["rejected"] >= 5 and stats["frames"]["ingested"] == 2
    http.delete(f"/v1/streams/{sid}")


def test_http_auth_health_and_metrics(server, http):
    for path in ("/health", "/metrics", "/v1/streams"):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic dGVzdC1rZXk="}):
            r = httpx.get(server.url + path, headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    r = httpx.post(server.url + "/v1/streams", timeout=10)
    assert r.status_code == 401
    assert httpx.get(server.url + "/", timeout=10).status_code == 200  # the page is public
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == TINY
    text = http.get("/metrics").text
    for name in ("frames_received_total", "frames_ingested_total", "frames_dropped_total", "visual_tokens_kept_total",
                 "queue_depth", "sessions", "answer_first_token_seconds_bucket", "answer_seconds_count",
                 'errors_total{code="invalid_api_key"}'):
        assert f"streampress_{name}" in text, name
    assert http.get("/metrics").headers["content-type"].startswith("text/plain")


def test_http_sessions_limit_and_disconnect_mid_sse(server, http):
    ids = [http.post("/v1/streams").json()["id"] for _ in range(LIMITS.max_sessions)]
    r = http.post("/v1/streams")
    assert (r.status_code, r.json()["error"]["code"]) == (503, "too_many_sessions")
    for sid in ids[1:]:
        http.delete(f"/v1/streams/{sid}")
    http.post(f"/v1/streams/{ids[0]}/frames", json={"image_url": data_url(frames_of(11, 1)[0])})
    before = server.engine.metrics.answers.get("cancelled", 0)
    with http.stream("POST", f"/v1/streams/{ids[0]}/ask", json={"question": "Long?", "max_new_tokens": 400}) as r:
        for line in r.iter_lines():
            if "response.output_text.delta" in line:
                break  # leave mid-answer
    wait_for(lambda: server.engine.metrics.answers.get("cancelled", 0) > before, what="the answer to be cancelled")
    r = http.post(f"/v1/streams/{ids[0]}/ask", json={"question": "Short?", "max_new_tokens": 2, "stream": False})
    assert r.status_code == 200 and r.json()["status"] in ("completed", "incomplete")
    http.delete(f"/v1/streams/{ids[0]}")


def test_pull_mode_reads_a_folder(server, http, tmp_path):
    for i, image in enumerate(frames_of(12, 4)):
        Image.fromarray(image).save(tmp_path / f"img{i}.png")
    r = http.post("/v1/streams", json={"source": str(tmp_path), "realtime": False, "fps": 30})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    wait_for(lambda: http.get(f"/v1/streams/{sid}").json()["frames"]["ingested"] == 4, what="4 frames")
    stats = http.get(f"/v1/streams/{sid}").json()
    assert stats["kind"] == "pull" and stats["source"]["state"] == "finished"
    r = http.post(f"/v1/streams/{sid}/frames", json={"image_url": data_url(frames_of(1, 1)[0])})
    assert r.status_code == 409
    r = http.post(f"/v1/streams/{sid}/ask", json={"question": "What?", "max_new_tokens": 2, "stream": False})
    assert r.json()["streampress"]["frames"] == 4
    http.delete(f"/v1/streams/{sid}")
    sid = http.post("/v1/streams", json={"source": str(tmp_path / "missing.mp4")}).json()["id"]
    wait_for(lambda: http.get(f"/v1/streams/{sid}").json()["source"]["state"] == "failed", what="the failure")
    assert "no such file" in http.get(f"/v1/streams/{sid}").json()["source"]["error"]
    http.delete(f"/v1/streams/{sid}")


# ---------------------------------------------------------------------------- limits and scheduler
def test_rate_limit_idle_timeout_and_pull_off(model):
    from fastapi.testclient import TestClient

    engine = Engine(model, StreamSettings(fps=30), Limits(max_push_rate=2, idle_timeout=0.4), model_name=TINY)
    image = data_url(frames_of(13, 1)[0])
    with TestClient(create_app(engine)) as client:
        assert client.post("/v1/streams", json={"source": "x.mp4"}).status_code == 403
        sid = client.post("/v1/streams").json()["id"]
        codes = [client.post(f"/v1/streams/{sid}/frames", json={"image_url": image, "timestamp": i}).status_code
                 for i in range(3)]
        assert codes == [202, 202, 429]
        wait_for(lambda: client.get(f"/v1/streams/{sid}").status_code == 404, what="the idle stream to close")
        with client.websocket_connect("/v1/realtime") as ws:
            assert ws.receive_json()["type"] == "session.created"
            error = ws.receive_json()  # nothing sent: the session expires
            assert error["type"] == "error" and error["error"]["code"] == "session_expired"
        wait_for(lambda: engine.count() == 0, what="the stream to be freed")
        assert "streampress_sessions_closed_total{reason=\"idle\"} 2" in client.get("/metrics").text


def test_backlog_keeps_the_newest_frames_and_counts_the_dropped(model):
    engine = Engine(model, StreamSettings(fps=30), Limits(queue_frames=3), model_name=TINY)  # worker not started
    s = engine.create_stream()
    for i, image in enumerate(frames_of(14, 7)):
        t, keep = engine.admit(s, float(i))
        assert keep and engine.push(s, image, t) == "queued"
    assert [seq for seq, _, _ in s.queue] == [5, 6, 7] and s.counts["dropped"] == 4
    assert engine.metrics.counters["frames_dropped"] == 4


def test_scheduler_questions_first_round_robin_and_only_earlier_frames(model):
    engine = Engine(model, StreamSettings(fps=30, max_new_tokens=3), Limits(), model_name=TINY)
    a, b, c = (engine.create_stream() for _ in range(3))
    log = []
    answer_unit, ingest_unit = engine._answer_unit, engine._ingest_unit
    engine._answer_unit = lambda s: (log.append(("answer", s.id, len(s.queue))), answer_unit(s))[1]
    engine._ingest_unit = lambda s, n: (log.append(("ingest", s.id, n)), ingest_unit(s, n))[1]

    def push(s, n, start):
        for i in range(n):
            engine.push(s, frames_of(20 + i, 1)[0], engine.admit(s, float(start + i))[0])

    def run_units(limit=200):
        for _ in range(limit):
            with engine._cond:
                unit = engine._next_unit()
            if unit is None:
                return
            unit()
        raise AssertionError("the scheduler did not become idle")

    run_units()  # builds the three sessions
    for s in (a, b, c):
        push(s, 4, 0)
    done = []
    engine.ask(c, "Now?", lambda kind, data: done.append(data) if kind == "done" else None)
    push(c, 2, 4)  # sent after the question: not waited for
    run_units()
    first_answer = next(i for i, e in enumerate(log) if e[0] == "answer")
    assert all(e[1] == c.id for e in log[:first_answer + 1])  # the question's stream goes first
    served = [e for e in log if e[0] == "ingest" and e[1] == c.id]
    assert served[:2] == [("ingest", c.id, 2), ("ingest", c.id, 2)]  # its 4 earlier frames, one item at a time
    assert done and done[0]["streampress"]["frames"] == 4  # not the 2 sent after the question
    backlog = [e[1] for e in log if e[0] == "ingest"][2:]
    assert backlog[:4] in ([a.id, b.id, c.id, a.id], [b.id, c.id, a.id, b.id], [c.id, a.id, b.id, c.id])
    assert all(len(s.queue) == 0 for s in (a, b, c))


def cut_frames(lengths, size: int = 96) -> np.ndarray:
    """Segments alternately of one solid colour and one fixed texture (scene cuts between them)."""
    rng = np.random.default_rng(9)
    looks = [np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8) if k % 2 == 0
             else rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for k in range(len(lengths))]
    return np.stack([look for look, n in zip(looks, lengths) for _ in range(n)])


def test_watch_over_the_socket_equals_in_process_watch(server, model):
    from streampress.session import StreamingSession

    frames = cut_frames((6, 6, 6, 6))
    session = StreamingSession(model)
    session.watch("What changed?", max_new_tokens=4)
    for i in range(0, len(frames), 2):  # the server ingests one item (2 frames) per unit
        session.add_frames(frames[i:i + 2], [float(i), float(i + 1)])
    expected = [(e.trigger_time, e.text) for e in session.poll_events()]
    assert expected  # the cuts fire

    async def go():
        client = await Client.connect(server.ws_url)
        created = await client.call({"type": "streampress.watch.create",
                                     "watch": {"question": "What changed?", "max_new_tokens": 4}})
        assert created["type"] == "streampress.watch.created" and created["watch"]["id"].startswith("watch_")
        bad = await client.call({"type": "streampress.watch.create", "watch": {"question": " "}})
        assert bad["type"] == "error" and bad["error"]["param"] == "watch.question"
        stream = server.engine.get(client.session["id"])
        for i, image in enumerate(frames):
            await client.send(image_item(image, float(i)))
            if i % 8 == 7:  # stay under the backlog limit: a dropped frame would change the signal
                deadline = time.monotonic() + 20
                while (stream.queue or stream.counts["received"] <= i) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
        await client.send(text_item("Anything else?"))
        await client.send({"type": "response.create"})
        events = await client.until("response.done")  # the question waits for every earlier frame
        missing = await client.call({"type": "streampress.watch.delete", "watch_id": "watch_nope"})
        assert missing["type"] == "error" and missing["error"]["code"] == "watch_not_found"
        gone = await client.call({"type": "streampress.watch.delete", "watch_id": created["watch"]["id"]})
        assert gone == {**gone, "type": "streampress.watch.deleted", "watch_id": created["watch"]["id"]}
        assert stream.counts["dropped"] == 0
        await client.close()
        return events

    events = run(go())
    answers = [e for e in events if e["type"] == "streampress.watch.answer"]
    assert [(e["trigger_time"], e["text"]) for e in answers] == expected
    assert all(e["watch"] == "What changed?" and e["time"] >= e["trigger_time"] for e in answers)
