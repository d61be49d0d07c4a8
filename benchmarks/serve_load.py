"""Load on ``streampress serve``: N concurrent live streams over the Realtime WebSocket.

For each configuration (``--streams`` x ``--methods``) a fresh server runs in a subprocess
(``python -m streampress.cli serve``, loopback, a free port), so that its resident memory is
its own. Each stream is one WebSocket client that sends JPEG frames at ``--fps`` (2) in real
time, stamped with their stream time, and asks a question every ``--ask-every`` seconds (the
streams' phases are staggered); it waits for each answer before the next question. Measured:

- **frames/s ingested**: frames the model ingested per second after warm-up (from the
  server's ``/metrics``, sampled every second), against the rate offered (streams x fps);
- **frames dropped**: the server's ``frames_dropped_total`` (its backlog policy: the oldest
  waiting frame is dropped when a stream's queue is full), and frames still waiting at the
  end;
- **time to first answer token**: from sending ``response.create`` to
  ``response.output_item.added`` (sent when the first token is ready) on the client, p50 / p95
  over every question; and the server's own ``first_token_latency`` (``response.done``);
- **answers**: questions asked, answers with status completed / incomplete (the answer
  length reached), lost (no ``response.done`` within ``--answer-timeout``), and errors;
- **resident memory**: the server process's RSS (``/proc/PID/status``) sampled every second:
  after warm-up and at the end, and the growth in between (``memory flat after warm-up``);
  the KV cache tokens per stream at the end.

Default model: ``random:qwen2.5-vl-tiny`` (the Qwen2.5-VL architecture, reduced, random
weights). Streams use ``--memory`` (default ``window:10``: a live server bounds each stream's
memory; warm-up is the window plus 5 s, after which memory should be flat).

    python benchmarks/serve_load.py         # 1, 4, 8 streams x dense, streaming_assistant@0.25: 60 s each
    python benchmarks/serve_load.py --seconds 20 --json out.json
    python benchmarks/serve_load.py --streams 8 --methods dense --seconds 60   # the issue's load test
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")
MIB = 1 << 20
METHODS = {"dense": {"method": "none", "keep_ratio": None},
           "streaming_assistant": {"method": "streaming_assistant", "keep_ratio": 0.25}}


# ---------------------------------------------------------------------------- inputs
def clip_data_urls(n: int = 24, width: int = 320, height: int = 240, quality: int = 85) -> list[str]:
    """A looping synthetic clip as JPEG data URLs (a gradient, a moving square, a little
    noise), encoded once so that the clients cost little CPU."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    urls = []
    for i in range(n):
        rgb = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], -1).astype(np.int16)
        left = 10 + (i * 11) % (width - 90)
        rgb[80:160, left:left + 80] = (240, 200, 40)
        rgb += rng.integers(-12, 13, rgb.shape, dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def metrics(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"streampress_(\w+?)(\{[^}]*\})? (\S+)$", line)
        if m and not line.startswith("#"):
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def percentile(values, q: float):
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


# ---------------------------------------------------------------------------- the server
class Server:
    """``streampress serve`` in a subprocess on a free loopback port."""

    def __init__(self, model: str, max_new_tokens: int, streams: int, extra: list[str] | None = None,
                 threads: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/realtime"
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "streampress.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--max-new-tokens", str(max_new_tokens),
               "--max-sessions", str(max(16, streams)), "--log-level", "warning", *(extra or [])]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 120.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.proc.stderr.read()[-2000:]}")
            try:
                if get_json(self.url + "/health")["status"] == "ok":
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not start within {timeout:g} s")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the server stops cleanly
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------- one stream's client
class StreamClient:
    """One WebSocket stream: frames at ``fps`` in real time, a question every ``ask_every`` s."""

    def __init__(self, index: int, ws_url: str, urls: list[str], settings: dict, fps: float, seconds: float,
                 ask_every: float, phase: float, max_output_tokens: int, answer_timeout: float):
        self.index, self.ws_url, self.urls, self.settings = index, ws_url, urls, settings
        self.fps, self.seconds, self.ask_every, self.phase = fps, seconds, ask_every, phase
        self.max_output_tokens, self.answer_timeout = max_output_tokens, answer_timeout
        self.stream_id = None
        self.sent = 0
        self.statuses: dict[str, int] = {}
        self.asked = 0
        self.answers: list[dict] = []
        self.errors: list[dict] = []
        self.lost = 0
        self._pending: dict | None = None
        self._answered = asyncio.Event()
        self._reply = asyncio.Queue()

    async def run(self, t0: float, finished: asyncio.Event, release: asyncio.Event) -> None:
        """Stream, ask, then hold the socket open (``finished`` set) until ``release``: the
        server's counters are read while every stream is still open."""
        import websockets

        async with websockets.connect(self.ws_url, max_size=None, open_timeout=20, ping_interval=None) as ws:
            created = json.loads(await asyncio.wait_for(ws.recv(), 20))
            assert created["type"] == "session.created", created
            self.stream_id = created["session"]["id"]
            session = {"max_output_tokens": self.max_output_tokens,
                       "streampress": {**self.settings, "fps": self.fps}}
            await ws.send(json.dumps({"type": "session.update", "session": session}))
            updated = json.loads(await asyncio.wait_for(ws.recv(), 20))
            assert updated["type"] == "session.updated", updated
            receiver = asyncio.create_task(self._receive(ws))
            try:
                start = max(t0, time.monotonic()) + self.phase
                await asyncio.gather(self._send_frames(ws, start), self._ask(ws, start))
                if self._pending is not None:  # the last question: wait for its answer (bounded)
                    await self._wait_answer(ws)
            finally:
                finished.set()
            await release.wait()
            receiver.cancel()

    async def _send_frames(self, ws, start: float) -> None:
        k = 0
        n = int(self.seconds * self.fps)
        while k < n:
            due = start + k / self.fps
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            part = {"type": "input_image", "image_url": self.urls[(k + self.index) % len(self.urls)],
                    "timestamp": round(k / self.fps, 3)}
            await ws.send(json.dumps({"type": "conversation.item.create",
                                      "item": {"type": "message", "role": "user", "content": [part]}}))
            self.sent += 1
            k += 1

    async def _ask(self, ws, start: float) -> None:
        q = 1
        while True:
            due = start + q * self.ask_every
            if due - start >= self.seconds:
                return
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if self._pending is not None:
                await self._wait_answer(ws)
            self._answered.clear()
            self._pending = {"asked_at": time.monotonic(), "first": None, "stream_time": (time.monotonic() - start)}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": f"Question {q}: what is moving in the video?"}]}}))
            await ws.send(json.dumps({"type": "response.create"}))
            self.asked += 1
            q += 1

    async def _wait_answer(self, ws) -> None:
        try:
            await asyncio.wait_for(self._answered.wait(), self.answer_timeout)
        except asyncio.TimeoutError:  # lost: cancel it, and wait (bounded) for its response.done
            self.lost += 1
            self._pending["lost"] = True
            await ws.send(json.dumps({"type": "response.cancel"}))
            try:
                await asyncio.wait_for(self._answered.wait(), 10)
            except asyncio.TimeoutError:
                pass
            self._pending = None

    async def _receive(self, ws) -> None:
        async for message in ws:
            event = json.loads(message)
            kind = event["type"]
            if kind in ("response.output_item.added", "response.output_text.delta") and self._pending is not None \
                    and self._pending["first"] is None:
                # output_item.added comes when the first token is ready (its text may be held back
                # while it is an incomplete character, or be empty)
                self._pending["first"] = time.monotonic()
            elif kind == "response.done" and self._pending is not None:
                p, self._pending = self._pending, None
                if p.get("lost"):  # counted as lost already
                    self._answered.set()
                    continue
                r = event["response"]
                sp = r.get("streampress", {})
                self.statuses[r["status"]] = self.statuses.get(r["status"], 0) + 1
                self.answers.append({
                    "status": r["status"], "ttft": None if p["first"] is None else p["first"] - p["asked_at"],
                    "seconds": time.monotonic() - p["asked_at"], "server_first_token": sp.get("first_token_latency"),
                    "model_ttft": sp.get("time_to_first_token"), "frames": sp.get("frames"),
                    "visual_tokens": sp.get("visual_tokens"), "kv_cache_tokens": sp.get("kv_cache_tokens"),
                    "tokens": len(sp.get("token_ids") or [])})
                self._answered.set()
            elif kind == "error":
                self.errors.append(event["error"])
                if self._pending is not None and event["error"].get("code") in (
                        "conversation_already_has_active_response", "empty_question"):
                    self._pending = None
                    self._answered.set()


