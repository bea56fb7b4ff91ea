// The chat page: wires the model picker, the conversation list, the composer (Send / Stop) and
// the settings to the store (history in localStorage) and the API (streamed completions).
// Model output is rendered by markdown.js, which builds text nodes only.

import { listModels, streamChat } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { Store } from "./store.js";
import { renderTaskPanels, taskKind } from "./tasks.js";

const $ = (id) => document.getElementById(id);
const store = new Store();
const PARAMS = ["temperature", "top_p", "max_tokens", "seed"];
let controller = null; // the AbortController of the answer being streamed

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// -- settings -------------------------------------------------------------------------------
function loadSettings() {
  const saved = store.settings();
  for (const name of PARAMS) if (saved[name] !== undefined) $(name).value = saved[name];
  $("api_key").value = store.apiKey;
  $("system").value = store.current.system ?? "";
}

function saveSettings() {
  const values = Object.fromEntries(PARAMS.map((n) => [n, $(n).value]));
  values.model = $("model").value;
  store.saveSettings(values);
}

function samplingParams() {
  const out = {};
  const number = (name, parse) => {
    const raw = $(name).value.trim();
    if (raw !== "" && !Number.isNaN(parse(raw))) out[name] = parse(raw);
  };
  number("temperature", parseFloat);
  number("top_p", parseFloat);
  number("max_tokens", (v) => parseInt(v, 10));
  number("seed", (v) => parseInt(v, 10));
  return out;
}

// -- models ---------------------------------------------------------------------------------
async function loadModels() {
  const select = $("model");
  try {
    const models = await listModels(store.apiKey);
    const chat = models.filter((m) => taskKind(m) === "chat");
    const wanted = store.settings().model;
    select.replaceChildren(...chat.map((m) => Object.assign(el("option", "", m.id), { value: m.id })));
    if (chat.some((m) => m.id === wanted)) select.value = wanted;
    renderTaskPanels($("task-panels"), models, () => store.apiKey);
    setStatus(chat.length ? "" : "No chat model is served.", !chat.length);
  } catch (err) {
    setStatus(err.status === 401 ? "The server needs an API key (see Settings)." : `Models: ${err.message}`, true);
  }
}

