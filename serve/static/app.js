// Uploads one file to /api/predict and renders the JSON; every value is inserted as text, never as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
let last = null;

function fmt(x, d = 3) { return x === null || x === undefined ? "n/a" : Number(x).toFixed(d); }

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function showSaliency(name) {
  $("saliency").src = last.saliency[name];
  $("saliency-caption").textContent = "Saliency for " + name + " (" + last.saliency_method + ")";
  for (const tr of $("findings").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.name === name);
}

function render(r) {
  last = r;
  $("seen").src = r.image;
  const body = $("findings").tBodies[0];
  body.replaceChildren();
  for (const f of r.findings) {
    const tr = document.createElement("tr");
    tr.dataset.name = f.name;
    if (f.above_threshold) tr.className = "above";
    if (!f.validated) tr.className = "unvalidated";
    cell(tr, f.name);
    cell(tr, fmt(f.probability));
    cell(tr, f.validated ? fmt(f.threshold) : "none");
    // No threshold exists for a probe whose validation AUROC is at chance: no reading, say why.
    cell(tr, !f.validated ? "not validated" : f.above_threshold ? "above threshold" : "below threshold", "reading");
    const ci = f.test_auroc_ci && f.test_auroc_ci[0] !== null ? " [" + fmt(f.test_auroc_ci[0]) + ", " + fmt(f.test_auroc_ci[1]) + "]" : "";
    cell(tr, fmt(f.test_auroc) + ci);
    tr.addEventListener("click", () => showSaliency(f.name));
    body.appendChild(tr);
  }
  const margin = (f) => (f.validated ? f.probability - f.threshold : -Infinity);
  const top = r.findings.reduce((a, b) => (margin(b) > margin(a) ? b : a));
  showSaliency(top.name);
  $("rule").textContent = "Threshold rule: " + r.threshold_rule + ". Click a finding to see its saliency map.";
  const nb = $("neighbours");
  nb.replaceChildren();
  $("neighbours-title").hidden = r.neighbours.length === 0;
  for (const n of r.neighbours) {
    const div = document.createElement("div");
    div.className = "neighbour";
    const img = document.createElement("img");
    img.src = n.image;
    img.alt = n.key;
    div.appendChild(img);
    const p = document.createElement("div");
    p.textContent = "similarity " + fmt(n.similarity, 2) + " | " +
      Object.entries(n.labels).map(([k, v]) => k + ": " + v).join(", ");
    div.appendChild(p);
    nb.appendChild(div);
  }
  $("result").hidden = false;
}

async function upload(file) {
  const status = $("status");
  status.className = "";
  status.textContent = "Reading " + file.name + " ...";
  const form = new FormData();
  form.append("file", file);
  try {
    const resp = await fetch("api/predict", { method: "POST", body: form, credentials: "same-origin" });
    const r = await resp.json();
    if (!resp.ok) throw new Error(r.error || ("HTTP " + resp.status));
    render(r);
    status.textContent = "Done: " + file.name;
  } catch (e) {
    status.className = "error";
    status.textContent = "Could not read " + file.name + ": " + e.message;
    $("result").hidden = true;
  }
}

$("file").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
});
fetch("api/health", { credentials: "same-origin" }).then((r) => r.json()).then((h) => {
  $("model").textContent = "model: " + h.model + " (" + h.protocol + "), findings: " + h.tasks.join(", ");
}).catch(() => {});
