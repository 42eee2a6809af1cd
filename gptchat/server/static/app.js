// The gptchat web UI: talks to /api (see gptchat/server/conversations.py). No framework, no build step.
// Text from the model or the user only ever reaches the page through textContent / createTextNode
// (Markdown.render builds nodes the same way), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "gptchat.apiKey";
const state = {
  info: null,
  conversation: null,   // the open conversation (without messages)
  messages: new Map(),  // its messages by id, every branch
  streaming: null,      // {conversationId, abort} while a reply streams
};

// -- the API ------------------------------------------------------------------------------------------

function askKey(message) {
  return new Promise((resolve) => {
    $("key-error").textContent = message || "";
    $("key-dialog").hidden = false;
    $("key-input").value = "";
    $("key-input").focus();
    $("key-form").onsubmit = (e) => {
      e.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      localStorage.setItem(KEY, key);
      $("key-dialog").hidden = true;
      resolve(key);
    };
  });
}

class APIError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// fetch with the key; on 401 ask for the key (once per wrong key) and try again
async function request(method, path, body, options = {}) {
  for (;;) {
    const headers = {};
    const key = localStorage.getItem(KEY);
    if (key) headers["Authorization"] = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                 signal: options.signal});
    if (r.status === 401) {
      await askKey(key ? "That key was refused; try again." : "");
      continue;
    }
    if (options.raw && r.ok) return r;
    const data = await r.json().catch(() => null);
    if (!r.ok) throw new APIError(r.status, data);
    return data;
  }
}

const api = {
  get: (path) => request("GET", path),
  post: (path, body) => request("POST", path, body === undefined ? {} : body),
  patch: (path, body) => request("PATCH", path, body),
  del: (path) => request("DELETE", path),
};

// Server-sent events of a fetch response, one parsed object at a time
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of chunk.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function showError(err) {
  $("error").textContent = err ? (err.message || String(err)) : "";
}

// -- the conversation list ------------------------------------------------------------------------------

async function refreshList() {
  const search = $("search").value.trim();
  const {conversations} = await api.get("/api/conversations" + (search ? "?search=" + encodeURIComponent(search) : ""));
  const list = $("conversations");
  list.replaceChildren();
  for (const c of conversations) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    if (state.conversation && c.id === state.conversation.id) li.classList.add("active");
    const title = document.createElement("button");
    title.type = "button";
    title.className = "title";
    title.textContent = c.title;
    title.title = c.title;
    title.onclick = () => openConversation(c.id).catch(showError);
    const rename = document.createElement("button");
    rename.type = "button";
    rename.className = "icon rename";
    rename.title = "Rename";
    rename.textContent = "✎";
    rename.onclick = () => startRename(li, c);
    const del = document.createElement("button");
    del.type = "button";
    del.className = "icon delete";
    del.title = "Delete";
    del.textContent = "🗑";
    del.onclick = () => deleteConversation(c).catch(showError);
    li.append(title, rename, del);
    list.appendChild(li);
  }
}

function startRename(li, c) {
  const input = document.createElement("input");
  input.className = "rename-input";
  input.value = c.title;
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    if (save && input.value.trim() && input.value !== c.title) {
      const updated = await api.patch(`/api/conversations/${c.id}`, {title: input.value.trim()});
      if (state.conversation && state.conversation.id === c.id) setConversation(updated);
    }
    await refreshList();
  };
  input.onkeydown = (e) => {
    if (e.key === "Enter") finish(true).catch(showError);
    if (e.key === "Escape") finish(false).catch(showError);
  };
  input.onblur = () => finish(true).catch(showError);
}

async function deleteConversation(c) {
  if (!confirm(`Delete "${c.title}"?`)) return;
  await api.del(`/api/conversations/${c.id}`);
  if (state.conversation && state.conversation.id === c.id) newChat();
  await refreshList();
}

// -- one conversation -------------------------------------------------------------------------------

function newChat() {
  state.conversation = null;
  state.messages = new Map();
  $("title").textContent = "New conversation";
  $("system-prompt").value = "";
  fillSettings({temperature: 0.7});
  render();
  for (const li of $("conversations").children) li.classList.remove("active");
  $("input").focus();
}

function setConversation(c) {
  state.conversation = c;
  $("title").textContent = c.title;
}

async function openConversation(id) {
  const c = await api.get(`/api/conversations/${id}`);
  state.messages = new Map(c.messages.map((m) => [m.id, m]));
  delete c.messages;
  setConversation(c);
  $("system-prompt").value = c.system_prompt;
  fillSettings(c.settings);
  render();
  await refreshList();
}

// The conversation to send into: the open one, or a new one with the settings on screen
async function ensureConversation() {
  if (state.conversation) return state.conversation;
  const c = await api.post("/api/conversations", {system_prompt: $("system-prompt").value, settings: readSettings()});
  setConversation(c);
  return c;
}

// -- settings -------------------------------------------------------------------------------------------

