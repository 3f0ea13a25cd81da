// Offline TTS playground: plain browser JavaScript, no dependencies, no build step.
// Streams /api/tts/stream and plays it while it arrives: WAV as PCM16 chunks scheduled on the Web Audio
// clock; MP3/AAC through Media Source Extensions; other formats once complete (browsers cannot stream them).
"use strict";

const API = new URL("..", document.baseURI); // the service root, also behind a path prefix
const LANGUAGES = {
  es: "Spanish", en: "English", fr: "French", de: "German", it: "Italian", pt: "Portuguese", pl: "Polish",
  tr: "Turkish", ru: "Russian", nl: "Dutch", cs: "Czech", ar: "Arabic", "zh-cn": "Chinese", hu: "Hungarian",
  ko: "Korean", ja: "Japanese", hi: "Hindi", auto: "Detect from the text",
};
const FORMATS = {
  wav: { mime: "audio/wav", ext: "wav" }, mp3: { mime: "audio/mpeg", ext: "mp3" },
  opus: { mime: "audio/ogg", ext: "opus" }, aac: { mime: "audio/aac", ext: "aac" }, flac: { mime: "audio/flac", ext: "flac" },
};
const KEY_STORAGE = "offline-tts.api-key";
const $ = (id) => document.getElementById(id);

// What the current synthesis is doing, readable by tests and the console (times in ms from the click).
const run = (window.playground = { phase: "idle" });

// ---- API access ---------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(message, hint = "", status = 0, code = "") {
    super(message);
    Object.assign(this, { hint, status, code });
  }
}

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function apiError(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON: a proxy's page */ }
  const err = (body && body.error) || {};
  const message = err.message || (body && typeof body.detail === "string" && body.detail) || `${res.status} ${res.statusText}`;
  let hint = err.hint || "";
  if (res.status === 401 || res.status === 403) hint = hint || "Enter the server's API key under “API key” below.";
  if (res.status === 503 && res.headers.get("Retry-After")) hint += ` Retry in ${res.headers.get("Retry-After")} s.`;
  return new ApiError(message, hint.trim(), res.status, err.code || "");
}