# ---------------------------------------------------------------------------- one configuration
def run_config(streams: int, method: str, args, urls: list[str]) -> dict:
    settings = dict(METHODS[method])
    settings["memory"] = args.memory
    if settings["keep_ratio"] is not None:
        settings["keep_ratio"] = args.keep_ratio
    extra = ["--queue-frames", str(args.queue_frames)]
    with Server(args.model, args.max_new_tokens, streams, extra, threads=args.server_threads) as server:
        startup = server.wait_ready()
        pid = server.proc.pid
        rss_idle = rss_bytes(pid)
        samples = []  # (t, rss, frames_ingested, frames_dropped)
        clients = [StreamClient(i, server.ws_url, urls, settings, args.fps, args.seconds, args.ask_every,
                                phase=i * (1.0 / args.fps) / streams + (i * args.ask_every / streams) % 1.0,
                                max_output_tokens=args.max_new_tokens, answer_timeout=args.answer_timeout)
                   for i in range(streams)]

        async def sample(t0, stop):
            while not stop.is_set():
                m = await asyncio.to_thread(metrics, server.url)
                samples.append((time.monotonic() - t0, rss_bytes(pid), m.get("frames_ingested_total", 0),
                                m.get("frames_dropped_total", 0)))
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

        async def main():
            t0 = time.monotonic() + 0.5
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample(t0, stop))
            finished = [asyncio.Event() for _ in clients]
            release = asyncio.Event()
            runs = asyncio.gather(*(c.run(t0, f, release) for c, f in zip(clients, finished)))
            waits = asyncio.gather(*(f.wait() for f in finished))
            await asyncio.wait({runs, waits}, return_when=asyncio.FIRST_COMPLETED)  # a client may fail early
            if not runs.done():  # every stream still open: read the counters once the unit in flight is done
                for _ in range(50):
                    final.update(await asyncio.to_thread(metrics, server.url))
                    if _accounted(final) == final.get("frames_received_total"):
                        break
                    await asyncio.sleep(0.1)
            release.set()
            await runs
            stop.set()
            await sampler
            return time.monotonic() - t0

        final: dict = {}
        wall = asyncio.run(asyncio.wait_for(main(), args.seconds + args.answer_timeout + 60))
        rss_end = rss_bytes(pid)
        code = server.stop()

    warm = args.warmup if args.warmup is not None else min(args.seconds / 2, _window_seconds(args.memory) + 5)
    after = [s for s in samples if s[0] >= warm]
    # sustained rate: frames ingested per second between warm-up and the end of sending
    rate = None
    if len(after) >= 2 and after[-1][0] > after[0][0]:
        rate = (after[-1][2] - after[0][2]) / (after[-1][0] - after[0][0])
    rss_warm = after[0][1] if after else None
    rss_peak_after = max((s[1] for s in after if s[1] is not None), default=None)
    answers = [a for c in clients for a in c.answers]
    ttft = [a["ttft"] for a in answers if a["ttft"] is not None]
    server_ttft = [a["server_first_token"] for a in answers if a["server_first_token"] is not None]
    statuses: dict[str, int] = {}
    for c in clients:
        for k, v in c.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    kv_end = [c.answers[-1]["kv_cache_tokens"] for c in clients if c.answers]
    result = {
        "streams": streams, "method": method, "settings": settings, "fps": args.fps, "seconds": args.seconds,
        "startup_seconds": startup, "wall_seconds": wall, "server_exit_code": code,
        "frames_sent": sum(c.sent for c in clients),
        "frames_received": final.get("frames_received_total"), "frames_ingested": final.get("frames_ingested_total"),
        "frames_dropped": final.get("frames_dropped_total"), "frames_skipped": final.get("frames_skipped_total"),
        "frames_rejected": final.get("frames_rejected_total"), "frames_waiting_end": final.get("queue_depth"),
        "offered_fps": streams * args.fps, "ingested_fps": rate, "warmup_seconds": warm,
        "questions": sum(c.asked for c in clients), "answers": statuses,
        "answered": sum(statuses.get(k, 0) for k in ("completed", "incomplete")),
        "lost": sum(c.lost for c in clients) + sum(v for k, v in statuses.items()
                                                   if k not in ("completed", "incomplete")),
        "errors": [e for c in clients for e in c.errors],
        "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95), "ttft_max": max(ttft, default=None),
        "server_first_token_p50": percentile(server_ttft, 50),
        "server_first_token_p95": percentile(server_ttft, 95),
        "kv_cache_tokens_end": statistics.mean(kv_end) if kv_end else None,
        "rss_idle_mib": rss_idle / MIB if rss_idle else None,
        "rss_warm_mib": rss_warm / MIB if rss_warm else None,
        "rss_end_mib": rss_end / MIB if rss_end else None,
        "rss_peak_after_warmup_mib": rss_peak_after / MIB if rss_peak_after else None,
        "rss_growth_after_warmup_mib": (rss_peak_after - rss_warm) / MIB if rss_warm and rss_peak_after else None,
        "samples": [{"t": round(t, 2), "rss_mib": None if r is None else round(r / MIB, 1), "ingested": i,
                     "dropped": d} for t, r, i, d in samples],
        "command": server.cmd,
    }
    return result


