// Aviary's web chat page: plain JavaScript, no framework, no build step, nothing loaded from elsewhere.
// It calls this server's OpenAI-compatible API (v1/models; v1/chat/completions with stream: true, read as
// server-sent events) and keeps the conversations and settings in the browser's localStorage.
// Text from the model or the user is only ever set as textContent, never parsed as markup.
"use strict";

const KEYS = {
  conversations: "aviary.conversations",  // [{id, title, messages: [{role, content, reasoning?, note?}]}]
  current: "aviary.current",               // the id of the open conversation
  settings: "aviary.settings",             // {model, system, temperature, top_p, max_tokens, thinking}
  apiKey: "aviary.apiKey",
};
const NUMBERS = ["temperature", "top_p", "max_tokens"];  // sent only when set: empty means the server's default

const $ = (id) => document.getElementById(id);
const ui = {};
let conversations = [];
let currentId = null;
let controller = null;  // the AbortController of the reply being streamed, null when none is
let streaming = null;   // {reply, view}: the message being streamed and its element

function loadJSON(key, fallback, check) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value !== null && check(value) ? value : fallback;
  } catch {
    return fallback;
  }
}

function storeJSON(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (e) {
    showError(`Could not save in this browser's storage (${e.message}); delete some conversations.`);
  }
}

function saveConversations() {
  storeJSON(KEYS.conversations, conversations);
  if (currentId) localStorage.setItem(KEYS.current, currentId);
  else localStorage.removeItem(KEYS.current);
}

function makeId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
}

function current() {
  return conversations.find((c) => c.id === currentId) || null;
}

// ---- errors -----------------------------------------------------------------------------------------------

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

// An HTTP error's text: the OpenAI error JSON's message when the server sent one.
async function errorMessage(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) detail = body.error.message;
  } catch {
    // not JSON: the status line says it
  }
  return `HTTP ${response.status}: ${detail}`;
}

// ---- settings ---------------------------------------------------------------------------------------------

function loadSettings() {
  const saved = loadJSON(KEYS.settings, {}, (v) => typeof v === "object" && !Array.isArray(v));
  ui.system.value = typeof saved.system === "string" ? saved.system : "";
  for (const name of NUMBERS) ui[name].value = typeof saved[name] === "number" ? String(saved[name]) : "";
  ui.thinking.checked = saved.thinking !== false;
  ui.model.dataset.saved = typeof saved.model === "string" ? saved.model : "";
  ui.apiKey.value = localStorage.getItem(KEYS.apiKey) || "";
}

function saveSettings() {
  const settings = { model: ui.model.value, system: ui.system.value, thinking: ui.thinking.checked };
  for (const name of NUMBERS) {
    if (ui[name].value !== "" && ui[name].validity.valid) settings[name] = Number(ui[name].value);
  }
  storeJSON(KEYS.settings, settings);
  const key = ui.apiKey.value.trim();
  if (key) localStorage.setItem(KEYS.apiKey, key);
  else localStorage.removeItem(KEYS.apiKey);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModels() {
  let ids;
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    ids = (await response.json()).data.map((m) => m.id);
  } catch (e) {
    showError(`Could not list the models: ${e.message}`);
    return false;
  }
  const wanted = ui.model.value || ui.model.dataset.saved;
  ui.model.replaceChildren(...ids.map((id) => new Option(id, id)));
  if (ids.includes(wanted)) ui.model.value = wanted;
  ui.modelName.textContent = ui.model.value;
  hideError();
  return ids.length > 0;
}

// ---- rendering --------------------------------------------------------------------------------------------