async function api(path, { method = "GET", json, form, signal } = {}) {
  const headers = authHeaders();
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form) body = form;
  let res;
  try {
    res = await fetch(new URL(path, API), { method, headers, body, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("Cannot reach the service.", "Is the server running? Check the address and the network.");
  }
  if (!res.ok) throw await apiError(res);
  return res;
}

// ---- messages -----------------------------------------------------------------------------------
function showError(err) {
  if (err && err.name === "AbortError") return;
  $("error-message").textContent = err.message || String(err);
  $("error-hint").textContent = [err.hint, err.status ? `(HTTP ${err.status}${err.code ? `, ${err.code}` : ""})` : ""].filter(Boolean).join(" ");
  $("error").hidden = false;
  if (err.status === 401 || err.status === 403) { $("settings").open = true; $("api-key").focus(); }
}
const clearError = () => { $("error").hidden = true; };
const seconds = (ms) => (ms == null ? "–" : `${(ms / 1000).toFixed(2)} s`);
const kib = (n) => (n < 1024 * 1024 ? `${(n / 1024).toFixed(0)} KiB` : `${(n / 1048576).toFixed(1)} MiB`);

// ---- status, voices, languages --------------------------------------------------------------------
let defaults = { voice_sample: null, language: "es" };

async function loadStatus() {
  try {
    const s = await (await api("")).json();
    defaults = { ...defaults, ...(s.config || {}) };
    const state = s.model || s.status;
    const pill = $("model-state");
    pill.textContent = state === "ready" ? "Model ready" : state === "failed" ? "Model failed to load" : `Model ${state}…`;
    pill.dataset.state = state;
    if (state !== "ready" && state !== "failed") setTimeout(loadStatus, 2000);
    return true;
  } catch (err) {
    $("model-state").textContent = err.status === 401 ? "API key needed" : "Offline";
    $("model-state").dataset.state = "failed";
    showError(err);
    return false;
  }
}

function fillLanguages() {
  const select = $("language");
  const wanted = select.value || defaults.language || "es";
  select.replaceChildren(...Object.entries(LANGUAGES).map(([code, name]) => new Option(`${name} (${code})`, code)));
  select.value = LANGUAGES[wanted] ? wanted : "es";
}

async function loadVoices(select = null) {
  const el = $("voice");
  const keep = select || el.value || (defaults.voice_sample || "").replace(/\.[^.]+$/, "");
  try {
    const { voices } = await (await api("api/voices")).json();
    if (!voices.length) {
      el.replaceChildren(new Option("No voices yet: add one below", ""));
      $("add-voice").open = true;
      return;
    }
    el.replaceChildren(...voices.map((v) => {
      const len = v.duration_s ? ` · ${Number(v.duration_s).toFixed(1)} s` : "";
      return new Option(`${v.name}${len}`, v.name);
    }));
    if (voices.some((v) => v.name === keep)) el.value = keep;
  } catch (err) {
    el.replaceChildren(new Option("Voices unavailable", ""));
    showError(err);
  }
}

// ---- adding a voice: upload or microphone -------------------------------------------------------
let recording = null; // {blob, ext} of the last recording

async function saveVoice(event) {
  event.preventDefault();
  clearError();
  const name = $("new-name").value.trim();
  const files = [...$("files").files];
  if (!$("new-name").checkValidity() || !name) {
    return showError(new ApiError("Give the voice a name.", "1-64 letters, digits, _ or -, starting with a letter or digit."));
  }
  if (!files.length && !recording) {
    return showError(new ApiError("Choose an audio file or record a clip first."));
  }
  const form = new FormData();
  form.append("name", name);
  form.append("replace", $("replace").checked ? "true" : "false");
  if (files.length) files.forEach((f) => form.append("files", f, f.name));
  else form.append("files", recording.blob, `${name}.${recording.ext}`);
  const button = $("save-voice");
  button.disabled = true;
  button.textContent = "Saving…";
  try {
    await api("api/voices", { method: "POST", form });
    $("voice-form").reset();
    discardRecording();
    await loadVoices(name);
    $("speak-status").textContent = `Voice “${name}” saved and selected.`;
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
    button.textContent = "Save voice";
  }
}

let recorder = null;
function discardRecording() {
  recording = null;
  $("record-preview").hidden = true;
  $("record-preview").removeAttribute("src");
  $("record-time").textContent = "0:00";
  $("record").textContent = "● Record";
}

async function toggleRecording() {
  clearError();
  if (recorder && recorder.state === "recording") return recorder.stop();
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    return showError(new ApiError("This browser cannot record audio here.", "Use a current browser over https or on localhost."));
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: false, noiseSuppression: false } });
  } catch (e) {
    return showError(new ApiError("The microphone is not available.", `${e.message || e.name}. Allow microphone access for this page.`));
  }
  const mime = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus", "audio/mp4"].find((m) => MediaRecorder.isTypeSupported(m)) || "";
  const chunks = [];
  recorder = new MediaRecorder(stream, mime ? { mimeType: mime } : undefined);
  recorder.ondataavailable = (e) => e.data.size && chunks.push(e.data);
  const started = performance.now();
  const timer = setInterval(() => {
    const s = Math.floor((performance.now() - started) / 1000);
    $("record-time").textContent = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
    if (s >= 30) recorder.stop(); // longer clips add nothing to the voice
  }, 250);
  recorder.onstop = () => {
    clearInterval(timer);
    stream.getTracks().forEach((t) => t.stop());
    const type = recorder.mimeType || mime || "audio/webm";
    recording = { blob: new Blob(chunks, { type }), ext: type.includes("mp4") ? "m4a" : type.includes("ogg") ? "ogg" : "webm" };
    $("files").value = "";
    $("record-preview").src = URL.createObjectURL(recording.blob);
    $("record-preview").hidden = false;
    $("record").textContent = "● Record again";
    $("record").classList.remove("recording");
  };
  recorder.start(250);
  $("record").textContent = "■ Stop recording";
  $("record").classList.add("recording");
}

// ---- players: push(bytes) while the response arrives, end() when it is complete -------------------
let audioCtx = null;