def _accounted(m: dict) -> float:
    """Frames ingested, dropped, skipped, rejected or waiting (the rest is in the model's hands)."""
    return sum(m.get(k, 0) for k in ("frames_ingested_total", "frames_dropped_total", "frames_skipped_total",
                                     "frames_rejected_total", "queue_depth"))


def _window_seconds(memory: str) -> float:
    m = re.search(r"window[:=](\d+(?:\.\d+)?)", memory)
    return float(m.group(1)) if m else 10.0


# ---------------------------------------------------------------------------- report
def fmt(v, spec=".1f", unit=""):
    return "–" if v is None else f"{v:{spec}}{unit}"


def table(results: list[dict]) -> str:
    rows = ["| streams | method | frames/s ingested (offered) | dropped | answers (lost) | TTFT p50 / p95 | "
            "server first token p50 / p95 | KV tokens / stream | RSS after warm-up -> end (growth) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        method = r["method"] + (f"@{r['settings']['keep_ratio']:g}" if r["settings"].get("keep_ratio") else "")
        rows.append(
            f"| {r['streams']} | {method} | {fmt(r['ingested_fps'], '.2f')} ({r['offered_fps']:g}) | "
            f"{int(r['frames_dropped'] or 0)} | {r['answered']}/{r['questions']} ({r['lost']}) | "
            f"{fmt(_ms(r['ttft_p50']), '.0f')} / {fmt(_ms(r['ttft_p95']), '.0f')} ms | "
            f"{fmt(_ms(r['server_first_token_p50']), '.0f')} / {fmt(_ms(r['server_first_token_p95']), '.0f')} ms | "
            f"{fmt(r['kv_cache_tokens_end'], '.0f')} | "
            f"{fmt(r['rss_warm_mib'], '.0f')} -> {fmt(r['rss_end_mib'], '.0f')} MiB "
            f"({fmt(r['rss_growth_after_warmup_mib'], '+.1f')}) |")
    return "\n".join(rows)


def _ms(v):
    return None if v is None else 1000 * v


def environment(args) -> dict:
    import torch

    if SRC not in sys.path:  # run from a checkout without install
        sys.path.insert(0, SRC)
    from streampress.bench.host import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "model": args.model, "memory": args.memory, "fps": args.fps, "ask_every": args.ask_every,
            "max_new_tokens": args.max_new_tokens, "queue_frames": args.queue_frames,
            "server_threads": args.server_threads}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:qwen2.5-vl-tiny")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["dense", "streaming_assistant"])
    p.add_argument("--keep-ratio", type=float, default=0.25, help="streaming_assistant's budget (default 0.25)")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of streaming per configuration (default 60)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second per stream (default 2)")
    p.add_argument("--ask-every", type=float, default=5.0, help="seconds between a stream's questions (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length in tokens (default 16)")
    p.add_argument("--memory", default="window:10", help="each stream's memory (default window:10)")
    p.add_argument("--queue-frames", type=int, default=32, help="the server's --queue-frames (default 32)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds excluded from the rates and the memory growth (default: window + 5 s, at most "
                        "half the run)")
    p.add_argument("--answer-timeout", type=float, default=30.0, help="an answer not done after this is lost")
    p.add_argument("--server-threads", type=int, default=1,
                   help="torch (OMP) threads of the server process (default 1: all model work is one scheduler "
                        "thread anyway, and on a shared CPU more threads spin against other processes; 0: "
                        "torch's default)")
    p.add_argument("--json", default=None, metavar="PATH")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import signal

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the servers are stopped on the way out
    env = environment(args)
    print(f"# serve_load: {env['model']} on {env['cpu']} ({env['cores']} cores), torch {env['torch']}, "
          f"{args.fps:g} fps per stream, a question every {args.ask_every:g} s, {args.seconds:g} s per "
          f"configuration, memory {args.memory}, {args.server_threads or 'default'} server thread(s)", flush=True)
    urls = clip_data_urls()
    results = []
    for method in args.methods:
        for n in args.streams:
            r = run_config(n, method, args, urls)
            results.append(r)
            print(f"{n} streams, {method}: {fmt(r['ingested_fps'], '.2f')} frames/s ingested of "
                  f"{r['offered_fps']:g} offered, {int(r['frames_dropped'] or 0)} dropped, "
                  f"{r['answered']}/{r['questions']} answered ({r['lost']} lost), TTFT p50 "
                  f"{fmt(_ms(r['ttft_p50']), '.0f')} ms p95 {fmt(_ms(r['ttft_p95']), '.0f')} ms, RSS "
                  f"{fmt(r['rss_warm_mib'], '.0f')} -> {fmt(r['rss_end_mib'], '.0f')} MiB, "
                  f"{len(r['errors'])} errors", flush=True)
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "argv": sys.argv, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
