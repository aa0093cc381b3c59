// The labeling page: sign in, show one pair at a time, send the choice, repeat.
//
// Model text is untrusted: it reaches the DOM only through textContent, never as HTML.
// A submission carries a client id made once per submission; it is kept in sessionStorage until
// the server acknowledges it and re-sent with the same id after network errors, server restarts
// and page reloads, so the server stores it exactly once.
"use strict";

const $ = (id) => document.getElementById(id);
const saved = window.sessionStorage;
const KEYS = {
  a: "left", ArrowLeft: "left", 1: "left",
  b: "right", ArrowRight: "right", 2: "right",
  t: "tie", 3: "tie",
  x: "both_bad", 4: "both_bad",
  s: "skip",
  r: "rationale",
};

let config = null;      // {campaign, auth: "name" | "token", k}
let credential = null;  // the annotator's name or token
let item = null;        // the open item: {pair_id, prompt, left: {side, text}, right: {side, text}}
let shownAt = 0;        // performance.now() when the item appeared, for time per label
let busy = false;

class HttpError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function newClientId() {
  if (crypto.randomUUID) return crypto.randomUUID(); // secure contexts only (http://127.0.0.1 is one)
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; // version 4
  b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (credential === null) return h;
  if (config.auth === "token") h.Authorization = `Bearer ${credential}`;
  else h["X-Annotator"] = encodeURIComponent(credential);
  return h;
}

// One API call. Network errors and 5xx answers are retried until the server answers, with the
// same body (so the same client id): the server may be restarting.
async function api(method, path, body) {
  let delay = 250;
  for (;;) {
    let response = null;
    try {
      response = await fetch(path, {
        method,
        headers: headers(),
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      response = null;
    }
    if (response !== null && response.status < 500) {
      setStatus("");
      const data = await response.json().catch(() => ({}));
      if (!response.ok) throw new HttpError(response.status, data.detail);
      return data;
    }
    setStatus("The server is not answering; retrying. Nothing you labeled is lost.", true);
    await sleep(delay);
    delay = Math.min(delay * 2, 4000);
  }
}

function setStatus(text, warning = false) {
  $("status").textContent = text;
  $("status").className = warning ? "warning" : "";
}

function show(section) {
  for (const id of ["login", "task", "done"]) $(id).hidden = id !== section;
  $("who").hidden = section === "login";
}

function showLogin(message = "") {
  credential = null;
  saved.removeItem("credential");
  $("login-error").textContent = message;
  show("login");
  $("login-input").focus();
}

function showProgress(p) {
  $("progress").textContent =
    `Campaign: ${p.labeled} / ${p.target} labels (${p.pairs} pairs × k=${p.k}) · You: ${p.mine}`;
}

function renderPrompt(element, prompt) {
  element.replaceChildren();
  if (typeof prompt === "string") {
    element.textContent = prompt;
    return;
  }
  for (const message of prompt) {
    const line = document.createElement("div");
    const role = document.createElement("span");
    role.className = "message-role";
    role.textContent = `${message.role}: `;
    const content = document.createElement("span");
    content.textContent = message.content;
    line.append(role, content);
    element.append(line);
  }
}

async function loadNext() {
  const data = await api("GET", "/api/next");
  showProgress(data.progress);
  item = data.item;
  document.body.dataset.pairId = item === null ? "" : item.pair_id; // for tests and bug reports
  if (item === null) {
    show("done");
    return;
  }
  renderPrompt($("prompt"), item.prompt);
  $("left-text").textContent = item.left.text;
  $("right-text").textContent = item.right.text;
  $("rationale").value = "";
  show("task");
  shownAt = performance.now();
}

// Send a label or skip; it stays in sessionStorage until acknowledged, so a reload re-sends it.
async function send(kind, body) {
  saved.setItem("pending", JSON.stringify({ kind, body }));
  try {
    await api("POST", `/api/${kind}`, body);
  } catch (err) {
    // 4xx: the server will never take it (e.g. already labeled in another tab); don't resend.
    if (err.status !== 401) saved.removeItem("pending");
    throw err;
  }
  saved.removeItem("pending");
}

async function flushPending() {
  const pending = saved.getItem("pending");
  if (pending === null) return;
  const { kind, body } = JSON.parse(pending);
  await send(kind, body);
}

function setBusy(value) {
  busy = value;
  for (const button of document.querySelectorAll("[data-choice]")) button.disabled = value;
}

async function choose(action) {
  if (busy || item === null) return;
  setBusy(true);
  try {
    if (action === "skip") {
      await send("skips", { client_id: newClientId(), pair_id: item.pair_id });
    } else {
      // The page speaks of screen sides; the server stores the pair's own response (a or b).
      const choice = action === "left" ? item.left.side : action === "right" ? item.right.side : action;
      await send("labels", {
        client_id: newClientId(),
        pair_id: item.pair_id,
        choice,
        left_side: item.left.side,
        rationale: $("rationale").value.trim() || null,
        elapsed_ms: Math.round(performance.now() - shownAt),
      });
    }
    await loadNext();
  } catch (err) {
    handleError(err);
  } finally {
    setBusy(false);
  }
}

function handleError(err) {
  if (err.status === 401) {
    showLogin(err.message);
  } else {
    setStatus(err.message, true);
    loadNext().catch((e) => setStatus(e.message, true));
  }
}

async function signIn(value) {
  credential = value;
  let who;
  try {
    who = await api("GET", "/api/whoami");
  } catch (err) {
    showLogin(err.status === 401 ? "Unknown name or token: " + err.message : err.message);
    return;
  }
  saved.setItem("credential", value);
  $("who-name").textContent = who.annotator;
  try {
    await flushPending();
  } catch (err) {
    setStatus(err.message, true);
  }
  await loadNext();
}

function onKey(event) {
  if (event.target === $("rationale")) {
    if (event.key === "Escape") $("rationale").blur();
    return;
  }
  if ($("task").hidden || event.target.tagName === "INPUT") return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const action = KEYS[event.key.length === 1 ? event.key.toLowerCase() : event.key];
  if (action === undefined) return;
  event.preventDefault();
  if (action === "rationale") $("rationale").focus();
  else choose(action);
}

async function main() {
  config = await api("GET", "/api/config");
  $("campaign").textContent = `· ${config.campaign}`;
  if (config.auth === "token") {
    $("login-label").textContent = "Your annotator token";
    $("login-input").type = "password";
  }
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("login-input").value.trim();
    if (value) signIn(value);
  });
  $("sign-out").addEventListener("click", () => showLogin());
  $("again").addEventListener("click", () => loadNext().catch((e) => setStatus(e.message, true)));
  for (const button of document.querySelectorAll("[data-choice]")) {
    button.addEventListener("click", () => choose(button.dataset.choice));
  }
  document.addEventListener("keydown", onKey);
  const remembered = saved.getItem("credential");
  if (remembered !== null) await signIn(remembered);
  else showLogin();
}

main().catch((err) => setStatus(err.message, true));
