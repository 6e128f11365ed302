// sidetune's web page, the new-job form: a dataset (an archive uploaded from here, one uploaded before, or a path on
// the server), the backbone and the method from GET /catalog, the plan of POST /jobs?dry_run=true shown before the
// job is submitted by POST /jobs, then the job's page. The API's errors are shown beside the form as it sent them.
// Loaded after ui.js, whose helpers (api, el, fmt, summary) it uses.
"use strict";

const chosenSource = () => document.querySelector('input[name="source"]:checked').value;
const planned = { spec: null }; // the spec (as JSON) of the plan shown: submitting needs a plan of the form as it is

function showSource() {
  for (const part of document.querySelectorAll(".source")) part.hidden = part.dataset.source !== chosenSource();
}

function formStatus(text) {
  $("#form-status").textContent = text;
}

// beside the form, not in the page's banner: the API's code and message, as it answered
function formError(error) {
  const box = $("#form-error");
  if (error === null) {
    box.hidden = true;
    return;
  }
  if (error instanceof ApiError && error.status === 401) return; // the key form is shown instead (api())
  box.replaceChildren(error instanceof ApiError ? el("strong", {}, `HTTP ${error.status} ${error.code}: `) : "", error.message);
  box.dataset.status = error instanceof ApiError ? error.status : "";
  box.hidden = false;
  formStatus("");
}

function datasetOption(d) {
  return el("option", { value: d.id }, `${d.name || d.id} (${d.id}: ${d.num_images} images, ${d.classes.length} classes)`);
}

async function fillChoices() {
  const [catalog, datasets] = await Promise.all([getJSON("/catalog"), getJSON("/datasets?limit=200")]);
  $("#backbones").replaceChildren(...catalog.backbones.map((name) => el("option", { value: name })));
  $("#backbone").value = catalog.default_backbone;
  const described = Object.fromEntries(catalog.methods.map((m) => [m.name, m]));
  $("#method").replaceChildren(...catalog.methods.map((m) => el("option", { value: m.name }, m.name)));
  $("#method").value = catalog.default_method;
  const describe = () => {
    const m = described[$("#method").value];
    $("#method-description").textContent = `${m.description} Trains ${m.kind === "side" ? "beside the frozen backbone" : "through the backbone"}; modes: ${m.modes.join(", ")}.`;
  };
  $("#method").addEventListener("change", describe);
  describe();
  $("#dataset-id").replaceChildren(...datasets.data.map(datasetOption));
  $("#datasets-none").hidden = datasets.data.length > 0;
}

function jobSpec() {
  const source = chosenSource();
  // an archive not uploaded yet has no id: its name only tells a plan made before it apart
  const dataset = source === "path" ? { path: $("#dataset-path").value.trim() }
    : source === "uploaded" ? { id: $("#dataset-id").value } : { archive: $("#dataset-file").value };
  const spec = {
    dataset,
    backbone: { name: $("#backbone").value.trim(), pretrained: $("#pretrained").checked },
    method: { name: $("#method").value },
  };
  if ($("#epochs").value.trim()) spec.training = { epochs: Number($("#epochs").value) };
  if ($("#job-name").value.trim()) spec.name = $("#job-name").value.trim();
  return spec;
}

// the archive chosen goes up once: the form then names the dataset it became
async function upload() {
  const file = $("#dataset-file").files[0];
  if (!file) throw new Error("Choose a dataset archive to upload (zip or tar), or pick another source.");
  formStatus(`Uploading ${file.name}...`);
  const body = new FormData();
  body.append("file", file, file.name);
  const dataset = await (await api("/datasets", { method: "POST", body })).json();
  $("#dataset-id").prepend(datasetOption(dataset));
  $("#dataset-id").value = dataset.id;
  $("#datasets-none").hidden = true;
  document.querySelector('input[name="source"][value="uploaded"]').checked = true;
  $("#dataset-file").value = "";
  showSource();
  return dataset;
}

