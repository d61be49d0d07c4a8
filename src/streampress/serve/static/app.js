// streampress live page: camera or video file -> JPEG frames over the Realtime WebSocket
// (/v1/realtime), questions as input_text + response.create, answers streamed from
// response.output_text.delta, statistics from response.done and GET /v1/streams/{id}.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_BUFFERED = 4 * 1024 * 1024;  // bytes waiting in the socket before frames are held back

const page = {            // exposed as window.streampressPage (tests read it)
  streamId: null, model: null, running: false, live: false,
  sent: 0, heldBack: 0, lastT: null, answers: [], errors: [], stats: null,
};
window.streampressPage = page;

let ws = null, media = null, objectUrl = null, timer = null, poller = null;
let startWall = 0, sched = { t0: 0, k: 0 }, fileOffset = 0, lastVideoTime = 0;
let current = null, askSeq = 0, rateWindow = [];

// ---------------------------------------------------------------- helpers
function fmtTime(t) {
  if (t == null || !isFinite(t)) return "–";
  const m = Math.floor(t / 60), s = t - 60 * m;
  return `${m}:${s.toFixed(1).padStart(4, "0")}`;
}
function fmtMs(s) { return s == null ? "–" : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`; }
function fmtInt(n) { return n == null ? "–" : Number(n).toLocaleString("en-US"); }
function setText(id, v) { $(id).textContent = v; }
function log(message, isError = false) {
  const line = document.createElement("div");
  line.textContent = `${new Date().toLocaleTimeString()}  ${message}`;
  if (isError) line.className = "err";
  $("log").prepend(line);
  while ($("log").childElementCount > 30) $("log").lastChild.remove();
}
function setStatus(text, cls) { const s = $("status"); s.textContent = text; s.className = `pill ${cls}`; }
function source() { return document.querySelector("input[name=source]:checked").value; }
function fps() { const v = parseFloat($("fps").value); return v > 0 ? v : 1; }
function send(event) { if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify(event)); return true; } return false; }
function userItem(part) { return { type: "conversation.item.create", item: { type: "message", role: "user", content: [part] } }; }

function settings() {
  const method = $("method").value;
  const sp = { method, fps: fps() };
  sp.keep_ratio = method === "none" ? null : parseFloat($("keep").value);
  const session = { streampress: sp };
  const tokens = parseInt($("max-tokens").value, 10);
  if (tokens > 0) session.max_output_tokens = tokens;
  return { type: "session.update", session };
}

// ---------------------------------------------------------------- sources
async function openSource() {
  const video = $("video");
  if (source() === "camera") {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia)
      throw new Error("this browser gives no camera access here (a page needs https or localhost)");
    media = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
    video.srcObject = media;
    video.loop = false;
  } else {
    const file = $("file").files[0];
    if (!file) throw new Error("pick a video file first");
    objectUrl = URL.createObjectURL(file);
    video.srcObject = null;
    video.src = objectUrl;
    video.loop = true;
  }
  fileOffset = 0; lastVideoTime = 0;
  await video.play();
  $("placeholder").hidden = true;
}

function closeSource() {
  const video = $("video");
  video.pause();
  if (media) { media.getTracks().forEach((t) => t.stop()); media = null; }
  video.srcObject = null;
  if (objectUrl) { video.removeAttribute("src"); video.load(); URL.revokeObjectURL(objectUrl); objectUrl = null; }
  $("placeholder").hidden = false;
}

// stream time: wall-clock seconds since Start (camera) or the file's playback time (looping adds up)
function sourceTime() {
  if (source() === "camera") return (performance.now() - startWall) / 1000;
  const v = $("video");
  if (v.currentTime + 0.05 < lastVideoTime) fileOffset += lastVideoTime;  // looped
  lastVideoTime = v.currentTime;
  return fileOffset + v.currentTime;
}

// ---------------------------------------------------------------- frames
function grab() {
  const video = $("video");
  if (video.readyState < 2 || !video.videoWidth) return null;
  const side = parseInt($("size").value, 10);
  const scale = side / Math.max(video.videoWidth, video.videoHeight);
  const canvas = $("canvas");
  const w = Math.max(2, Math.round(video.videoWidth * scale / 2) * 2), h = Math.max(2, Math.round(video.videoHeight * scale / 2) * 2);
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  canvas.getContext("2d").drawImage(video, 0, 0, w, h);
  return canvas.toDataURL("image/jpeg", 0.85);
}

function scheduleNext() {
  if (!page.running) return;
  const nominal = sched.t0 + sched.k / fps();
  let due = startWall + nominal * 1000;
  const now = performance.now();
  if (now - due > 2000) {   // the tab slept: skip the ticks missed, keeping the server's tick grid
    sched.k = Math.ceil(((now - startWall) / 1000 - sched.t0) * fps());
    due = startWall + (sched.t0 + sched.k / fps()) * 1000;
  }
  timer = setTimeout(tick, Math.max(0, due - now));
}

function tick() {
  timer = null;
  if (!page.running) return;
  const video = $("video");
  if (!(source() === "file" && video.paused)) {
    if (ws.bufferedAmount > MAX_BUFFERED) {
      page.heldBack += 1;                              // the network is behind: skip this frame here
    } else {
      const url = grab();
      if (url) {
        // the k-th tick's frame is stamped no earlier than tick k, so the server's fps thinning keeps it
        let t = Math.max(sourceTime(), sched.t0 + sched.k / fps());
        if (page.lastT != null) t = Math.max(t, page.lastT + 1e-3);
        t = Math.round(t * 1000) / 1000;
        if (send(userItem({ type: "input_image", image_url: url, timestamp: t }))) {
          if (page.lastT == null) sched = { t0: t, k: 0 };  // the server counts its fps ticks from the first frame
          page.sent += 1; page.lastT = t;
          setText("stat-sent", fmtInt(page.sent));
        }
      }
    }
  }
  sched.k += 1;
  scheduleNext();
}

// ---------------------------------------------------------------- connection
function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const key = $("api-key").value.trim();
  const protocols = ["realtime"];
  if (key) protocols.push("openai-insecure-api-key." + key);
  setStatus("connecting…", "connecting");
  ws = new WebSocket(`${proto}://${location.host}/v1/realtime`, protocols);
  ws.onmessage = (m) => { let e; try { e = JSON.parse(m.data); } catch { return; } onEvent(e); };
  ws.onclose = (e) => {
    const wasRunning = page.running;
    ws = null;
    if (wasRunning) {
      log(`connection closed (${e.code}${e.reason ? ": " + e.reason : ""})`, true);
      stop(false);
      setStatus(e.code === 1008 ? "refused: API key" : "disconnected", "error");
    }
  };
  ws.onerror = () => log("WebSocket error (is the server running? is an API key needed?)", true);
}