// WAV stream: parse the RIFF header, then schedule each PCM16 chunk right after the previous one.
class PcmPlayer {
  constructor(onFirstAudio) {
    this.onFirstAudio = onFirstAudio;
    this.header = new Uint8Array(0);
    this.rate = 0;
    this.channels = 1;
    this.odd = null; // a byte left over when a chunk splits a sample
    this.pcm = [];
    this.sources = [];
    this.spans = []; // [start, duration] of each scheduled chunk on the AudioContext clock
    this.next = 0;
    this.firstStart = null;
  }
  push(bytes) {
    if (!this.rate) {
      this.header = concat([this.header, bytes]);
      const parsed = parseWavHeader(this.header);
      if (!parsed) return;
      ({ rate: this.rate, channels: this.channels } = parsed);
      bytes = this.header.subarray(parsed.dataOffset);
    }
    if (this.odd) { bytes = concat([this.odd, bytes]); this.odd = null; }
    const frameBytes = 2 * this.channels;
    const usable = bytes.length - (bytes.length % frameBytes);
    if (usable < bytes.length) this.odd = bytes.slice(usable);
    if (!usable) return;
    const chunk = bytes.slice(0, usable);
    this.pcm.push(chunk);
    this.schedule(new Int16Array(chunk.buffer, chunk.byteOffset, usable / 2));
  }
  schedule(samples) {
    const frames = samples.length / this.channels;
    const buffer = audioCtx.createBuffer(this.channels, frames, this.rate);
    for (let c = 0; c < this.channels; c++) {
      const out = buffer.getChannelData(c);
      for (let i = 0; i < frames; i++) out[i] = samples[i * this.channels + c] / 32768;
    }
    const src = audioCtx.createBufferSource();
    src.buffer = buffer;
    src.connect(audioCtx.destination);
    // A small lead on the first chunk (and after an underrun) so the start is never clipped.
    const now = audioCtx.currentTime;
    if (this.next < now + 0.03) this.next = now + 0.08;
    src.start(this.next);
    if (this.firstStart === null) {
      this.firstStart = this.next;
      this.onFirstAudio(performance.now() + (this.next - now) * 1000);
    }
    this.spans.push([this.next, buffer.duration]);
    this.next += buffer.duration;
    this.sources.push(src);
  }
  played() { // seconds of audio heard so far (gaps between late chunks do not count)
    const now = audioCtx.currentTime;
    return this.spans.reduce((sum, [start, length]) => sum + Math.min(length, Math.max(0, now - start)), 0);
  }
  finished() { return new Promise((resolve) => setTimeout(resolve, Math.max(0, this.next - audioCtx.currentTime) * 1000)); }
  end() {
    const data = concat(this.pcm);
    return { blob: new Blob([wavHeader(this.rate || 24000, this.channels, data.length), data], { type: "audio/wav" }),
             seconds: data.length / (2 * this.channels * (this.rate || 24000)) };
  }
  stop() { this.sources.forEach((s) => { try { s.stop(); } catch { /* not started */ } }); }
}

// MP3/AAC: Media Source Extensions feed the <audio> element while bytes arrive.
class MediaSourcePlayer {
  constructor(audio, mime, onFirstAudio) {
    Object.assign(this, { audio, mime, onFirstAudio, queue: [], chunks: [], ending: false });
    this.ready = new Promise((resolve) => {
      this.ms = new MediaSource();
      this.ms.addEventListener("sourceopen", () => {
        this.sb = this.ms.addSourceBuffer(mime);
        this.sb.mode = "sequence";
        this.sb.addEventListener("updateend", () => this.pump());
        resolve();
      }, { once: true });
    });
    audio.src = URL.createObjectURL(this.ms);
    audio.addEventListener("playing", () => this.onFirstAudio(performance.now()), { once: true });
  }
  push(bytes) {
    this.chunks.push(bytes);
    this.queue.push(bytes);
    this.ready.then(() => this.pump());
    if (this.chunks.length === 1) this.audio.play().catch(() => { /* shown by the controls */ });
  }
  pump() {
    if (!this.sb || this.sb.updating || this.ms.readyState !== "open") return;
    if (this.queue.length) this.sb.appendBuffer(this.queue.shift());
    else if (this.ending) this.ms.endOfStream();
  }
  played() { return this.audio.currentTime; }
  finished() { return mediaEnded(this.audio); }
  end() {
    this.ending = true;
    this.ready.then(() => this.pump());
    return { blob: new Blob(this.chunks, { type: this.mime }), seconds: null };
  }
  stop() { this.audio.pause(); }
}