const duration = (s) => (s < 60 ? `${s.toFixed(1)} s` : s < 3600 ? `${(s / 60).toFixed(1)} min` : `${(s / 3600).toFixed(1)} h`);

function showPlan(plan) {
  const cache = plan.expected_cache_bytes ?? plan.cache_bytes;
  const fits = plan.fits === null ? "known once extracted" : !plan.fits ? "no" : plan.evict_entries
    ? `yes, after evicting ${plan.evict_entries} older entries (${fmt.bytes(plan.evict_bytes)})` : "yes";
  const features = plan.train_feature_bytes;
  summary([
    ["images", `${plan.images}: ${plan.train_images} training, ${plan.val_images} validation, ${plan.test_images} test`],
    ["classes", plan.classes],
    ["method", `${plan.method} (mode ${plan.mode})${plan.configurations > 1 ? `, ${plan.configurations} configurations` : ""}`],
    ["backbone", plan.backbone],
    ["feature cache", !plan.needs_cache ? "none: trains on images" : cache === null ? "unknown (backbone outside the planner's table)"
      : `${fmt.bytes(cache)}, ${plan.cached_layers.length} layers x ${plan.cached_tokens} tokens an image; fits: ${fits}`],
    ["extraction time", plan.extraction_s === null ? "" : `${duration(plan.extraction_s)} (at ${plan.assumed_tflops} TFLOPS)`],
    ["training memory", features === null ? "" : `${fmt.bytes(features)} of features, ${plan.train_in_memory ? "held in memory" : "streamed from the cache"} (budget ${fmt.bytes(plan.train_memory_budget_bytes)})`],
    ["device memory", plan.backprop_memory_bytes === null ? "" : `${fmt.bytes(plan.backprop_memory_bytes)} a training step${plan.memory_fits === false ? ": over the device's memory" : ""}`],
  ], "#plan-summary");
  $("#plan-message").textContent = plan.message;
  $("#plan-notes").replaceChildren(...plan.notes.map((n) => el("li", {}, n)));
  $("#plan").hidden = false;
  $("#plan").classList.remove("stale");
}

async function planJob() {
  formError(null);
  $("#submit-button").disabled = true;
  try {
    if (chosenSource() === "upload") {
      const dataset = await upload();
      formStatus(`Uploaded as ${dataset.id}. Planning...`);
    } else {
      formStatus("Planning: the dry run reads the dataset...");
    }
    const spec = jobSpec();
    const plan = await (await api("/jobs?dry_run=true", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(spec) })).json();
    showPlan(plan);
    planned.spec = JSON.stringify(spec);
    $("#submit-button").disabled = false;
    formStatus("Planned: submit to start the job.");
    document.body.dataset.planned = "yes";
  } catch (error) {
    formError(error);
  }
}

async function submitJob(event) {
  event.preventDefault();
  const spec = JSON.stringify(jobSpec());
  if (spec !== planned.spec) return formError(new Error("The form changed since its plan: plan it again first."));
  formError(null);
  $("#submit-button").disabled = true;
  formStatus("Submitting...");
  try {
    const job = await (await api("/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: spec })).json();
    location.href = `/ui/jobs/${encodeURIComponent(job.id)}`;
  } catch (error) {
    formError(error);
    $("#submit-button").disabled = false;
  }
}

async function newJobPage() {
  const formChanged = () => {
    if (planned.spec === null) return;
    $("#submit-button").disabled = JSON.stringify(jobSpec()) !== planned.spec;
    $("#plan").classList.toggle("stale", $("#submit-button").disabled);
  };
  for (const radio of document.querySelectorAll('input[name="source"]')) radio.addEventListener("change", showSource);
  $("#job-form").addEventListener("input", formChanged);
  $("#job-form").addEventListener("change", formChanged);
  $("#plan-button").addEventListener("click", planJob);
  $("#job-form").addEventListener("submit", submitJob);
  showSource();
  await fillChoices();
  document.body.dataset.loaded = "done";
}

PAGES.new_job = newJobPage;