function onEvent(e) {
  switch (e.type) {
    case "session.created":
      page.streamId = e.session.id; page.model = e.session.model;
      setText("model", page.model || "");
      send(settings());
      break;
    case "session.updated":
      if (!page.live) {
        page.live = true;
        setStatus("live", "live");
        startWall = performance.now(); sched = { t0: 0, k: 0 };
        $("question").disabled = false; $("apply").disabled = false; $("clock").hidden = false;
        updateAskButton();
        log(`streaming to ${page.streamId} at ${fps()} fps`);
        scheduleNext();
        poll(); poller = setInterval(poll, 1000);
      } else {
        const sp = e.session.streampress;
        log(`settings applied: ${sp.method}${sp.keep_ratio != null ? " @ " + sp.keep_ratio : ""}, ${sp.fps} fps`);
      }
      break;
    case "response.created":
      if (current && !current.responseId) { current.responseId = e.response.id; current.el.a.dataset.responseId = e.response.id; }
      break;
    case "response.output_text.delta":
      if (current && e.response_id === current.responseId) {
        current.text += e.delta;
        current.el.text.textContent = current.text;
        scrollAnswers();
      }
      break;
    case "response.done":
      if (current && e.response.id === current.responseId) finishAnswer(e.response);
      break;
    case "error": {
      const err = e.error || {};
      page.errors.push(err);
      log(`${err.code || err.type}: ${err.message}`, true);
      if (current && !current.responseId && err.event_id === current.eventId) failAnswer(err.message);
      break;
    }
    default:
      break;  // conversation.item.created, response.output_item.*, response.content_part.*: nothing to show
  }
}