// Formats no browser can append progressively (Ogg Opus, FLAC): play once complete.
class WholeFilePlayer {
  constructor(audio, mime, onFirstAudio) {
    Object.assign(this, { audio, mime, onFirstAudio, chunks: [] });
    audio.addEventListener("playing", () => this.onFirstAudio(performance.now()), { once: true });
  }
  push(bytes) { this.chunks.push(bytes); }
  played() { return 0; }
  finished() { return mediaEnded(this.audio); }
  end() {
    const blob = new Blob(this.chunks, { type: this.mime });
    this.audio.src = URL.createObjectURL(blob);
    this.audio.play().catch(() => {});
    return { blob, seconds: null };
  }
  stop() { this.audio.pause(); }
}

const mediaEnded = (audio) => new Promise((resolve) => {
  audio.addEventListener("ended", resolve, { once: true });
  audio.addEventListener("error", resolve, { once: true });
});

function parseWavHeader(b) {
  if (b.length < 12) return null;
  const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const tag = (o) => String.fromCharCode(b[o], b[o + 1], b[o + 2], b[o + 3]);
  if (tag(0) !== "RIFF" || tag(8) !== "WAVE") throw new ApiError("The server sent audio that is not WAV.");
  let o = 12, rate = 0, channels = 1;
  while (o + 8 <= b.length) {
    const id = tag(o), size = view.getUint32(o + 4, true);
    if (id === "fmt ") {
      if (o + 16 > b.length) return null;
      channels = view.getUint16(o + 10, true);
      rate = view.getUint32(o + 12, true);
    } else if (id === "data") {
      return rate ? { rate, channels, dataOffset: o + 8 } : null;
    }
    o += 8 + size + (size % 2);
  }
  return null; // wait for more bytes
}

function wavHeader(rate, channels, dataBytes) {
  const h = new DataView(new ArrayBuffer(44));
  const put = (o, s) => [...s].forEach((c, i) => h.setUint8(o + i, c.charCodeAt(0)));
  put(0, "RIFF"); h.setUint32(4, 36 + dataBytes, true); put(8, "WAVE");
  put(12, "fmt "); h.setUint32(16, 16, true); h.setUint16(20, 1, true); h.setUint16(22, channels, true);
  h.setUint32(24, rate, true); h.setUint32(28, rate * channels * 2, true); h.setUint16(32, channels * 2, true);
  h.setUint16(34, 16, true); put(36, "data"); h.setUint32(40, dataBytes, true);
  return h.buffer;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

// ---- speaking -----------------------------------------------------------------------------------
let current = null; // {controller, player}

function stopSpeaking() {
  if (!current) return;
  current.controller.abort();
  current.player && current.player.stop();
  current = null;
}

function setPhase(phase) {
  run.phase = phase;
  document.body.dataset.phase = phase;
  const busy = phase === "requesting" || phase === "streaming";
  $("stop").disabled = !busy && phase !== "playing";
  $("speak").classList.toggle("busy", busy);
}

function chooseMode(contentType, format) {
  const type = (contentType || "").split(";")[0].trim().toLowerCase();
  if (type === "audio/wav" || type === "audio/x-wav" || type === "audio/wave") return { mode: "pcm", format: "wav" };
  const mime = type || FORMATS[format].mime;
  const fmt = Object.keys(FORMATS).find((k) => FORMATS[k].mime === mime) || format;
  const mse = window.MediaSource && (mime === "audio/mpeg" || mime === "audio/aac") && MediaSource.isTypeSupported(mime);
  return { mode: mse ? "mse" : "whole", format: fmt, mime };
}

async function speak() {
  stopSpeaking();
  clearError();
  // Created inside the click, so the browser lets it play.
  audioCtx = audioCtx || new (window.AudioContext || window.webkitAudioContext)();
  audioCtx.resume();
  const player = $("player");
  player.pause();
  const format = $("format").value;
  const body = { text: $("text").value, language: $("language").value };
  if ($("voice").value) body.voice_sample = $("voice").value;
  if (format !== "wav") body.format = format;

  Object.keys(run).forEach((k) => delete run[k]);
  Object.assign(run, { format, bytes: 0, chunks: 0, firstAudioMs: null, totalMs: null, error: null });
  const t0 = (run.t0 = performance.now());
  const me = (current = { controller: new AbortController(), player: null });
  setPhase("requesting");
  $("download").hidden = true;
  ["m-first", "m-total", "m-audio", "m-bytes"].forEach((id) => { $(id).textContent = "–"; });
  $("meter-bar").style.width = "0";
  $("speak-status").textContent = "Waiting for the first chunk…";

  const onFirstAudio = (at) => {
    if (current !== me || run.firstAudioMs != null) return;
    run.firstAudioMs = at - t0;
    $("m-first").textContent = seconds(run.firstAudioMs);
  };
  try {
    const res = await api("api/tts/stream", { method: "POST", json: body, signal: me.controller.signal });
    run.firstByteMs = performance.now() - t0;
    const chosen = chooseMode(res.headers.get("Content-Type"), format);
    Object.assign(run, chosen);
    me.player = chosen.mode === "pcm" ? new PcmPlayer(onFirstAudio)
      : chosen.mode === "mse" ? new MediaSourcePlayer(player, chosen.mime, onFirstAudio)
      : new WholeFilePlayer(player, chosen.mime, onFirstAudio);
    setPhase("streaming");
    $("speak-status").textContent = chosen.mode === "whole"
      ? `Receiving ${chosen.format.toUpperCase()}: it plays when complete (this browser cannot stream it).`
      : "Playing while the rest is generated…";
    const reader = res.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (current !== me) return;
      run.bytes += value.length;
      run.chunks += 1;
      me.player.push(value);
      $("m-bytes").textContent = kib(run.bytes);
      $("meter-bar").style.width = `${Math.min(100, 8 + run.chunks * 4)}%`;
    }
    // The response is complete: how much had already been heard shows playback really was progressive.
    run.responseEndMs = performance.now() - t0;
    run.playedAtEndS = me.player.played();
    run.totalMs = run.responseEndMs;
    $("m-total").textContent = seconds(run.totalMs);
    $("meter-bar").style.width = "100%";
    const result = me.player.end();
    run.audioSeconds = result.seconds;
    if (result.seconds != null) $("m-audio").textContent = `${result.seconds.toFixed(2)} s`;
    offerDownload(result.blob, chosen.format);
    if (chosen.mode === "pcm") player.src = URL.createObjectURL(result.blob); // replay with the controls
    if (!run.bytes) throw new ApiError("The server sent no audio.", "See the server log.");
    setPhase("playing");
    $("speak-status").textContent = run.playedAtEndS > 0
      ? `All received: ${run.playedAtEndS.toFixed(1)} s of audio had already played when the last chunk arrived.`
      : "All received.";
    await me.player.finished();
    if (current === me) { setPhase("done"); current = null; }
  } catch (err) {
    if (current !== me && err.name === "AbortError") return;
    run.error = err.message;
    setPhase(err.name === "AbortError" ? "stopped" : "error");
    $("speak-status").textContent = err.name === "AbortError" ? "Stopped." : "Failed: see the message above.";
    showError(err);
  }
}