// -- conversations --------------------------------------------------------------------------
function renderConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of store.conversations) {
    const item = el("li", conv.id === store.currentId ? "active" : "");
    const open = el("button", "conv-title", conv.title);
    open.type = "button";
    open.title = conv.title;
    open.addEventListener("click", () => switchTo(conv.id));
    const rename = el("button", "conv-rename", "✎");
    rename.type = "button";
    rename.setAttribute("aria-label", `Rename ${conv.title}`);
    rename.addEventListener("click", () => {
      const title = window.prompt("Rename conversation", conv.title);
      if (title !== null) {
        store.rename(conv.id, title);
        renderConversations();
      }
    });
    const remove = el("button", "conv-delete", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete ${conv.title}`);
    remove.addEventListener("click", () => {
      if (window.confirm(`Delete "${conv.title}"?`)) {
        store.remove(conv.id);
        showCurrent();
      }
    });
    item.append(open, rename, remove);
    list.append(item);
  }
}

function switchTo(id) {
  if (controller) return; // finish or stop the answer being streamed first
  store.select(id);
  showCurrent();
}

function showCurrent() {
  $("system").value = store.current.system ?? "";
  renderConversations();
  renderMessages();
}

function exportCurrent() {
  const blob = new Blob([store.exportJSON()], { type: "application/json" });
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${store.current.title.replace(/[^\w.-]+/g, "_") || "conversation"}.json`;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// -- messages -------------------------------------------------------------------------------
function statsText(stats) {
  if (!stats) return "";
  const parts = [`${stats.completionTokens} tokens${stats.counted ? " (counted)" : ""}`];
  if (stats.tokensPerSecond) parts.push(`${stats.tokensPerSecond.toFixed(1)} tokens/s`);
  if (stats.promptTokens !== undefined) parts.push(`prompt ${stats.promptTokens}`);
  if (stats.ttft !== undefined) parts.push(`first token ${stats.ttft.toFixed(2)} s`);
  if (stats.finishReason) parts.push(stats.finishReason);
  return parts.join(" · ");
}

function messageNode(message) {
  const node = el("article", `message ${message.role}`);
  node.append(el("div", "role", message.role === "user" ? "You" : message.model ?? "Assistant"));
  const body = el("div", "content");
  if (message.role === "assistant") renderMarkdown(message.content, body);
  else body.textContent = message.content;
  node.append(body, el("div", "stats", statsText(message.stats)));
  return node;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren(...store.current.messages.map(messageNode));
  box.scrollTop = box.scrollHeight;
}

function streaming(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  document.body.classList.toggle("streaming", on);
}

async function send(text) {
  const conv = store.current;
  const model = $("model").value;
  if (!model) return setStatus("Pick a model first.", true);
  conv.system = $("system").value;
  conv.messages.push({ role: "user", content: text });
  if (conv.title === "New chat") conv.title = text.slice(0, 40);
  store.save();
  renderConversations();
  const history = conv.messages.map(({ role, content }) => ({ role, content }));
  const messages = conv.system.trim() ? [{ role: "system", content: conv.system }, ...history] : history;
  const answer = { role: "assistant", content: "", model };
  const box = $("messages");
  box.append(messageNode(conv.messages.at(-1)));
  const node = messageNode(answer);
  node.classList.add("pending");
  box.append(node);
  box.scrollTop = box.scrollHeight;

  controller = new AbortController();
  streaming(true);
  setStatus("");
  const started = performance.now();
  let firstAt = null;
  let pieces = 0;
  let scheduled = false;
  const paint = () => {
    scheduled = false;
    renderMarkdown(answer.content, node.querySelector(".content"));
    box.scrollTop = box.scrollHeight;
  };
  let result = { finishReason: null, usage: null };
  try {
    result = await streamChat({ model, messages, ...samplingParams() }, store.apiKey, controller.signal, (delta) => {
      firstAt ??= performance.now();
      pieces += 1;
      answer.content += delta;
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(paint);
      }
    });
  } catch (err) {
    if (err.name === "AbortError") result.finishReason = "stopped";
    else setStatus(`Error: ${err.message}`, true);
  } finally {
    controller = null;
    streaming(false);
  }
  const ended = performance.now();
  const tokens = result.usage?.completion_tokens ?? pieces;
  const decodeSeconds = firstAt !== null ? (ended - firstAt) / 1000 : 0;
  answer.stats = {
    completionTokens: tokens, counted: !result.usage, promptTokens: result.usage?.prompt_tokens,
    tokensPerSecond: decodeSeconds > 0 && tokens > 1 ? (tokens - 1) / decodeSeconds : null,
    ttft: firstAt !== null ? (firstAt - started) / 1000 : undefined, finishReason: result.finishReason,
  };
  node.classList.remove("pending");
  paint();
  node.querySelector(".stats").textContent = statsText(answer.stats);
  if (answer.content || result.finishReason) {
    conv.messages.push(answer);
    store.save();
  }
}

// -- wiring ---------------------------------------------------------------------------------
function init() {
  if (window.matchMedia("(max-width: 900px)").matches) {
    document.body.classList.add("settings-hidden");
    $("toggle-settings").setAttribute("aria-expanded", "false");
  }
  loadSettings();
  showCurrent();
  loadModels();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", () => {
    if (controller) return;
    store.create($("system").value);
    showCurrent();
  });
  $("export-chat").addEventListener("click", exportCurrent);
  for (const name of PARAMS) $(name).addEventListener("change", saveSettings);
  $("model").addEventListener("change", saveSettings);
  $("system").addEventListener("change", () => {
    store.current.system = $("system").value;
    store.save();
  });
  $("api_key").addEventListener("change", () => {
    store.apiKey = $("api_key").value.trim();
    loadModels();
  });
  $("toggle-settings").addEventListener("click", () => {
    const hidden = document.body.classList.toggle("settings-hidden");
    $("toggle-settings").setAttribute("aria-expanded", String(!hidden));
  });
}

init();