// ---------------------------------------------------------------- questions and answers
function updateAskButton() {
  const busy = current != null;
  $("ask").disabled = !page.live || busy || !$("question").value.trim();
  $("cancel").hidden = !busy || !current.responseId;
}

function scrollAnswers() { const a = $("answers"); a.scrollTop = a.scrollHeight; }

function addCard(question, askedAt) {
  $("empty").hidden = true;
  const qa = document.createElement("div"); qa.className = "qa";
  const q = document.createElement("div"); q.className = "q";
  q.innerHTML = '<div class="meta"></div><div class="text"></div>';
  q.querySelector(".meta").textContent = `asked at ${fmtTime(askedAt)}`;
  q.querySelector(".text").textContent = question;
  const a = document.createElement("div"); a.className = "a streaming"; a.dataset.status = "in_progress";
  a.innerHTML = '<div class="meta">answering…</div><div class="text"></div><div class="foot"></div>';
  qa.append(q, a);
  $("answers").append(qa);
  scrollAnswers();
  return { a, meta: a.querySelector(".meta"), text: a.querySelector(".text"), foot: a.querySelector(".foot") };
}

function ask(ev) {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question || current || !page.live) return;
  askSeq += 1;
  const eventId = `evt_ask_${askSeq}_${Date.now()}`;
  current = { question, askedAt: page.lastT, responseId: null, eventId, text: "", el: addCard(question, page.lastT) };
  send(userItem({ type: "input_text", text: question }));
  send({ type: "response.create", event_id: eventId });
  $("question").value = "";
  updateAskButton();
}

function finishAnswer(response) {
  const sp = response.streampress || {};
  const out = (response.output && response.output[0] && response.output[0].content[0]) || null;
  if (out && typeof out.text === "string") current.text = out.text;
  const c = current.el;
  c.text.textContent = current.text;
  c.a.classList.remove("streaming");
  c.a.classList.add(response.status);
  c.a.dataset.status = response.status;
  c.meta.textContent = `answer · over ${fmtInt(sp.frames)} frames up to ${fmtTime(sp.stream_time)}`;
  const parts = [`first token ${fmtMs(sp.first_token_latency)} (model ${fmtMs(sp.time_to_first_token)})`,
    `${fmtInt(sp.visual_tokens)} visual tokens`, `${fmtInt((sp.token_ids || []).length)} tokens in ${fmtMs(sp.seconds)}`];
  if (response.status !== "completed") parts.push(response.status + (response.status_details && response.status_details.reason ? ` (${response.status_details.reason})` : ""));
  c.foot.textContent = parts.join(" · ");
  if (!current.text) c.text.textContent = response.status === "completed" ? "(empty answer)" : "";
  page.answers.push({ question: current.question, askedAt: current.askedAt, text: current.text,
    status: response.status, responseId: response.id, streampress: sp });
  if (sp.first_token_latency != null) {
    setText("stat-ttft", fmtMs(sp.first_token_latency));
    $("stat-ttft").title = `model time to first token ${fmtMs(sp.time_to_first_token)}; ${fmtInt(sp.visual_tokens)} visual tokens`;
  }
  current = null;
  updateAskButton();
  scrollAnswers();
}

function failAnswer(message) {
  const c = current.el;
  c.a.classList.remove("streaming"); c.a.classList.add("failed"); c.a.dataset.status = "failed";
  c.meta.textContent = "not answered";
  c.text.textContent = message;
  current = null;
  updateAskButton();
}

