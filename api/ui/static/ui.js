// sidetune's web page: fills the frame the server rendered (api/routes/ui.py) from the public API, with the API key
// this browser session holds. Everything shown comes from the API as this key sees it; text goes into the page as
// text (textContent), never as markup.
"use strict";

const KEY = "sidetune.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (selector) => document.querySelector(selector);
const page = document.body.dataset;

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined).map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

const fmt = {
  time: (t) => (t ? new Date(t * 1000).toLocaleString() : ""),
  number: (v, digits = 4) => (typeof v === "number" ? v.toFixed(digits) : ""),
  bytes: (n) => (n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(1)} GB` : n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MB` : `${Math.ceil(n / 1024)} KB`),
};

function validation(metrics) {
  const value = metrics.val_accuracy ?? metrics.val_map;
  return value === undefined ? "" : `${metrics.val_map !== undefined ? "mAP" : "acc"} ${fmt.number(value)}`;
}

// ---- the API, with the session's key -------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (response.ok) return response;
  let code = "http_error";
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    code = body.error.code;
    message = body.error.message;
  } catch (_) {
    /* not our JSON error: keep the status */
  }
  if (response.status === 401) askForKey(`The API refused this key (HTTP 401): ${message}`);
  throw new ApiError(response.status, code, message);
}

const getJSON = async (path) => (await api(path)).json();

function showMessage(text, kind = "error") {
  const box = $("#message");
  box.textContent = text;
  box.className = `message ${kind}`;
  box.hidden = false;
}

function failed(error) {
  if (!(error instanceof ApiError && error.status === 401)) showMessage(error.message);
}

function askForKey(reason) {
  sessionStorage.removeItem(KEY);
  $("#key-status").replaceChildren();
  showMessage(reason);
  $("#key-form").hidden = false;
  $("#content").hidden = true; // nothing shown without a key the API accepts
  $("#key-input").focus();
}

function setUpKey() {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("#key-input").value.trim());
    location.reload(); // a fresh page: nothing another key loaded stays on it
  });
  if (sessionStorage.getItem(KEY)) {
    const forget = el("button", { type: "button", class: "link" }, "forget key");
    forget.addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      location.reload();
    });
    $("#key-status").replaceChildren("key set · ", forget);
  }
}

// ---- lists ---------------------------------------------------------------------------------------------------
function progressBar(job) {
  const p = job.progress || {};
  const fraction = TERMINAL.has(job.status) ? (job.status === "succeeded" ? 1 : 0) : (p.done || 0) / Math.max(p.total || 1, 1);
  const bar = el("div", { class: "bar" });
  bar.style.width = `${Math.round(fraction * 100)}%`;
  const text = p.stage && !TERMINAL.has(job.status) ? `${p.stage} ${p.done}/${p.total}` : "";
  return el("div", { class: `progress ${job.status}` }, bar, el("span", { class: "label" }, text));
}

function fillTable(selector, rows, emptySelector) {
  $(`${selector} tbody`).replaceChildren(...rows);
  $(emptySelector).hidden = rows.length > 0;
}

// the jobs ticked for comparison, kept while the list refreshes under them
const chosen = new Set();
const MOST_COMPARED = 6; // the charts' colours

function setUpCompare() {
  const button = $("#compare-button");
  button.addEventListener("click", () => {
    location.href = `/ui/compare?jobs=${[...chosen].map(encodeURIComponent).join(",")}`;
  });
  $("#jobs").addEventListener("change", (event) => {
    const box = event.target;
    if (!box.matches("input[data-compare]")) return;
    if (box.checked) chosen.add(box.dataset.compare);
    else chosen.delete(box.dataset.compare);
    button.disabled = chosen.size < 2 || chosen.size > MOST_COMPARED;
    button.textContent = chosen.size > MOST_COMPARED ? `Compare at most ${MOST_COMPARED}` : `Compare selected (${chosen.size})`;
  });
}

function compareBox(job) {
  const box = el("input", { type: "checkbox", "data-compare": job.id, "aria-label": `compare ${job.id}` });
  box.checked = chosen.has(job.id);
  return box;
}

