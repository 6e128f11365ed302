// sidetune's web page, several jobs compared (`/ui/compare?jobs=a,b`, ticked in the jobs list): their curves overlaid,
// one line a job, drawn as a job's page draws its own; their figures side by side, a row a job; a link to each model's
// evaluation. Followed while any of them runs. Loaded after ui.js, whose helpers it uses.
"use strict";

const jobLabel = (job) => job.spec?.name || job.id;
const swatch = (i) => el("span", { class: `swatch s${i % COLOURS}` });

function datasetOf(spec) {
  const d = spec.dataset;
  return d.id || (d.path ? d.path.split("/").filter(Boolean).slice(-2).join("/") : "");
}

function methodOf(job) {
  const chosen = job.metrics.auto?.selected;
  return chosen ? `auto: ${chosen}` : job.spec.method.name;
}

function testFigure(metrics) {
  const value = metrics.test_accuracy ?? metrics.test_map;
  return value === undefined ? "" : `${metrics.test_map !== undefined ? "mAP" : "acc"} ${fmt.number(value)}`;
}

function figuresRow(job, i) {
  if (job.missing) {
    return el("tr", { "data-job": job.id, class: "error" }, el("td", {}, job.id), el("td", { colspan: 12 }, "no such job for this key"));
  }
  const m = job.metrics;
  const model = job.model_id
    ? el("a", { href: `/ui/models/${encodeURIComponent(job.model_id)}#evaluation`, "data-model": job.model_id, title: job.model_id },
      "evaluation")
    : "";
  return el("tr", { "data-job": job.id, "data-status": job.status },
    el("td", { class: "nowrap" }, swatch(i), el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}` }, job.id)),
    el("td", {}, job.spec.name || ""),
    el("td", {}, el("span", { class: `status ${job.status}` }, job.status)),
    el("td", {}, methodOf(job)),
    el("td", {}, job.spec.backbone.name),
    el("td", {}, datasetOf(job.spec)),
    el("td", {}, m.epochs ?? ""),
    el("td", {}, m.best_epoch ?? ""),
    el("td", { "data-figure": "validation" }, validation(m)),
    el("td", { "data-figure": "test" }, testFigure(m)),
    el("td", {}, typeof m.trainable_params === "number" ? m.trainable_params.toLocaleString() : ""),
    el("td", {}, typeof m.train_seconds === "number" ? `${m.train_seconds.toFixed(1)} s` : ""),
    el("td", {}, model));
}

function overlay(jobs, followed) {
  const lines = (key) => jobs.map((job) => ({ name: jobLabel(job), job: job.id, points: curve(followed[job.id].epochs, key) }));
  const metric = selecting(Object.values(followed).flatMap((f) => f.epochs));
  chart($("#train-loss-chart"), "training loss", lines("train_loss"));
  chart($("#val-loss-chart"), "validation loss", lines("val_loss"));
  chart($("#score-chart"), metric === "val_map" ? "validation mAP" : "validation accuracy", lines(metric), [0, 1]);
}

async function readJob(id) {
  try {
    return await getJSON(`/jobs/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return { id, missing: true };
    throw error;
  }
}

async function comparePage() {
  const asked = (new URLSearchParams(location.search).get("jobs") || "").split(",").filter(Boolean);
  const ids = [...new Set(asked)].slice(0, MOST_COMPARED);
  $("#compare-empty").hidden = ids.length > 0;
  const followed = Object.fromEntries(ids.map((id) => [id, { after: 0, epochs: [] }]));
  const tick = async () => {
    const jobs = await Promise.all(ids.map(readJob));
    const found = jobs.filter((job) => !job.missing);
    for (const job of found) {
      const f = followed[job.id];
      f.after = await readEvents(job.id, f.after, (e) => isEpoch(e) && f.epochs.push(e.data));
    }
    $("#compare tbody").replaceChildren(...jobs.map(figuresRow));
    overlay(jobs, followed); // a job not found keeps its place: each line's colour is its row's
    if (found.some((job) => !TERMINAL.has(job.status))) setTimeout(() => tick().catch(failed), 2000);
    else document.body.dataset.loaded = "done";
  };
  await tick();
}

PAGES.compare = comparePage;