// ---------------------------------------------------------------- statistics
async function poll() {
  if (!page.streamId || !page.live) return;
  const key = $("api-key").value.trim();
  try {
    const r = await fetch(`/v1/streams/${encodeURIComponent(page.streamId)}`, { headers: key ? { Authorization: `Bearer ${key}` } : {} });
    if (!r.ok) return;
    const s = await r.json();
    page.stats = s;
    const f = s.frames || {}, ss = s.session || {};
    setText("stat-ingested", fmtInt(f.ingested));
    setText("stat-waiting", fmtInt(f.waiting));
    setText("stat-dropped", fmtInt(f.dropped));
    $("stat-dropped").classList.toggle("nonzero", f.dropped > 0);
    setText("stat-skipped", fmtInt(f.skipped));
    if (ss.visual_tokens_seen != null) {
      const pct = ss.visual_tokens_seen ? Math.round(100 * ss.visual_tokens_kept / ss.visual_tokens_seen) : 100;
      $("stat-kept").innerHTML = `${fmtInt(ss.visual_tokens_kept)} <small>${pct}%</small>`;
      $("stat-kept").title = `${fmtInt(ss.visual_tokens_kept)} of ${fmtInt(ss.visual_tokens_seen)} encoded tokens kept`;
    }
    setText("stat-kv", fmtInt(ss.kv_cache_tokens));
    const now = performance.now();
    rateWindow.push([now, f.ingested || 0]);
    while (rateWindow.length > 2 && now - rateWindow[0][0] > 5000) rateWindow.shift();
    if (rateWindow.length > 1) {
      const [t0, n0] = rateWindow[0];
      setText("stat-rate", ((f.ingested - n0) / ((now - t0) / 1000)).toFixed(1));
    }
  } catch (err) { /* the next poll tries again */ }
}

setInterval(() => { if (page.live) setText("stat-time", fmtTime(page.lastT)), setText("clock", fmtTime(page.lastT)); }, 250);

// ---------------------------------------------------------------- start / stop
async function start() {
  $("start").disabled = true;
  for (const el of document.querySelectorAll("input[name=source], #size, #api-key, #file")) el.disabled = true;
  Object.assign(page, { streamId: null, running: true, live: false, sent: 0, heldBack: 0, lastT: null, stats: null });
  rateWindow = [];
  for (const id of ["stat-sent", "stat-ingested", "stat-waiting", "stat-dropped", "stat-skipped"]) setText(id, "0");
  for (const id of ["stat-rate", "stat-kept", "stat-kv", "stat-ttft", "stat-time"]) setText(id, "–");
  try {
    await openSource();
  } catch (err) {
    log(`cannot open the ${source()}: ${err.message || err}`, true);
    stop(false);
    setStatus("no source", "error");
    return;
  }
  $("stop").disabled = false;
  connect();
}

function stop(byUser = true) {
  page.running = false; page.live = false;
  if (timer) { clearTimeout(timer); timer = null; }
  if (poller) { clearInterval(poller); poller = null; }
  if (current) failAnswer("the stream stopped before the answer");
  if (ws) { const w = ws; ws = null; w.onclose = null; w.close(1000); }
  closeSource();
  $("start").disabled = false; $("stop").disabled = true; $("apply").disabled = true;
  $("question").disabled = true; $("clock").hidden = true;
  for (const el of document.querySelectorAll("input[name=source], #size, #api-key, #file")) el.disabled = false;
  updateAskButton();
  if (byUser) { setStatus("stopped", "idle"); log("stopped"); }
}

function apply() {
  if (send(settings())) {
    // the server counts ticks from the last frame at the new fps: so do we
    if (page.lastT != null) { sched = { t0: page.lastT, k: 1 }; if (timer) { clearTimeout(timer); scheduleNext(); } }
  }
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => stop(true));
$("apply").addEventListener("click", apply);
$("ask-form").addEventListener("submit", ask);
$("question").addEventListener("input", updateAskButton);
$("cancel").addEventListener("click", () => { if (current && current.responseId) send({ type: "response.cancel", response_id: current.responseId }); });
const syncKeep = () => { $("keep").disabled = $("method").value === "none"; };
$("method").addEventListener("change", syncKeep);
$("method").addEventListener("input", syncKeep);
syncKeep();
for (const el of document.querySelectorAll("input[name=source]")) {
  el.addEventListener("change", () => {
    const file = source() === "file";
    $("file-pick").hidden = !file; $("file-name").hidden = !file;
    if (file && !$("file").files.length) $("file").click();
  });
}
$("file").addEventListener("change", () => { const f = $("file").files[0]; setText("file-name", f ? f.name : ""); });
window.addEventListener("beforeunload", () => { if (ws) ws.close(1000); });
