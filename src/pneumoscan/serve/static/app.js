// pneumoscan web page: upload one X-ray to /v1/predict and show probability, decisions and the heatmap.
// Plain JS, no build step, no network access beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, heatmap: false, busy: false };

// One decimal; the extremes are shown as bounds, never as a certain 0% or 100%.
function fmtProb(p) {
  if (p >= 0.9995) return ">99.9%";
  if (p < 0.0005) return "<0.1%";
  return (100 * p).toFixed(1) + "%";
}
function fmtThr(t) { return t.toFixed(3).replace(/0+$/, "").replace(/\.$/, ""); }
function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function show(id, visible) { $(id).hidden = !visible; }

// API keys: asked for when the server answers 401, kept only in this tab's sessionStorage (gone when the tab
// closes; never in localStorage or a cookie), sent as a Bearer token on every API request.
const KEY_ITEM = "pneumoscan-api-key";
const keyWaiters = [];
function storedKey() { try { return sessionStorage.getItem(KEY_ITEM); } catch { return null; } }
function askForKey(message) {
  $("key-message").textContent = message;
  if (!state.model) $("model-info").textContent = "waiting for an API key";
  show("key-form", true);
  $("api-key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}
async function api(url, options = {}) {
  for (;;) {
    const key = storedKey();
    const headers = { ...(options.headers || {}), ...(key ? { Authorization: "Bearer " + key } : {}) };
    const res = await fetch(url, { ...options, headers });
    if (res.status !== 401) return res;
    let reason = "";
    try { reason = (await res.json()).error || ""; } catch { /* not JSON */ }
    sessionStorage.removeItem(KEY_ITEM);
    await askForKey(key ? `The key was refused (${reason}). Enter a valid key.` : "This server lets in only clients with a key.");
  }
}

async function loadModel() {
  try {
    const res = await api("/v1/model");
    if (!res.ok) throw new Error((await res.json()).error || res.statusText);
    const m = await res.json();
    state.model = m;
    state.heatmap = Boolean(m.heatmap);
    const info = $("model-info");
    info.textContent = "model ";
    info.append(el("strong", {}, m.name), " ", el("code", { title: "sha256 " + m.sha256 }, m.sha256.slice(0, 12)));
    if (m.max_upload_bytes) $("max-size").textContent = Math.round(m.max_upload_bytes / 1048576) + " MiB";
    $("footer-version").textContent = `pneumoscan · ${m.arch} · ${m.backend} backend`;
  } catch (err) {
    $("model-info").textContent = "model unavailable: " + err.message;
  }
}

// Gauge geometry: a half circle centred at (120, 120), radius 90; p = 0 on the left, p = 1 on the right.
function gaugePoint(p, r = 90) {
  const a = Math.PI * (1 - Math.min(Math.max(p, 0), 1));
  return [120 + r * Math.cos(a), 120 - r * Math.sin(a)];
}

function drawGauge(p, thresholds) {
  const [x, y] = gaugePoint(p);
  const value = $("gauge-value");
  value.setAttribute("d", p > 0.002 ? `M 30 120 A 90 90 0 0 1 ${x.toFixed(2)} ${y.toFixed(2)}` : "M 30 120 L 30 120");
  value.classList.remove("pos", "mid", "neg");
  const positives = Object.values(thresholds).filter((t) => p >= t).length;
  value.classList.add(positives === 0 ? "neg" : positives === Object.keys(thresholds).length ? "pos" : "mid");
  const ticks = $("gauge-ticks");
  ticks.replaceChildren();
  for (const [name, t] of Object.entries(thresholds)) {
    const [x1, y1] = gaugePoint(t, 76);
    const [x2, y2] = gaugePoint(t, 104);
    const [lx, ly] = gaugePoint(t, 116);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "line");
    for (const [k, v] of Object.entries({ x1, y1, x2, y2, class: "tick" })) line.setAttribute(k, v);
    const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
    for (const [k, v] of Object.entries({ x: lx, y: ly + 4, class: "tick-label", "text-anchor": "middle" })) {
      label.setAttribute(k, v);
    }
    label.textContent = name[0].toUpperCase();
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = `${name} threshold ${fmtThr(t)}`;
    line.append(title);
    ticks.append(line, label);
  }
}

function resetResult() {
  show("result-empty", false);
  show("result-error", false);
  show("result", false);
  show("notxray", false);
  show("status-chip", false);
}

function showError(message) {
  resetResult();
  const box = $("result-error");
  box.replaceChildren(el("strong", {}, "Could not screen this file. "), message);
  show("result-error", true);
}

function render(r) {
  resetResult();
  const chip = $("status-chip");
  if (r.status !== "ok") {
    chip.textContent = "not assessed";
    chip.className = "chip warn";
    show("status-chip", true);
    const box = $("notxray");
    box.replaceChildren(el("b", {}, "No probability reported"), r.message);
    show("notxray", true);
    return;
  }
  const positive = r.decision !== (state.model ? state.model.classes[0] : "NORMAL");
  chip.textContent = positive ? "refer for review" : "no pneumonia flagged";
  chip.className = "chip " + (positive ? "pos" : "neg");
  show("status-chip", true);
  $("probability").textContent = fmtProb(r.probability);
  drawGauge(r.probability, r.thresholds);

  const rows = $("decisions");
  rows.replaceChildren();
  for (const [name, t] of Object.entries(r.thresholds)) {
    const decision = r.decisions[name];
    const pos = decision !== (state.model ? state.model.classes[0] : "NORMAL");
    const tr = el("tr", { "data-operating-point": name });
    const op = el("td");
    op.append(el("span", { class: "marker", "aria-hidden": "true" }, name[0].toUpperCase()), name[0].toUpperCase() + name.slice(1));
    const verdict = el("td");
    verdict.append(el("span", { class: "verdict " + (pos ? "pos" : "neg") }, decision));
    tr.append(op, el("td", { class: "num" }, fmtThr(t)), verdict);
    rows.append(tr);
  }

  const details = $("details");
  details.replaceChildren();
  const add = (k, v) => details.append(el("dt", {}, k), el("dd", {}, v));
  add("File", r.filename);
  add("Chest X-ray check", r.guard_score === null ? "passed" : `passed (out-of-distribution score ${r.guard_score.toFixed(1)})`);
  add("Time", Math.round(r.timing_ms.total) + " ms");
  add("Model", `${r.model.name} · ${r.model.sha256.slice(0, 12)}`);
  show("result", true);
}

async function screen(file) {
  if (!file || state.busy) return;
  state.busy = true;
  show("dropzone", false);
  show("viewer", true);
  show("busy", true);
  show("choose-another", false);
  $("caption").textContent = file.name;
  const xray = $("xray");
  const heat = $("heatmap");
  heat.hidden = true;
  show("heatmap-tools", false);
  show("heatmap-note", false);
  // Show the file at once where the browser can decode it; the server's preview replaces it (DICOM too).
  if (/^image\/(jpeg|png)$/.test(file.type)) {
    if (xray.dataset.url) URL.revokeObjectURL(xray.dataset.url);
    xray.dataset.url = URL.createObjectURL(file);
    xray.src = xray.dataset.url;
  } else {
    xray.removeAttribute("src");
  }
  const form = new FormData();
  form.append("file", file, file.name);
  const query = new URLSearchParams({ threshold: "screening", preview: "true", heatmap: String(state.heatmap) });
  try {
    const res = await api("/v1/predict?" + query, { method: "POST", body: form });
    let body;
    try { body = await res.json(); } catch { body = { error: `${res.status} ${res.statusText}` }; }
    if (!res.ok) {
      showError(body.error || `${res.status} ${res.statusText}`);
      backToDropzone();
      return;
    }
    if (body.image_png_base64) xray.src = "data:image/png;base64," + body.image_png_base64;
    if (body.heatmap_png_base64) {
      heat.src = "data:image/png;base64," + body.heatmap_png_base64;
      heat.hidden = false;
      show("heatmap-tools", true);
    } else if (body.heatmap_reason) {
      // the server's one heatmap rule: drawn for PNEUMONIA decisions only (it says why not)
      $("heatmap-note").textContent = body.heatmap_reason;
      show("heatmap-note", true);
    }
    render(body);
    show("choose-another", true);
  } catch (err) {
    showError("the server could not be reached (" + err.message + ")");
    backToDropzone();
  } finally {
    state.busy = false;
    show("busy", false);
  }
}

// After a refusal there is no picture worth keeping: offer the drop zone again.
function backToDropzone() {
  show("viewer", false);
  show("choose-another", false);
  show("dropzone", true);
}

function setup() {
  const input = $("file-input");
  input.addEventListener("change", () => { screen(input.files[0]); input.value = ""; });
  $("choose-another").addEventListener("click", () => input.click());
  const opacity = $("opacity");
  const applyOpacity = () => {
    $("heatmap").style.opacity = opacity.value / 100;
    $("opacity-value").textContent = opacity.value + "%";
  };
  opacity.addEventListener("input", applyOpacity);
  applyOpacity();
  // Drop anywhere on the page; never let the browser navigate away to the dropped file.
  const zone = $("dropzone");
  for (const type of ["dragenter", "dragover"]) {
    window.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const type of ["dragleave", "drop"]) {
    window.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("dragging"); });
  }
  window.addEventListener("drop", (e) => {
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) screen(file);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("api-key").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY_ITEM, value);
    $("api-key").value = "";
    show("key-form", false);
    for (const resolve of keyWaiters.splice(0)) resolve();
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
