// triserve's chat page: the OpenAI routes of the server that serves it, streamed.
// State kept in this tab's sessionStorage (a reload keeps it, a new tab starts empty):
// the finished turns and the settings. Never stored: the API key, a reply still streaming.
"use strict";

const STORE = "triserve.chat.v1";
const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "seed", "schema"];

const state = { model: "", messages: [], settings: {} };
let running = null; // {controller, bubble} while a reply streams

function save() {
  sessionStorage.setItem(STORE, JSON.stringify(state));
}

function restore() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORE) || "null");
    if (saved && Array.isArray(saved.messages)) Object.assign(state, saved);
  } catch (_) { sessionStorage.removeItem(STORE); }
  for (const id of SETTINGS) $(id).value = state.settings[id] ?? "";
  for (const message of state.messages) addBubble(message.role, message.content, message.meta);
}

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

function status(text) { $("status").textContent = text; }

function addBubble(role, text, meta) {
  const bubble = document.createElement("div");
  bubble.className = `msg ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  bubble.append(body);
  if (meta) setMeta(bubble, meta);
  $("messages").append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

function setMeta(bubble, text) {
  let meta = bubble.querySelector(".meta");
  if (!meta) { meta = document.createElement("span"); meta.className = "meta"; bubble.append(meta); }
  meta.textContent = text;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    const error = body.error;
    return typeof error === "string" ? error : (error && error.message) || JSON.stringify(body);
  } catch (_) { return `HTTP ${response.status}`; }
}

async function loadModels() {
  status("loading models…");
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const models = (await response.json()).data.map((m) => m.id);
    const select = $("model");
    select.replaceChildren(...models.map((id) => new Option(id, id)));
    if (models.includes(state.model)) select.value = state.model;
    state.model = select.value;
    status(models.length ? `${models.length} chat model(s)` : "no chat model is loaded");
  } catch (error) {
    status(`cannot list models: ${error.message}`);
  }
}

function readSettings() {
  for (const id of SETTINGS) state.settings[id] = $(id).value;
  save();
}

function requestBody() {
  const s = state.settings;
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of state.messages) if (m.role !== "error") messages.push({ role: m.role, content: m.content });
  const body = { model: $("model").value, messages, stream: true, stream_options: { include_usage: true } };
  for (const [name, parse] of [["temperature", Number], ["top_p", Number], ["max_tokens", Number],
                               ["seed", Number]]) {
    if (s[name] !== "") body[name] = parse(s[name]);
  }
  if (s.schema.trim()) {
    const schema = JSON.parse(s.schema); // a SyntaxError is shown to the user by send()
    body.response_format = { type: "json_schema", json_schema: { name: "reply", schema, strict: true } };
  }
  return body;
}

// Server-sent events from a fetch body: yields each `data:` payload.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

function setRunning(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("model").disabled = on;
}

async function send() {
  const prompt = $("prompt").value;
  if (!prompt.trim() || running) return;
  readSettings();
  $("schema_error").hidden = true;
  state.messages.push({ role: "user", content: prompt });
  let body;
  try {
    body = requestBody();
  } catch (error) {
    state.messages.pop();
    $("schema_error").textContent = `JSON schema: ${error.message}`;
    $("schema_error").hidden = false;
    return;
  }
  $("prompt").value = "";
  addBubble("user", prompt);
  save();
  state.model = body.model;

  const bubble = addBubble("assistant", "");
  bubble.classList.add("streaming");
  const text = bubble.querySelector(".text");
  const controller = new AbortController();
  running = { controller, bubble };
  setRunning(true);
  const started = performance.now();
  let first = 0, usage = null, finish = null, reply = "";
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (!first) first = performance.now();
          reply += piece;
          text.textContent = reply;
          bubble.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    const seconds = (performance.now() - started) / 1000;
    const parts = [];
    if (usage) parts.push(`${usage.completion_tokens} tokens, ${(usage.completion_tokens / seconds).toFixed(1)} tokens/s`);
    if (first) parts.push(`first token ${Math.round(first - started)} ms`);
    if (finish) parts.push(`finish: ${finish}`);
    finishTurn(bubble, reply, parts.join(" · "));
  } catch (error) {
    if (error.name === "AbortError") {
      finishTurn(bubble, reply, "stopped");
    } else {
      bubble.remove();
      if (reply) finishTurn(addBubble("assistant", reply), reply, "interrupted");
      addBubble("error", error.message);
    }
  } finally {
    running = null;
    setRunning(false);
  }
}

function finishTurn(bubble, reply, meta) {
  bubble.classList.remove("streaming");
  bubble.dataset.done = "true";
  setMeta(bubble, meta);
  state.messages.push({ role: "assistant", content: reply, meta });
  save();
}

function stop() {
  if (running) running.controller.abort();
}

function newChat() {
  stop();
  state.messages = [];
  save();
  $("messages").replaceChildren();
}

$("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
});
$("stop").addEventListener("click", stop);
$("new_chat").addEventListener("click", newChat);
$("model").addEventListener("change", () => { state.model = $("model").value; save(); });
for (const id of SETTINGS) $(id).addEventListener("change", readSettings);
$("api_key").addEventListener("change", loadModels);
restore();
loadModels();
