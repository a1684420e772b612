// The wasmproc dashboard: one snapshot a second from /ui/events (Server-Sent
// Events), drawn without a framework. Rates are computed here from the
// host's running totals, so a missed snapshot costs nothing but a point.
// Everything a guest can influence (failure details, message bodies, names)
// is set as text, never as markup.
//
// The session comes from the login link's redirect, in the address's
// fragment (#session=…), which the browser never sends anywhere; it moves
// into this origin's storage at once, which no page of another origin can
// read, and rides on every call in a header (the event stream, which cannot
// send headers, in its query).
"use strict";

const SESSION_KEY = "wasmproc-session";
if (location.hash.startsWith("#session=")) {
  localStorage.setItem(SESSION_KEY, location.hash.slice("#session=".length));
  window.history.replaceState(null, "", location.pathname);
}
let session = localStorage.getItem(SESSION_KEY);
let events = null; // the EventSource, while connected

const HISTORY = 60; // points per chart: a minute at one snapshot a second
const series = new Map(); // process name -> {units: [], failures: [], at, lastUnits, lastFailures}
let lastLetters = null; // queue whose dead letters are shown

const $ = (selector, root = document) => root.querySelector(selector);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => (box.hidden = true), 6000);
}

// Shows how to get in, and nothing else.
function lockOut() {
  session = null;
  localStorage.removeItem(SESSION_KEY);
  if (events) events.close();
  events = null;
  $("#dashboard").hidden = true;
  $("#logout").hidden = true;
  $("#locked").hidden = false;
  const live = $("#live");
  live.textContent = "logged out";
  live.classList.add("off");
}

// Admin API calls carry the session; the host also checks that they come
// from this page's origin.
async function call(method, path, body) {
  const headers = { "x-wasmproc-session": session || "" };
  if (body) headers["content-type"] = "text/plain";
  const response = await fetch(path, { method, body, headers, credentials: "omit" });
  if (response.status === 401) {
    lockOut();
    throw new Error("the session has ended");
  }
  const text = await response.text();
  let value = null;
  try {
    value = JSON.parse(text);
  } catch {
    // not JSON: keep the text for the error below
  }
  if (!response.ok) {
    throw new Error((value && value.error) || text || response.statusText);
  }
  return value;
}

function rate(now, before, seconds) {
  if (before === undefined || seconds <= 0) return 0;
  return Math.max(0, (now - before) / seconds);
}

function formatRate(r) {
  return r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r.toFixed(2);
}

function formatAge(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function formatTime(ms) {
  return new Date(ms).toLocaleTimeString();
}

function draw(canvas, points, color) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth * ratio;
  const height = canvas.clientHeight * ratio;
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, width, height);
  const top = Math.max(1, ...points);
  const step = width / (HISTORY - 1);
  const x0 = width - (points.length - 1) * step;
  const y = (v) => height - 2 * ratio - (v / top) * (height - 4 * ratio);
  g.beginPath();
  points.forEach((v, i) => (i ? g.lineTo(x0 + i * step, y(v)) : g.moveTo(x0, y(v))));
  g.strokeStyle = color;
  g.lineWidth = 1.5 * ratio;
  g.stroke();
  g.lineTo(x0 + (points.length - 1) * step, height);
  g.lineTo(x0, height);
  g.closePath();
  g.globalAlpha = 0.12;
  g.fillStyle = color;
  g.fill();
  g.globalAlpha = 1;
}

async function scale(name, n) {
  try {
    await call("POST", "/scale", `${name}=${n}`);
  } catch (e) {
    showError(`scale ${name}: ${e.message}`);
  }
}