function fillSettings(settings) {
  for (const input of document.querySelectorAll("[data-setting]")) {
    const v = settings[input.dataset.setting];
    input.value = v === undefined || v === null ? "" : v;
  }
  $("show-probs").checked = !!settings.logprobs;
  $("settings-error").textContent = "";
}

function readSettings() {
  const settings = {};
  for (const input of document.querySelectorAll("[data-setting]")) {
    if (input.value.trim() === "") continue;
    const v = "int" in input.dataset ? parseInt(input.value, 10) : parseFloat(input.value);
    if (!Number.isNaN(v)) settings[input.dataset.setting] = v;
  }
  if ($("show-probs").checked) settings.logprobs = true;
  return settings;
}

async function saveSettings() {
  $("settings-error").textContent = "";
  render();  // the probability view follows the checkbox at once
  if (!state.conversation) return;
  try {
    const c = await api.patch(`/api/conversations/${state.conversation.id}`,
                              {settings: readSettings(), system_prompt: $("system-prompt").value});
    setConversation(c);
  } catch (err) {
    $("settings-error").textContent = err.message;
  }
}

// -- the message tree ---------------------------------------------------------------------------------

function branch() {
  const out = [];
  let id = state.conversation ? state.conversation.current_leaf : null;
  while (id && state.messages.has(id)) {
    const m = state.messages.get(id);
    out.unshift(m);
    id = m.parent_id;
  }
  return out;
}

function siblings(m) {
  return [...state.messages.values()].filter((o) => o.parent_id === m.parent_id);
}

// the newest leaf under a message: where its branch goes on
function leafUnder(m) {
  for (;;) {
    const kids = [...state.messages.values()].filter((o) => o.parent_id === m.id);
    if (!kids.length) return m;
    m = kids[kids.length - 1];
  }
}

async function switchTo(m) {
  const leaf = leafUnder(m);
  const c = await api.patch(`/api/conversations/${state.conversation.id}`, {current_leaf: leaf.id});
  setConversation(c);
  render();
}

// -- rendering ------------------------------------------------------------------------------------------

function probabilityView(logprobs) {
  const strip = document.createElement("div");
  strip.className = "tokens";
  const detail = document.createElement("div");
  detail.className = "token-detail";
  for (const t of logprobs) {
    const span = document.createElement("span");
    const p = Math.exp(t.logprob);
    span.className = "token";
    span.textContent = t.token;
    span.style.backgroundColor = `hsla(${Math.round(120 * p)}, 70%, 50%, 0.25)`;
    const alternatives = (t.top_logprobs || []).map((a) => `${JSON.stringify(a.token)} ${(100 * Math.exp(a.logprob)).toFixed(1)}%`);
    span.title = `${(100 * p).toFixed(1)}%` + (alternatives.length ? "\n" + alternatives.join("\n") : "");
    span.onclick = () => {
      detail.textContent = `${JSON.stringify(t.token)}: ${(100 * p).toFixed(2)}%` +
        (alternatives.length ? "  —  top: " + alternatives.join(",  ") : "");
    };
    strip.appendChild(span);
  }
  const box = document.createElement("div");
  box.append(strip, detail);
  return box;
}

function button(text, className, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.onclick = () => Promise.resolve(onclick()).catch(showError);
  return b;
}

function messageView(m, {streaming = false} = {}) {
  const div = document.createElement("div");
  div.className = `message ${m.role}` + (streaming ? " streaming" : "");
  if (m.id) div.dataset.id = m.id;
  div.dataset.status = m.status || "";
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = m.role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  body.appendChild(Markdown.render(m.content));
  div.append(role, body);
  if (m.logprobs && $("show-probs").checked) div.appendChild(probabilityView(m.logprobs));
  if (streaming) return div;

  const bar = document.createElement("div");
  bar.className = "actions";
  if (m.status && m.status !== "complete") {
    const badge = document.createElement("span");
    badge.className = "badge " + m.status;
    badge.textContent = m.status;
    bar.appendChild(badge);
  }
  const sibs = siblings(m);
  if (sibs.length > 1) {
    const at = sibs.findIndex((o) => o.id === m.id);
    const nav = document.createElement("span");
    nav.className = "branches";
    const prev = button("‹", "icon prev", () => switchTo(sibs[at - 1]));
    prev.disabled = at === 0;
    const next = button("›", "icon next", () => switchTo(sibs[at + 1]));
    next.disabled = at === sibs.length - 1;
    const label = document.createElement("span");
    label.textContent = `${at + 1}/${sibs.length}`;
    nav.append(prev, label, next);
    bar.appendChild(nav);
  }
  if (m.role === "user") bar.appendChild(button("Edit", "edit", () => startEdit(div, m)));
  const unanswered = m.role === "user" && ![...state.messages.values()].some((o) => o.parent_id === m.id);
  if (unanswered) bar.appendChild(button("Answer", "answer", () => send({parent_id: m.id})));
  if (m.role === "assistant") bar.appendChild(button("Regenerate", "regenerate", () => send({parent_id: m.parent_id})));
  div.appendChild(bar);
  return div;
}

