// A job's dataset on sidetune's web page (ui.js uses it; loaded first): its kind (the format the plan step read it in,
// else the one the spec names or its location implies) and where it lives (a server path, an upload, a Hugging Face
// Hub id, an object-store URL), as text only.
"use strict";

const KINDS = { imagefolder: "ImageFolder", csv: "CSV manifest", jsonl: "JSONL manifest", webdataset: "WebDataset shards", huggingface: "Hugging Face dataset" };

// the format `auto` picks from the location alone, until the plan step has read it (job.dataset_format)
function guessedFormat(location) {
  const plain = location.replace(/[?#].*$/, "").toLowerCase();
  if (plain.startsWith("hf://") || plain.endsWith(".parquet")) return "huggingface";
  if (plain.endsWith(".tar")) return "webdataset";
  if (plain.endsWith(".csv")) return "csv";
  if (plain.endsWith(".jsonl")) return "jsonl";
  return null;
}

// where: a server path, an upload, a Hub id or an object-store URL; never a URL's user, password or query (the spec
// refuses them, and the page would not show them even so)
function place(location) {
  const url = /^([a-z][a-z0-9+.-]*):\/\/(?:[^/@]*@)?([^?#]*)/i.exec(location);
  if (!url) return ["server", location];
  const [, scheme, rest] = url;
  if (scheme.toLowerCase() === "hf") return ["Hub", rest];
  if (scheme.toLowerCase() === "file") return ["server", rest];
  return ["object store", `${scheme.toLowerCase()}://${rest}`];
}

function dataSource(job, which = "train") {
  const d = job.spec.dataset || {};
  const id = which === "train" ? d.id : d.test_id;
  const location = which === "train" ? d.path : d.test;
  if (!id && !location) return null;
  const format = which === "train" ? job.dataset_format || (d.format !== "auto" ? d.format : null) : null;
  const kind = KINDS[format || guessedFormat(location || "")] || (id ? "upload" : "folder");
  const [where, shown] = id ? ["upload", id] : place(location);
  return { kind, where, location: shown };
}

function sourceText(source) {
  return source ? `${source.kind} · ${source.where}: ${source.location}` : "";
}

// the jobs list's cell: the kind and the location's last part, the whole in its title
function sourceCell(job) {
  const source = dataSource(job);
  if (!source) return "";
  const name = source.location.replace(/\/+$/, "").split("/").pop();
  const span = document.createElement("span");
  span.title = sourceText(source);
  span.dataset.kind = source.kind;
  span.textContent = `${source.kind}: ${name}`;
  return span;
}