function card(process) {
  const name = process.name;
  const root = element("div", { class: "card", "data-process": name });
  const down = element("button", { "data-action": "scale-down", title: "one instance fewer" }, "−");
  const up = element("button", { "data-action": "scale-up", title: "one instance more" }, "+");
  const value = element("output", { "data-field": "scale" });
  down.addEventListener("click", () => scale(name, Math.max(0, Number(value.value) - 1)));
  up.addEventListener("click", () => scale(name, Number(value.value) + 1));
  root.append(
    element("div", { class: "top" },
      element("span", { class: "name" }, name),
      element("span", { class: "kind", "data-field": "kind" }, process.kind),
      element("span", { class: "scale" }, down, value, up)),
    element("div", { class: "bar", title: "busy instances" }, element("span", { "data-field": "busy-bar" })),
    element("div", { class: "stats" },
      element("span", {}, element("b", { "data-field": "busy" }), " busy"),
      element("span", {}, element("b", { "data-field": "idle" }), " idle"),
      element("span", {}, element("b", { "data-field": "units" }), " units"),
      element("span", {}, element("b", { "data-field": "failures" }), " failed"),
      element("span", { "data-field": "bounds" })),
    element("div", { class: "charts" },
      element("div", { class: "chart" },
        element("span", {}, "units/s ", element("b", { "data-field": "units-rate" }, "0")),
        element("canvas", { "data-chart": "units" })),
      element("div", { class: "chart" },
        element("span", {}, "failures/s ", element("b", { "data-field": "failures-rate" }, "0")),
        element("canvas", { "data-chart": "failures" }))));
  return root;
}

function renderProcesses(snapshot) {
  const list = $("#processes");
  const seen = new Set();
  for (const p of snapshot.processes) {
    seen.add(p.name);
    let root = list.querySelector(`[data-process="${CSS.escape(p.name)}"]`);
    if (!root) {
      root = card(p);
      list.append(root);
    }
    const h = series.get(p.name) || { units: [], failures: [] };
    const seconds = h.at ? (snapshot.at_ms - h.at) / 1000 : 0;
    const unitsRate = rate(p.units, h.lastUnits, seconds);
    const failuresRate = rate(p.failures, h.lastFailures, seconds);
    if (h.at) {
      h.units.push(unitsRate);
      h.failures.push(failuresRate);
      h.units.splice(0, h.units.length - HISTORY);
      h.failures.splice(0, h.failures.length - HISTORY);
    }
    Object.assign(h, { at: snapshot.at_ms, lastUnits: p.units, lastFailures: p.failures });
    series.set(p.name, h);

    const set = (field, text) => ($(`[data-field="${field}"]`, root).textContent = text);
    const output = $('[data-field="scale"]', root);
    output.value = p.scale;
    output.textContent = p.scale;
    set("busy", p.busy);
    set("idle", p.idle);
    set("units", p.units);
    set("failures", p.failures);
    set("units-rate", formatRate(unitsRate));
    set("failures-rate", formatRate(failuresRate));
    set("bounds", p.min !== null && p.min !== undefined ? `autoscale ${p.min}–${p.max}` : "");
    $('[data-field="busy-bar"]', root).style.width = `${p.scale ? (100 * p.busy) / p.scale : 0}%`;
    for (const button of root.querySelectorAll("[data-action^=scale]")) {
      button.disabled = p.min !== null && p.min !== undefined;
      button.title = button.disabled ? "autoscaled" : button.title;
    }
    draw($('[data-chart="units"]', root), h.units, "#2f6fde");
    draw($('[data-chart="failures"]', root), h.failures, "#d43d3d");
  }
  for (const root of list.querySelectorAll("[data-process]")) {
    if (!seen.has(root.dataset.process)) root.remove();
  }
}

async function showLetters(queue) {
  lastLetters = queue;
  const box = $("#letters");
  let letters;
  try {
    letters = await call("GET", `/queues/${encodeURIComponent(queue)}/dead-letters`);
  } catch (e) {
    showError(`dead letters of ${queue}: ${e.message}`);
    return;
  }
  const rows = letters.map((l) =>
    element("tr", { "data-letter": l.id },
      element("td", {}, l.id),
      element("td", { class: "num" }, l.attempts),
      element("td", {}, l.reason),
      element("td", {}, formatTime(l.failed_at_ms)),
      element("td", { class: "body", title: l.body }, l.body),
      element("td", {}, element("button", {
        "data-action": "replay-one",
        onclick: () => replay(queue, [l.id]),
      }, "Replay"))));
  box.replaceChildren(
    element("table", {},
      element("caption", {}, `dead letters of ${queue}`),
      element("thead", {}, element("tr", {},
        ...["id", "attempts", "reason", "failed", "body", ""].map((h) => element("th", {}, h)))),
      element("tbody", {}, ...(rows.length ? rows : [element("tr", {}, element("td", { colspan: 6 }, "none"))]))));
}