function renderConversations() {
  const items = conversations.map((c) => {
    const item = document.createElement("li");
    if (c.id === currentId) item.setAttribute("aria-current", "true");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    open.addEventListener("click", () => openConversation(c.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete";
    remove.textContent = "\u00d7";
    remove.setAttribute("aria-label", `Delete conversation: ${c.title}`);
    remove.addEventListener("click", () => deleteConversation(c.id));
    item.append(open, remove);
    return item;
  });
  ui.conversations.replaceChildren(...items);
}

// A message's element, and a function that redraws it from the message (called as a reply streams in).
function messageView(message) {
  const box = document.createElement("div");
  box.className = `message ${message.role}`;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = message.role === "user" ? "You" : "Assistant";
  box.append(who);
  let reasoning = null;
  let summary = null;
  let reasoningText = null;
  if (message.role === "assistant") {
    reasoning = document.createElement("details");  // folded: the answer comes first to the eye
    reasoning.className = "reasoning";
    summary = document.createElement("summary");
    reasoningText = document.createElement("div");
    reasoningText.className = "reasoning-text";
    reasoning.append(summary, reasoningText);
    box.append(reasoning);
  }
  const content = document.createElement("div");
  content.className = "content";
  const note = document.createElement("div");
  note.className = "note";
  box.append(content, note);
  const update = (live) => {
    content.textContent = message.content;
    note.textContent = message.note || "";
    note.hidden = !message.note;
    if (reasoning) {
      reasoning.hidden = !message.reasoning;
      reasoningText.textContent = message.reasoning || "";
      summary.textContent = live && !message.content ? "Thinking\u2026" : "Reasoning";
    }
  };
  update(false);
  return { box, update };
}

function renderMessages() {
  const conversation = current();
  const views = (conversation ? conversation.messages : [])
    .map((m) => (streaming && m === streaming.reply ? streaming.view.box : messageView(m).box));
  ui.messages.replaceChildren(...views);
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function render() {
  renderConversations();
  renderMessages();
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

// ---- conversations ----------------------------------------------------------------------------------------

function openConversation(id) {
  currentId = id;
  saveConversations();
  hideError();
  render();
  ui.input.focus();
}

function newConversation() {
  openConversation(null);  // it is stored once it has a first message
}

function deleteConversation(id) {
  conversations = conversations.filter((c) => c.id !== id);
  if (currentId === id) currentId = null;
  saveConversations();
  render();
}

// ---- sending and streaming --------------------------------------------------------------------------------

// The request for the next reply to `history`: the system prompt, then the conversation. An earlier reply goes
// back with its reasoning, so the prompt is the text the model wrote and the server can start from its cached
// state.
function requestBody(history) {
  const messages = ui.system.value.trim() ? [{ role: "system", content: ui.system.value }] : [];
  for (const m of history) {
    const message = { role: m.role, content: m.content };
    if (m.reasoning) message.reasoning_content = m.reasoning;
    messages.push(message);
  }
  const body = { model: ui.model.value, messages, stream: true };
  for (const name of NUMBERS) {
    if (ui[name].value !== "") body[name] = Number(ui[name].value);
  }
  if (!ui.thinking.checked) body.reasoning_effort = "none";
  return body;
}

// Calls onEvent with each server-sent event's JSON until "data: [DONE]" or the end of the stream.
async function readEvents(stream, onEvent) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();  // a line not yet complete
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // closes the connection when we stop early
  }
}

async function send() {
  const text = ui.input.value;
  if (!text.trim() || controller) return;
  hideError();
  if (!ui.model.value && !(await loadModels())) return;
  let conversation = current();
  if (!conversation) {
    conversation = { id: makeId(), title: text.trim().slice(0, 60), messages: [] };
    conversations.unshift(conversation);
    currentId = conversation.id;
  }
  const question = { role: "user", content: text };
  const reply = { role: "assistant", content: "", reasoning: "" };
  const body = requestBody([...conversation.messages, question]);
  conversation.messages.push(question, reply);
  ui.input.value = "";
  const view = messageView(reply);
  streaming = { reply, view };
  saveConversations();
  render();
  const follow = () => {
    const atBottom = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 40;
    view.update(true);
    if (atBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
  };

  controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response.body, (event) => {
      if (event.error) throw new Error(event.error.message || "the server failed");
      for (const choice of event.choices || []) {
        const delta = choice.delta || {};
        if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
        if (delta.content) reply.content += delta.content;
        if (choice.finish_reason === "length") reply.note = "cut off at max tokens";
      }
      follow();
    });
  } catch (e) {
    if (e.name === "AbortError") reply.note = "stopped";
    else showError(e instanceof TypeError ? `Could not reach the server (${e.message}).` : e.message);
  } finally {
    controller = null;
    streaming = null;
    setBusy(false);
  }
  if (!reply.content && !reply.reasoning) {
    // nothing came back (an error, or stopped at once): take the turn out and give the text back to resend
    conversation.messages.splice(conversation.messages.indexOf(question), 2);
    if (!conversation.messages.length) deleteConversation(conversation.id);
    if (!ui.input.value) ui.input.value = text;
  }
  if (!reply.reasoning) delete reply.reasoning;
  view.update(false);
  saveConversations();
  if (currentId === conversation.id) renderMessages();
}

function stop() {
  if (controller) controller.abort();
}

// ---- start ------------------------------------------------------------------------------------------------

function start() {
  for (const id of ["messages", "error", "input", "send", "stop", "conversations", "model", "system", "temperature",
                    "top_p", "max_tokens", "thinking"]) {
    ui[id] = $(id);
  }
  ui.apiKey = $("api-key");
  ui.modelName = $("model-name");
  ui.newChat = $("new-chat");

  conversations = loadJSON(KEYS.conversations, [], (v) => Array.isArray(v))
    .filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages));
  currentId = localStorage.getItem(KEYS.current);
  if (!current()) currentId = null;
  loadSettings();
  if (window.matchMedia("(max-width: 760px)").matches) $("settings").open = false;  // the chat first on a phone
  render();

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newConversation);
  $("settings-form").addEventListener("submit", (e) => e.preventDefault());
  $("settings-form").addEventListener("change", (e) => {
    saveSettings();
    if (e.target === ui.apiKey) loadModels();
    ui.modelName.textContent = ui.model.value;
  });
  loadModels();
  ui.input.focus();
}

document.addEventListener("DOMContentLoaded", start);
