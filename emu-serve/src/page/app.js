// The web page of `emu serve`: chat about an image with streamed answers
// (grounding boxes drawn over the image) and image generation with a
// progress bar. Plain JavaScript against the server's own API, no build step.
// `window.emuSelfTest()` runs a scripted session for the browser test.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, imageSize: null, turns: [] };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message || "";
}

// Reads a server-sent-events response, calling onData with each parsed
// `data:` payload until `[DONE]`.
async function readEvents(response, onData) {
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const value = JSON.parse(data);
      if (value.error) throw new Error(value.error.message);
      onData(value);
    }
  }
}

function drawImage(boxes) {
  const canvas = $("chat-canvas");
  if (!state.image) return;
  const img = state.image;
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  ctx.strokeStyle = "red";
  ctx.lineWidth = Math.max(2, Math.round(canvas.width / 200));
  for (const b of boxes || []) {
    const [l, t, r, bt] = b.box;
    ctx.strokeRect(l, t, r - l, bt - t);
  }
}

// Makes `dataUrl` the chat's image (the file input and the test mode both come here).
function setImage(dataUrl) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      state.image = img;
      state.imageUrl = dataUrl;
      state.turns = [];
      $("conversation").textContent = "";
      drawImage([]);
      resolve();
    };
    img.onerror = () => reject(new Error("the file is not an image this browser can read"));
    img.src = dataUrl;
  });
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("conversation").appendChild(div);
  return div;
}

// Asks the question in the form; resolves to {text, chunks, boxes}.
async function sendChat() {
  const question = $("question").value.trim();
  if (!question) throw new Error("type a question");
  const content = [];
  if (state.imageUrl && state.turns.length === 0) {
    content.push({ type: "image_url", image_url: { url: state.imageUrl } });
  }
  content.push({ type: "text", text: question });
  const messages = state.turns.concat([{ role: "user", content }]);
  addMessage("user", question);
  const out = addMessage("assistant", "");
  $("question").value = "";
  const body = {
    messages,
    stream: true,
    grounding: $("grounding").checked,
    max_tokens: Number($("chat-max").value) || 64,
  };
  let text = "";
  let chunks = 0;
  let boxes = null;
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  await readEvents(response, (chunk) => {
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return;
    if (choice.delta && choice.delta.content) {
      text += choice.delta.content;
      chunks += 1;
      out.textContent = text;
    }
    if (choice.boxes) boxes = choice.boxes;
  });
  state.turns = messages.concat([{ role: "assistant", content: text }]);
  if (boxes) drawImage(boxes);
  return { text, chunks, boxes };
}

// Generates from the form; resolves to {progress, width, height}.
async function generate() {
  const prompt = $("gen-prompt").value;
  const body = {
    prompt,
    steps: Number($("gen-steps").value) || 20,
    seed: Number($("gen-seed").value) || 0,
    stream: true,
  };
  const bar = $("gen-progress");
  bar.value = 0;
  let progress = 0;
  let result = null;
  const response = await fetch("/v1/images/generations", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  await readEvents(response, (ev) => {
    if (ev.type === "progress") {
      progress += 1;
      bar.max = ev.total;
      bar.value = ev.step;
    } else if (ev.type === "result") {
      result = ev;
    }
  });
  if (!result) throw new Error("the server sent no image");
  const img = new Image();
  const loaded = new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; });
  img.src = "data:image/png;base64," + result.data[0].b64_json;
  img.alt = prompt;
  img.id = "gen-image";
  $("gen-output").replaceChildren(img);
  await loaded;
  return { progress, width: img.naturalWidth, height: img.naturalHeight };
}

function guard(f) {
  return async (event) => {
    if (event) event.preventDefault();
    showError("");
    try { await f(); } catch (e) { showError(e.message); }
  };
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    $("models").textContent = r.ok ? "models: " + body.data.map((m) => m.id).join(", ") : body.error.message;
  } catch (e) {
    $("models").textContent = "cannot list models: " + e.message;
  }
}

$("chat-image").addEventListener("change", guard(async () => {
  const file = $("chat-image").files[0];
  if (file) await setImage(await readFile(file));
}));
$("chat-form").addEventListener("submit", guard(sendChat));
$("gen-form").addEventListener("submit", guard(generate));
$("api-key").addEventListener("change", loadModels);
loadModels();

// Test mode (the browser test calls it through the DevTools protocol): draw
// an image, upload it through the same path as the file input, ask,
// generate, and report what the page saw as JSON.
async function selfTest() {
  const report = { ok: false };
  try {
    const c = document.createElement("canvas");
    c.width = 64; c.height = 48;
    const ctx = c.getContext("2d");
    ctx.fillStyle = "#2a6"; ctx.fillRect(0, 0, 64, 48);
    ctx.fillStyle = "#d22"; ctx.fillRect(8, 8, 24, 20);
    const blob = await new Promise((resolve) => c.toBlob(resolve, "image/png"));
    await setImage(await readFile(new File([blob], "test.png", { type: "image/png" })));
    report.canvas = [$("chat-canvas").width, $("chat-canvas").height];
    report.image = state.imageUrl;
    $("question").value = "What is in the picture?";
    $("chat-max").value = "12";
    report.chat = await sendChat();
    report.shown = document.querySelector("#conversation .assistant").textContent;
    $("gen-prompt").value = "a red square";
    $("gen-steps").value = "3";
    report.generate = await generate();
    report.bar = [$("gen-progress").value, $("gen-progress").max];
    report.shownImage = $("gen-image") ? [$("gen-image").naturalWidth, $("gen-image").naturalHeight] : null;
    report.ok = true;
  } catch (e) {
    report.error = String(e && e.message || e);
  }
  return JSON.stringify(report);
}
window.emuSelfTest = selfTest;