async function replay(queue, ids) {
  const query = ids ? `?ids=${ids.map(encodeURIComponent).join(",")}` : "";
  try {
    await call("POST", `/queues/${encodeURIComponent(queue)}/dead-letters/replay${query}`);
  } catch (e) {
    showError(`replay in ${queue}: ${e.message}`);
  }
  if (lastLetters === queue) showLetters(queue);
}

function queueRow(name) {
  const replayAll = element("button", { "data-action": "replay-all", onclick: () => replay(name, null) }, "Replay all");
  return element("tr", { "data-queue": name },
    element("td", {}, name),
    element("td", { "data-field": "workers" }),
    element("td", { class: "num", "data-field": "depth" }),
    element("td", { class: "num", "data-field": "oldest" }),
    element("td", { class: "num", "data-field": "dead-letters" }),
    element("td", {},
      element("button", { "data-action": "show-letters", onclick: () => showLetters(name) }, "Show"),
      " ",
      replayAll));
}

// Rows are kept and updated in place, so a button under the pointer stays
// the same button from one snapshot to the next.
function renderQueues(snapshot) {
  $("#queues-section").hidden = snapshot.queues.length === 0;
  const body = $("#queues tbody");
  const seen = new Set();
  for (const q of snapshot.queues) {
    seen.add(q.name);
    let row = body.querySelector(`[data-queue="${CSS.escape(q.name)}"]`);
    if (!row) {
      row = queueRow(q.name);
      body.append(row);
    }
    const set = (field, text) => ($(`[data-field="${field}"]`, row).textContent = text);
    set("workers", q.workers.join(", "));
    set("depth", q.depth ?? "–");
    set("oldest", formatAge(q.oldest_seconds));
    set("dead-letters", q.dead_letters ?? "–");
    $('[data-action="replay-all"]', row).disabled = !q.dead_letters;
  }
  for (const row of body.querySelectorAll("[data-queue]")) {
    if (!seen.has(row.dataset.queue)) row.remove();
  }
}

function renderEvents(selector, events, line) {
  const list = $(selector);
  if (!events.length) {
    list.replaceChildren(element("li", { class: "none" }, "none yet"));
    return;
  }
  list.replaceChildren(...events.slice().reverse().map((e) =>
    element("li", {}, element("time", {}, formatTime(e.at_ms)), ...line(e))));
}

function render(snapshot) {
  $("#formation").textContent = `${snapshot.formation} · wasmproc ${snapshot.version}`;
  renderProcesses(snapshot);
  renderQueues(snapshot);
  renderEvents("#decisions", snapshot.decisions, (d) => [
    `${d.process}: ${d.from} → ${d.to} `,
    element("span", { class: "detail" }, d.why),
  ]);
  renderEvents("#failures", snapshot.failures, (f) => [
    element("span", { class: "reason" }, f.reason),
    `${f.instance} `,
    element("span", { class: "detail" }, f.detail),
  ]);
}

function connect() {
  if (!session) {
    lockOut();
    return;
  }
  $("#dashboard").hidden = false;
  $("#logout").hidden = false;
  const live = $("#live");
  events = new EventSource(`/ui/events?session=${encodeURIComponent(session)}`);
  events.addEventListener("snapshot", (event) => {
    live.textContent = "live";
    live.classList.remove("off");
    render(JSON.parse(event.data));
  });
  events.addEventListener("error", () => {
    live.textContent = "reconnecting…";
    live.classList.add("off");
    // A stream that ends may mean the session did: ask once.
    call("GET", "/ps").catch(() => {});
  });
}

$("#logout").addEventListener("click", async () => {
  try {
    await call("POST", "/ui/logout");
  } catch {
    // logged out either way
  }
  lockOut();
});

connect();