function startEdit(div, m) {
  if (state.streaming) return;
  const box = document.createElement("textarea");
  box.className = "edit-box";
  box.value = m.content;
  box.rows = Math.min(12, m.content.split("\n").length + 1);
  const save = button("Save & send", "save-edit", () => {
    if (box.value.trim()) return send({content: box.value, parent_id: m.parent_id});
  });
  const cancel = button("Cancel", "cancel-edit", () => render());
  div.replaceChildren(box, save, cancel);
  box.focus();
}

function render(extra = []) {
  const list = $("messages");
  list.replaceChildren(...branch().map((m) => messageView(m)), ...extra);
  list.scrollTop = list.scrollHeight;
}

// -- sending and streaming ----------------------------------------------------------------------------

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  document.body.classList.toggle("busy", on);
}

// Send a message ({content}), an edit ({content, parent_id}) or a regeneration ({parent_id}); stream the reply
async function send(body) {
  if (state.streaming) return;
  showError(null);
  const c = await ensureConversation();
  const abort = new AbortController();
  state.streaming = {conversationId: c.id, abort};
  setStreaming(true);
  let pending = [];
  if (body.content !== undefined) pending.push(messageView({role: "user", content: body.content}, {streaming: true}));
  const reply = {role: "assistant", content: "", logprobs: null};
  // while streaming only the reply's node is redrawn, at most once a frame
  let replyNode = null;
  let frame = 0;
  const here = () => state.conversation && state.conversation.id === c.id;  // the user may open another one
  const paint = () => {
    frame = 0;
    if (!here()) return;
    const node = messageView(reply, {streaming: true});
    if (replyNode && replyNode.isConnected) replyNode.replaceWith(node);
    else $("messages").appendChild(node);
    replyNode = node;
    $("messages").scrollTop = $("messages").scrollHeight;
  };
  render(pending);
  try {
    const r = await request("POST", `/api/conversations/${c.id}/messages`, body, {raw: true, signal: abort.signal});
    for await (const e of events(r)) {
      if (e.type === "start" && here()) {
        state.messages.set(e.user.id, e.user);
        state.conversation.current_leaf = e.user.id;
        render();
        paint();
      } else if (e.type === "delta") {
        reply.content += e.text;
        if (e.logprobs) reply.logprobs = (reply.logprobs || []).concat(e.logprobs);
        if (!frame) frame = requestAnimationFrame(paint);
      } else if (e.type === "done" || e.type === "error") {
        if (e.message && here()) {
          state.messages.set(e.message.id, e.message);
          state.conversation.current_leaf = e.message.id;
        }
        if (e.type === "error") showError(new Error(e.error.message));
        break;
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") showError(err);
  } finally {
    state.streaming = null;
    setStreaming(false);
  }
  if (here()) await openConversation(c.id);  // the server's view: titles, ids, statuses
  else await refreshList();
}

async function stop() {
  const s = state.streaming;
  if (!s) return;
  try {
    await api.post(`/api/conversations/${s.conversationId}/stop`);
  } catch (err) {
    s.abort.abort();  // the server keeps what was said when the connection ends, too
  }
}

// -- export and import ------------------------------------------------------------------------------

// every conversation, or only the open one
async function exportJSON(one) {
  if (one && !state.conversation) return;
  const data = await api.get(one ? `/api/conversations/${state.conversation.id}/export` : "/api/export");
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], {type: "application/json"}));
  const a = document.createElement("a");
  a.href = url;
  a.download = one ? `gptchat-${state.conversation.title.replace(/[^\w -]+/g, "").trim().slice(0, 40) || "chat"}.json`
                   : `gptchat-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function importFile(file) {
  let data;
  try {
    data = JSON.parse(await file.text());
  } catch (err) {
    throw new Error(`${file.name} is not valid JSON`);
  }
  const {conversations} = await api.post("/api/import", data);
  await refreshList();
  if (conversations.length) await openConversation(conversations[0].id);
}

// -- wiring ---------------------------------------------------------------------------------------------

function debounce(fn, ms) {
  let timer;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

async function start() {
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.streaming) return;
    $("input").value = "";
    send({content: text}).catch(showError);
  };
  $("input").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  };
  $("stop").onclick = () => stop().catch(showError);
  $("new-chat").onclick = newChat;
  $("search").oninput = debounce(() => refreshList().catch(showError), 200);
  $("export").onclick = () => exportJSON(false).catch(showError);
  $("export-one").onclick = () => exportJSON(true).catch(showError);
  $("import").onchange = (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (file) importFile(file).catch(showError);
  };
  $("toggle-settings").onclick = () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  };
  for (const input of document.querySelectorAll("[data-setting]")) input.onchange = saveSettings;
  $("show-probs").onchange = saveSettings;
  $("system-prompt").onchange = saveSettings;

  state.info = await api.get("/api/info");
  $("model").textContent = `${state.info.model} · ${state.info.context_length} tokens`;
  if (!state.info.logprobs) {  // stored (imported) probabilities can still be shown
    $("show-probs").parentElement.title = "This server does not compute token probabilities yet";
  }
  newChat();
  await refreshList();
  document.body.dataset.ready = "1";
}

start().catch(showError);
