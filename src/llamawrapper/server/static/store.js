// Conversation history and settings, kept in the browser (localStorage), never on the server.
//
// A conversation: {id, title, created, system, messages: [{role, content, stats?}]}. The API
// key is kept in sessionStorage only (this tab, until it closes), not with the history.

const CONVERSATIONS = "llamawrapper.conversations";
const CURRENT = "llamawrapper.current";
const SETTINGS = "llamawrapper.settings";
const API_KEY = "llamawrapper.apiKey";

function read(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

function newId() {
  return (crypto.randomUUID?.() ?? `${Date.now()}-${Math.random().toString(16).slice(2)}`);
}

export class Store {
  constructor() {
    this.conversations = read(CONVERSATIONS, []).filter((c) => c && c.id && Array.isArray(c.messages));
    this.currentId = localStorage.getItem(CURRENT);
    if (!this.current) this.create();
  }

  get current() {
    return this.conversations.find((c) => c.id === this.currentId) ?? null;
  }

  save() {
    localStorage.setItem(CONVERSATIONS, JSON.stringify(this.conversations));
    localStorage.setItem(CURRENT, this.currentId ?? "");
  }

  create(system = "") {
    const conv = { id: newId(), title: "New chat", created: new Date().toISOString(), system, messages: [] };
    this.conversations.unshift(conv);
    this.currentId = conv.id;
    this.save();
    return conv;
  }

  select(id) {
    if (this.conversations.some((c) => c.id === id)) {
      this.currentId = id;
      this.save();
    }
  }

  rename(id, title) {
    const conv = this.conversations.find((c) => c.id === id);
    if (conv && title.trim()) {
      conv.title = title.trim().slice(0, 120);
      this.save();
    }
  }

  remove(id) {
    this.conversations = this.conversations.filter((c) => c.id !== id);
    if (this.currentId === id) this.currentId = this.conversations[0]?.id ?? null;
    if (!this.current) this.create();
    this.save();
  }

  // The JSON a user downloads: the conversation as stored (messages in OpenAI's shape + stats).
  exportJSON(id = this.currentId) {
    const conv = this.conversations.find((c) => c.id === id);
    return JSON.stringify(conv, null, 2);
  }

  settings() {
    return read(SETTINGS, {});
  }

  saveSettings(values) {
    localStorage.setItem(SETTINGS, JSON.stringify(values));
  }

  get apiKey() {
    return sessionStorage.getItem(API_KEY) ?? "";
  }

  set apiKey(value) {
    if (value) sessionStorage.setItem(API_KEY, value);
    else sessionStorage.removeItem(API_KEY);
  }
}
