// sidetune's web page, a model's page: its summary, a predict form, its evaluation (metrics, per class, confusion
// matrix, plots) and its exports. Loaded after ui.js, whose helpers it uses.
"use strict";

// ---- a model: summary, predict, evaluation, plots, export -------------------------------------------------------
// the five highest scores (the request asks for no more: a model may have thousands of classes)
function scoreBars(scores) {
  const top = Object.entries(scores).sort((a, b) => b[1] - a[1]).slice(0, 5);
  return el("div", { class: "scores" }, ...top.map(([name, value]) => {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.round(value * 100)}%`;
    return el("div", { class: "score", "data-class": name, "data-score": value },
      el("span", { class: "name" }, name), el("span", { class: "track" }, bar), el("span", { class: "value" }, value.toFixed(4)));
  }));
}

function setUpPredict(id) {
  const form = $("#predict-form");
  const input = $("#predict-files");
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    input.files = event.dataTransfer.files;
    form.requestSubmit();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const files = [...input.files];
    if (!files.length) return showMessage("Choose or drop image files first.", "info");
    const body = new FormData();
    for (const file of files) body.append("files", file, file.name);
    try {
      const result = await (await api(`/v1/models/${encodeURIComponent(id)}:predict-files?top_k=5`, { method: "POST", body })).json();
      $("#predictions tbody").replaceChildren(...result.predictions.map((p, i) => el("tr", { "data-file": files[i].name, "data-label": p.label },
        el("td", {}, files[i].name), el("td", { class: "label" }, p.labels ? p.labels.join(", ") || "(none)" : p.label),
        el("td", {}, scoreBars(p.scores)))));
      $("#predictions").hidden = false;
      $("#message").hidden = true;
    } catch (error) {
      failed(error);
    }
  });
}

// the report's per-class rows come in pages (GET /models/{id}/evaluation?offset=&limit=): one page is shown at a time
const CLASS_PAGE = 100;

function perClassPage(report) {
  $("#per-class tbody").replaceChildren(...report.per_class.map((c) => el("tr", { "data-class": c.class }, el("td", {}, c.class),
    el("td", {}, fmt.number(c.precision, 3)), el("td", {}, fmt.number(c.recall, 3)), el("td", {}, fmt.number(c.f1, 3)),
    el("td", {}, c.support))));
  const total = report.total ?? report.per_class.length;
  const offset = report.offset ?? 0;
  $("#per-class-pager").hidden = offset === 0 && !report.has_more;
  $("#per-class-range").textContent = `classes ${offset + 1}-${offset + report.per_class.length} of ${total}`;
  $("#per-class-prev").disabled = offset === 0;
  $("#per-class-next").disabled = !report.has_more;
  $("#per-class-pager").dataset.offset = offset;
}

function setUpPager(id) {
  const show = async (offset) => {
    const query = `offset=${Math.max(0, offset)}&limit=${CLASS_PAGE}`;
    perClassPage(await getJSON(`/models/${encodeURIComponent(id)}/evaluation?${query}`));
  };
  const at = () => Number($("#per-class-pager").dataset.offset || 0);
  $("#per-class-prev").addEventListener("click", () => show(at() - CLASS_PAGE).catch(failed));
  $("#per-class-next").addEventListener("click", () => show(at() + CLASS_PAGE).catch(failed));
}

async function evaluationSection(id, model) {
  let report;
  try {
    report = await getJSON(`/models/${encodeURIComponent(id)}/evaluation?limit=${CLASS_PAGE}`);
  } catch (error) {
    if (error.status !== 404) throw error;
    $("#evaluation-split").textContent = "This model has no evaluation report.";
    return;
  }
  const split = report.split === "test" ? "the held-out test split" : "the validation split (no test split: optimistic, it selected the model)";
  $("#evaluation-split").textContent = `Evaluated on ${split}, ${report.images} images.`;
  $("#evaluation-metrics tbody").replaceChildren(...Object.entries(report.metrics).map(([k, v]) =>
    el("tr", { "data-metric": k }, el("th", {}, k.replaceAll("_", " ")), el("td", {}, fmt.number(v)))));
  perClassPage(report);
  setUpPager(id);
  if (!model.multi_label && report.confusion_matrix && !report.has_more && report.offset === 0) {
    const most = Math.max(1, ...report.confusion_matrix.flat());
    const cell = (v) => {
      const td = el("td", { title: String(v) }, v);
      td.style.backgroundColor = `rgba(37, 99, 235, ${(v / most) * 0.85})`;
      if (v / most > 0.5) td.classList.add("dark");
      return td;
    };
    $("#confusion").replaceChildren(
      el("tr", {}, el("th", {}, "true \\ predicted"), ...report.classes.map((c) => el("th", {}, c))),
      ...report.confusion_matrix.map((row, i) => el("tr", {}, el("th", {}, report.classes[i]), ...row.map(cell))));
  } else if (!model.multi_label) {
    // too many classes for a table of every cell: the plot below summarises the matrix, the report holds it whole
    $("#confusion-note").textContent = `${report.total} classes: the plot below summarises the matrix; the most frequent confusions:`;
    $("#confusion-note").hidden = false;
    $("#top-confusions tbody").replaceChildren(...(report.top_confusions || []).map((c) => el("tr", {},
      el("td", {}, c.true), el("td", {}, c.predicted), el("td", {}, c.count))));
    $("#top-confusions").hidden = false;
  }
  for (const name of model.plots || []) {
    const blob = await (await api(`/models/${encodeURIComponent(id)}/plots/${encodeURIComponent(name)}.png`)).blob();
    $("#plots").append(el("figure", {}, el("img", { src: URL.createObjectURL(blob), alt: `${name} plot`, "data-plot": name }),
      el("figcaption", {}, name)));
  }
}

function setUpExport(id) {
  for (const button of document.querySelectorAll("#export button")) {
    button.addEventListener("click", async () => {
      const format = button.dataset.format;
      $("#export-status").textContent = `Exporting as ${format}...`;
      try {
        const response = await api(`/models/${encodeURIComponent(id)}/export?format=${format}`);
        const name = /filename="?([^";]+)"?/.exec(response.headers.get("content-disposition") || "")?.[1] || `${id}.${format}`;
        const link = el("a", { href: URL.createObjectURL(await response.blob()), download: name });
        link.click();
        $("#export-status").textContent = `Downloaded ${name}.`;
      } catch (error) {
        $("#export-status").textContent = `${format}: ${error.message}`;
      }
    });
  }
}

async function modelPage() {
  const id = page.modelId;
  setUpPredict(id);
  setUpExport(id);
  const model = await getJSON(`/models/${encodeURIComponent(id)}`);
  summary([
    ["method", `${model.method} (${model.mode})`],
    ["backbone", model.backbone],
    ["job", el("a", { href: `/ui/jobs/${encodeURIComponent(model.job_id)}` }, model.job_id)],
    ["classes", model.classes.length <= 20 ? model.classes.join(", ") : `${model.classes.length}: ${model.classes.slice(0, 20).join(", ")}, ...`],
    ["validation", validation(model.metrics)],
    ["created", fmt.time(model.created_at)],
    ["input", model.video ? `videos (${model.video.num_frames} frames a clip)` : "images"],
  ]);
  await evaluationSection(id, model);
  document.body.dataset.loaded = "done";
}

PAGES.model = modelPage;