function offerDownload(blob, format) {
  const a = $("download");
  if (a.href) URL.revokeObjectURL(a.href);
  a.href = URL.createObjectURL(blob);
  a.download = `speech-${new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-")}.${FORMATS[format].ext}`;
  a.textContent = `⤓ Download ${format.toUpperCase()} (${kib(blob.size)})`;
  a.hidden = false;
}

// ---- wiring -------------------------------------------------------------------------------------
function init() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    key ? localStorage.setItem(KEY_STORAGE, key) : localStorage.removeItem(KEY_STORAGE);
    clearError();
    $("key-save").textContent = "Saved ✓";
    setTimeout(() => { $("key-save").textContent = "Save"; }, 1500);
    if (await loadStatus()) { fillLanguages(); await loadVoices(); }
  });
  $("error-close").addEventListener("click", clearError);
  $("voices-refresh").addEventListener("click", () => { clearError(); loadVoices(); });
  $("voice-form").addEventListener("submit", saveVoice);
  $("files").addEventListener("change", () => { if ($("files").files.length) discardRecording(); });
  $("record").addEventListener("click", toggleRecording);
  $("speak").addEventListener("click", speak);
  $("stop").addEventListener("click", () => { stopSpeaking(); setPhase("stopped"); $("speak-status").textContent = "Stopped."; });
  const count = () => { $("text-count").textContent = $("text").value.length; };
  $("text").addEventListener("input", count);
  $("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) speak(); });
  count();
  fillLanguages();
  loadStatus().then((ok) => { fillLanguages(); if (ok) loadVoices(); });
}

init();