async function jobsPage() {
  setUpCompare();
  await jobsList();
}

async function jobsList() {
  const jobs = (await getJSON("/jobs?limit=100")).data;
  fillTable("#jobs", jobs.map((job) => el("tr", { "data-job": job.id, "data-status": job.status },
    el("td", {}, compareBox(job)),
    el("td", {}, el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}` }, job.id)),
    el("td", {}, el("span", { class: `status ${job.status}` }, job.status)),
    el("td", {}, progressBar(job)),
    el("td", { class: "source" }, sourceCell(job)),
    el("td", {}, job.spec.method.name),
    el("td", {}, job.spec.backbone.name),
    el("td", {}, validation(job.metrics)),
    el("td", {}, job.model_id ? el("a", { href: `/ui/models/${encodeURIComponent(job.model_id)}` }, job.model_id) : ""),
    el("td", {}, fmt.time(job.created_at)),
  )), "#jobs-empty");
  setTimeout(() => jobsList().catch(failed), jobs.some((job) => !TERMINAL.has(job.status)) ? 1500 : 5000);
}

async function modelsPage() {
  const models = (await getJSON("/models?limit=200")).data;
  fillTable("#models", models.map((m) => el("tr", { "data-model": m.id },
    el("td", {}, el("a", { href: `/ui/models/${encodeURIComponent(m.id)}` }, m.id)),
    el("td", {}, m.method),
    el("td", {}, m.backbone),
    el("td", {}, m.classes.length),
    el("td", {}, validation(m.metrics)),
    el("td", {}, fmt.number(m.metrics.test_accuracy ?? m.metrics.test_map)),
    el("td", {}, fmt.time(m.created_at)),
  )), "#models-empty");
}

async function datasetsPage() {
  const datasets = (await getJSON("/datasets?limit=200")).data;
  fillTable("#datasets", datasets.map((d) => el("tr", { "data-dataset": d.id },
    el("td", {}, el("code", {}, d.id)), el("td", {}, d.name || ""), el("td", {}, d.format),
    el("td", {}, d.num_images), el("td", {}, d.classes.length), el("td", {}, fmt.bytes(d.size_bytes)),
    el("td", {}, fmt.time(d.created_at)),
  )), "#datasets-empty");
}

// ---- a job: summary, progress, curves, events -----------------------------------------------------------------
function summary(pairs, target = "#summary") {
  $(target).replaceChildren(...pairs.filter(([, v]) => v !== "" && v !== null && v !== undefined)
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-field": k }, v)]));
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// One line per series over epochs: [{name, points: [[epoch, value], ...], job (optional: the job it is of)}]
const COLOURS = 6;
function chart(target, title, series, fixed) {
  const W = 420, H = 240, left = 48, right = 12, top = 28, bottom = 34;
  const points = series.flatMap((s) => s.points);
  target.replaceChildren(svg("text", { x: left, y: 16, class: "title" }, title));
  if (!points.length) return;
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  let [y0, y1] = fixed || [Math.min(...ys), Math.max(...ys)];
  if (y1 - y0 < 1e-9) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const X = (x) => left + ((x - x0) / (x1 - x0)) * (W - left - right);
  const Y = (y) => H - bottom - ((y - y0) / (y1 - y0)) * (H - top - bottom);
  target.append(svg("line", { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, class: "axis" }),
    svg("line", { x1: left, y1: top, x2: left, y2: H - bottom, class: "axis" }),
    svg("text", { x: left - 6, y: Y(y1) + 4, class: "tick end" }, fmt.number(y1, 3)),
    svg("text", { x: left - 6, y: Y(y0) + 4, class: "tick end" }, fmt.number(y0, 3)),
    svg("text", { x: X(x0), y: H - bottom + 16, class: "tick" }, x0),
    svg("text", { x: X(x1), y: H - bottom + 16, class: "tick end" }, x1),
    svg("text", { x: (W + left) / 2, y: H - 4, class: "tick middle" }, "epoch"));
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const path = s.points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ");
    const colour = `s${i % COLOURS}`;
    const line = svg("polyline", { points: path, class: `series ${colour}`, "data-series": s.name });
    if (s.job) line.dataset.job = s.job;
    target.append(line);
    for (const [x, y] of s.points) target.append(svg("circle", { cx: X(x), cy: Y(y), r: 3, class: `point ${colour}` }));
    target.append(svg("text", { x: W - right - 4, y: top + 14 * i, class: `legend ${colour} end` }, s.name));
  });
}

// a job's curves are its `metrics` events that name an epoch
const isEpoch = (e) => e.type === "metrics" && e.data && typeof e.data.epoch === "number";
const selecting = (epochs) => (epochs.some((e) => e.val_map !== undefined) ? "val_map" : "val_accuracy");
const curve = (epochs, key) => epochs.filter((e) => typeof e[key] === "number").map((e) => [e.epoch, e[key]]);

function curves(epochs) {
  const metric = selecting(epochs);
  chart($("#loss-chart"), "loss", [{ name: "train loss", points: curve(epochs, "train_loss") },
    { name: "validation loss", points: curve(epochs, "val_loss") }]);
  chart($("#score-chart"), metric === "val_map" ? "validation mAP" : "validation accuracy",
    [{ name: metric.replace("_", " "), points: curve(epochs, metric) }], [0, 1]);
  $("#curves-empty").hidden = epochs.length > 0;
}

// a job's events after `after`, every page of them (GET /jobs/{id}/events), each given to `take`; returns the last seq
async function readEvents(id, after, take) {
  let more = true;
  while (more) {
    const page_ = await getJSON(`/jobs/${encodeURIComponent(id)}/events?after=${after}&limit=500`);
    for (const e of page_.data) {
      after = e.seq;
      take(e);
    }
    more = page_.has_more;
  }
  return after;
}

async function jobPage() {
  const id = page.jobId;
  const state = { after: 0, epochs: [] };
  const tick = async () => {
    const job = await getJSON(`/jobs/${encodeURIComponent(id)}`);
    document.body.dataset.status = job.status;
    summary([
      ["status", el("span", { class: `status ${job.status}` }, job.status)],
      ["method", `${job.spec.method.name} (${job.spec.execution?.mode || "default mode"})`],
      ["backbone", job.spec.backbone.name],
      ["dataset", sourceText(dataSource(job))],
      ["test set", sourceText(dataSource(job, "test"))],
      ["created", fmt.time(job.created_at)],
      ["finished", fmt.time(job.finished_at)],
      ["validation", validation(job.metrics)],
      ["error", job.error ? `${job.error.code}: ${job.error.message}` : ""],
      ["model", job.model_id ? el("a", { href: `/ui/models/${encodeURIComponent(job.model_id)}`, id: "model-link" }, job.model_id) : ""],
    ]);
    $("#progress").replaceWith(Object.assign(progressBar(job), { id: "progress" }));
    state.after = await readEvents(id, state.after, (e) => {
      if (isEpoch(e)) state.epochs.push(e.data);
      $("#events tbody").append(el("tr", { class: e.level, "data-seq": e.seq }, el("td", {}, e.seq),
        el("td", {}, fmt.time(e.created_at)), el("td", {}, e.level), el("td", {}, e.message)));
    });
    curves(state.epochs);
    if (!TERMINAL.has(job.status)) setTimeout(() => tick().catch(failed), 1000);
    else document.body.dataset.loaded = "done"; // every event read after the job ended
  };
  await tick();
}

// ---- start -----------------------------------------------------------------------------------------------------
// the other pages' scripts (model.js, new_job.js, compare.js) add theirs: they run after this one, before the DOM is
// loaded
const PAGES = { jobs: jobsPage, job: jobPage, models: modelsPage, datasets: datasetsPage };

document.addEventListener("DOMContentLoaded", () => {
  setUpKey();
  if (page.keys === "required" && !sessionStorage.getItem(KEY)) {
    askForKey("This server needs an API key: enter yours to see its jobs and models.");
    return;
  }
  PAGES[page.page]().catch(failed);
});
