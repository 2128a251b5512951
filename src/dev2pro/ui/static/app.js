// dev2pro web app: plain DOM code over the JSON API in dev2pro/ui/routes_*.py. No framework, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { page: "models", schema: null, settings: {}, folder: null, runInfo: null, captionJob: null };

async function api(path, body, opts = {}) {
  const init = { headers: { "X-Dev2pro-UI": "1" } };
  if (body instanceof FormData) { init.method = "POST"; init.body = body; }
  else if (body !== undefined) {
    init.method = "POST"; init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) { if (!opts.quiet) toast(data.error || r.statusText); throw new Error(data.error || r.statusText); }
  noteJob(data);  // jobs.js: a job just queued here has its end reported, however soon it comes
  return data;
}

function toast(msg, ok = false) {
  const t = $("toast"); t.textContent = msg; t.className = ok ? "ok" : ""; t.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => (t.hidden = true), ok ? 2500 : 8000);
}
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
};
const fill = (select, values, keep = true, blank = null) => {
  const old = select.value; select.innerHTML = "";
  if (blank !== null) select.append(el("option", { value: "", text: blank }));
  for (const v of values) select.append(el("option", { value: v, text: v }));
  if (keep && values.includes(old)) select.value = old;
};
// a page's loading bar while its data is fetched (every page that fetches shows one)
async function loading(page, fn) {
  const bar = $("loading-" + page), sec = $("page-" + page);
  sec.dataset.loading = "1"; bar.hidden = false;
  try { return await fn(); } finally { delete sec.dataset.loading; bar.hidden = true; }
}
const fileUrl = (p) => "/files/" + p.split("/").map(encodeURIComponent).join("/");

// ------------------------------------------------------------------------------------------------ pages
function show(page) {
  state.page = page;
  for (const s of document.querySelectorAll(".page")) s.hidden = s.id !== "page-" + page;
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.page === page);
  const load = { models: loadModels, dataset: loadDataset, monitor: loadRuns, results: loadResults };
  Promise.resolve(page === "train" ? loadTrain() : loading(page, load[page])).catch(() => {});  // train.js
}

async function loadModels() {
  const m = await api("/api/models");
  state.modelsLoaded = true; state.datasets = m.datasets;
  state.settings = m.settings; $("ws-root").textContent = m.workspace;
  fill($("train-base"), m.flux, false); fill($("inference-base"), m.transformers, false, "(the training base)");
  fill($("train-transformer"), m.transformers, false, "(the folder's transformer)");
  if (m.settings.train_transformer) $("train-transformer").value = m.settings.train_transformer;
  fill($("convert-src"), m.transformers, true); fill($("captioner"), m.captioners, true);
  if (m.settings.train_base) $("train-base").value = m.settings.train_base;
  if (m.settings.inference_base) $("inference-base").value = m.settings.inference_base;
  state.partners = m.distilled_partner;
  if (m.settings.inference_base === undefined) suggestInference();  // never chosen: offer the distilled klein
  if (m.settings.captioner) $("captioner").value = m.settings.captioner;
  if (m.settings.trigger && !$("trigger").value) $("trigger").value = m.settings.trigger;
  $("models-empty").hidden = m.flux.length > 0; $("model-help").textContent = m.model_help;
  $("captioner-empty").hidden = m.captioners.length > 0;
  $("captioner-help").textContent = m.captioner_help.command;
  $("captioner-families").textContent = m.captioner_help.families.join("; ");
  if (m.skipped.length) toast("not listed (symlinks out of the workspace; move or copy them in): " +
    m.skipped.map((s) => s.path).join(", "));
}

function suggestInference() {  // klein Base chosen, no inference base yet: samples on its distilled model
  const partner = (state.partners || {})[$("train-base").value];
  if (partner && !$("inference-base").value) {
    $("inference-base").value = partner;
    toast("inference base: " + partner + " (the distilled klein: samples show the LoRA where it is used)", true);
  }
}

async function inspect(path) {
  if (!path) return toast("choose a model first");
  $("inspect-out").textContent = "inspecting " + path + " ...";
  const r = await api("/api/inspect", { path });
  const i = r.info;
  const summary = `${r.path}: ${i.layout}, ${i.variant_detail || i.variant}, ${i.double_blocks} double + ` +
    `${i.single_blocks} single blocks, hidden ${i.hidden}, fp8: ${i.fp8}`;
  $("inspect-out").textContent = summary + "\n\n" + JSON.stringify(i, null, 2);
}

// ------------------------------------------------------------------------------------------------ dataset
async function loadDataset() {
  if (!state.modelsLoaded) await loadModels();
  if (state.settings.dataset && !state.folder) $("dataset-folder").value = state.settings.dataset;
  else if (!state.folder && !state.settings.dataset && state.datasets && state.datasets.length) {
    $("dataset-folder").value = state.datasets[0];  // a newcomer's photos: the workspace's first image folder
  }
  await saveTypedCaptions().catch(() => {});  // a caption typed but not blurred survives the redraw (jobs.js)
  const folder = $("dataset-folder").value.trim();
  const controls = referenceFolders(folder);
  let d;
  const q = `folder=${encodeURIComponent(folder)}&resolution=${$("bucket-resolution").value}` +
    `&bucket_step=${$("bucket-step").value}` + controls.map((c) => `&controls=${encodeURIComponent(c)}`).join("");
  try { d = await api("/api/dataset?" + q, undefined, { quiet: true }); }
  catch (e) {
    state.shown = null; showRemoved([]);
    $("thumbs").innerHTML = ""; $("pair-summary").textContent = "";
    $("bucket-preview").textContent = /out of range|reference folder|controls of/.test(e.message) ? e.message
      : "(empty: upload images)";
    return;
  }
  state.folder = d.folder; state.shown = d.folder; showRemoved(d.removed);  // the folder the tools act on
  $("folder-list").innerHTML = ""; for (const f of d.folders) $("folder-list").append(el("option", { value: f }));
  $("bucket-preview").textContent = d.images.length + " images; buckets: " +
    (d.buckets.map((b) => `${b.bucket} × ${b.images}`).join(", ") || "none") +
    (d.truncated ? ` (the first ${d.images.length} shown)` : "") +
    (d.skipped.length ? `; not read (symlinks out of the workspace): ${d.skipped.map((s) => s.name).join(", ")}` : "") +
    captionClashes(d);
  $("pair-summary").textContent = !d.pairs ? "" : d.pairs.length === 1 ? pairSummary(d.pairs[0]) :
    `${d.pairs_complete} of ${d.images.length} images have a usable reference in every folder · ` +
    d.pairs.map((p) => p.controls + ": " + pairSummary(p)).join(" · ");
  const grid = $("thumbs"); grid.innerHTML = "";
  for (const im of d.images) {
    const ta = el("textarea", { class: "caption", rows: 3, "data-path": im.path, placeholder: "(no caption)" });
    ta.value = im.caption; ta.dataset.orig = im.caption;
    ta.addEventListener("change", async () => {
      const typed = ta.value;
      await api("/api/caption", { image: im.path, text: typed });
      ta.dataset.saved = "1"; ta.dataset.orig = typed; toast("caption saved: " + im.name, true);
    });
    const refs = im.references || [], bad = (r) => ["missing", "unusable"].includes(r.status);
    const pic = el("img", { src: thumbUrl(im.path), alt: im.name, loading: "lazy" });
    // one reference per folder, in order; a flag names its folder when there are several
    const flags = refs.map((r, i) => !r.problem ? "" : el("div", { class: "flag" + (bad(r) ? "" : " warn"),
      text: (refs.length > 1 ? d.pairs[i].controls + ": " : "") + (r.status === "unusable" ? "reference unusable: "
        : r.status === "cropped" ? "reference cropped: " : "") + r.problem }));
    grid.append(el("div", { class: "thumb" + (im.bad || refs.some(bad) ? " bad" : ""), "data-path": im.path,
                            ...(refs.length ? { "data-reference": refs.map((r) => r.status).join(" ") } : {}) },
      refs.length ? el("div", { class: "pair", style: `grid-template-columns: repeat(${refs.length + 1}, 1fr)` },
        pic, ...refs.map(referenceView)) : pic,
      el("div", { class: "meta" }, el("label", { class: "check" }, el("input", { type: "checkbox", class: "select" }),
        im.name), el("span", { text: im.size ? im.size.join("×") : "" })),
      im.bad ? el("div", { class: "flag", text: "skipped in training: " + im.bad }) : "", ...flags,
      im.shares_caption ? el("div", { class: "flag warn shared-caption", text: "shares its caption file with " +
        im.shares_caption.join(", ") + ": editing one edits both; rename one" }) : "", ta));
  }
}

const thumbUrl = (p) => "/api/thumb?path=" + encodeURIComponent(p);

// the edit pairs' reference folder(s), one per line: typed here, or the Train form's controls for this folder
function referenceFolders(folder) {
  const input = $("dataset-controls");
  if (!input.value.trim() && !input.dataset.touched) {
    const sel = `#folder-options .table-row[data-path="${CSS.escape(folder)}"] [data-item="controls"]`;
    const field = document.querySelector(sel);
    if (field && field.value.trim()) input.value = field.value.trim();  // all of them, in order
  }
  fitRows(input);
  return input.value.split("\n").map((c) => c.trim()).filter(Boolean);
}
const fitRows = (ta) => { ta.rows = Math.max(1, Math.min(6, ta.value.split("\n").length)); };

function referenceView(r) {  // the reference's thumbnail beside its image, or why training cannot use one
  if (r.status === "paired" || r.status === "cropped") {
    return el("img", { class: "ref", src: thumbUrl(r.path), alt: "reference " + r.path, title: "reference: " +
      r.path + (r.size ? ` (${r.size.join("×")})` : ""), loading: "lazy" });
  }
  return el("div", { class: "ref none", title: r.problem,
                     text: r.status === "missing" ? "no reference" : "reference unusable" });
}

function pairSummary(p) {
  const n = (k, word) => `${k} ${word}${k === 1 ? "" : "s"}`;
  const unused = p.unused === null ? "" : p.unused_count ? `; ${p.unused_count} unused in ${p.controls}: ` +
    p.unused.join(", ") + (p.unused_count > p.unused.length ? ", …" : "") : "";
  return `${n(p.paired, "pair")}, ${p.missing + p.problem} without a usable reference` +
    (p.cropped ? ` (${p.cropped} of the pairs with another aspect ratio: cropped)` : "") + unused;
}

const ticked = () => [...document.querySelectorAll("#thumbs .thumb")]
  .filter((t) => t.querySelector(".select").checked).map((t) => t.dataset.path);

async function autocaption(selected) {
  const files = selected ? ticked() : [];
  if (selected && !files.length) return toast("tick some images first");
  const model = $("captioner").value;
  if (!model) return toast("no captioner folder in the workspace");
  await api("/api/settings", { captioner: model, trigger: $("trigger").value });
  const job = await api("/api/autocaption", { folder: $("dataset-folder").value.trim(), model, files,
    trigger: $("trigger").value, prompt: $("caption-prompt").value, overwrite: $("caption-overwrite").checked,
    max_length: $("caption-max-length").value, batch_size: $("caption-batch-size").value });
  state.captionJob = job.id; $("caption-status").textContent = "captioning: " + job.status;
}

async function pollCaption() {
  if (!state.captionJob) return;
  const j = await api("/api/jobs/" + state.captionJob, undefined, { quiet: true });
  const counts = {};
  for (const r of j.results) counts[r.status] = (counts[r.status] || 0) + 1;
  const errors = j.results.filter((r) => r.status === "error").map((r) => `${r.image}: ${r.error}`);
  $("caption-status").textContent = `captioning ${j.status}: ` + Object.entries(counts).map(([k, v]) => `${v} ${k}`)
    .join(", ") + (errors.length ? " | " + errors.join("; ") : "") + (j.error ? " | " + j.error : "");
  $("caption-status").dataset.status = j.status;
  if (!["queued", "running"].includes(j.status)) { state.captionJob = null; if (state.page === "dataset") loadDataset(); }
}

// ------------------------------------------------------------------------------------------------ dataset tools
// one caption edit over the shown folder (POST /api/captions/bulk): Preview is its dry run, Apply writes it
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function bulkRequest(dryRun) {
  if (!state.shown) { toast("open a dataset folder first"); return null; }
  const op = $("bulk-op").value, only = $("bulk-selected").checked, files = only ? ticked() : [];
  if (only && !files.length) { toast("tick some images first (or untick 'ticked images only')"); return null; }
  return { folder: state.shown, op, text: $("bulk-text").value, whole_word: $("bulk-whole").checked, files,
           dry_run: dryRun, ...(op === "replace" ? { find: $("bulk-find").value } : {}) };
}

function bulkSummary(r) {
  const c = r.counts, would = r.dry_run ? "would change" : "changed";
  return `${would} ${plural(c.changed, "caption")}` + (c.created ? `, ${r.dry_run ? "would create" : "created"} ` +
    `${c.created} (images without a caption file)` : "") + `; ${c.unchanged} unchanged` +
    (c.skipped ? `; ${c.skipped} skipped` : "") + (r.emptied.length ? `; ${r.emptied.length} left empty ` +
    "(training refuses an empty caption: write one)" : "");
}

function showBulk(r) {  // the counts and the first 20 captions, before and after
  const box = $("bulk-out"), name = (p) => p.split("/").pop();
  box.innerHTML = ""; box.hidden = false;
  box.append(el("div", { id: "bulk-counts", class: "status", text: bulkSummary(r) }));
  if (!r.files.length) return;
  box.append(el("table", {}, el("tr", {}, ...["image", "before", "after"].map((t) => el("th", { text: t }))),
    ...r.files.slice(0, 20).map((f) => el("tr", { "data-caption": f.caption, "data-status": f.status },
      el("td", { text: f.images.map(name).join(", ") }), el("td", { class: "before", text: f.before ?? "(none)" }),
      el("td", { class: "after", text: f.status === "skipped" ? "skipped: " + f.reason : f.after })))));
  if (r.files.length > 20) box.append(el("div", { class: "status", text: `… and ${r.files.length - 20} more` }));
}

async function bulkEdit(dryRun) {
  const req = bulkRequest(dryRun);
  if (!req) return;
  if (!dryRun) await saveTypedCaptions();  // a caption typed but not blurred: the edit starts from it
  const r = await api("/api/captions/bulk", req);
  showBulk(r);
  if (!dryRun) { toast(bulkSummary(r), true); await loadDataset(); }
}

async function bulkUndo() {
  if (!state.shown) return toast("open a dataset folder first");
  const r = await api("/api/captions/undo", { folder: state.shown });
  $("bulk-out").hidden = true;
  toast(`undo: ${plural(r.restored, "caption")} restored` + (r.deleted ? ` (${r.deleted} created by it deleted)` : "") +
    (r.changed_since.length ? "; edited since, left as they are: " + r.changed_since.join(", ") : ""), true);
  await loadDataset();
}

function bulkOp() {  // find: replace only; whole word: replace and remove
  const op = $("bulk-op").value;
  $("bulk-find-label").hidden = op !== "replace";
  $("bulk-text-label").textContent = op === "replace" ? "Replace with" : "Text";
  $("bulk-whole").disabled = !["replace", "remove"].includes(op);
  $("bulk-out").hidden = true;
}

// Remove selected: into FOLDER/.removed/ (training skips it), with the Reference folder's references; Restore
async function removeSelected() {
  const files = ticked();
  if (!state.shown || !files.length) return toast("tick the images to remove first");
  await saveTypedCaptions();
  const r = await api("/api/dataset/remove", { folder: state.shown, files, controls: referenceFolders(state.shown) });
  toast(`moved ${plural(r.moved.length, "image")} into .removed/ (training skips it; Restore puts them back)` +
    (r.kept.length ? "; kept, other images use them: " + r.kept.join(", ") : ""), true);
  await loadDataset();
}

function showRemoved(list) {
  $("removed-box").hidden = !list.length; $("removed-count").textContent = list.length;
  $("removed-list").replaceChildren(...list.map((x) => el("li", { "data-path": x.path },
    el("span", { text: x.name, title: `${x.path} (${plural(x.files, "file")})` }),
    el("button", { class: "secondary restore", text: "Restore", onclick: () => restoreRemoved([x.path]) }))));
}

async function restoreRemoved(files) {
  const r = await api("/api/dataset/restore", { folder: state.shown, files });
  toast("restored " + r.restored.map((x) => x.path).join(", "), true);
  await loadDataset();
}

// ------------------------------------------------------------------------------------------------ monitor
function plot(svg, series, classes) {
  const W = 400, H = 180, P = 28;
  const pts = series.flat();
  svg.innerHTML = ""; svg.dataset.points = series[0] ? series[0].length : 0;
  if (!pts.length) { svg.innerHTML = `<text x="${W / 2 - 30}" y="${H / 2}">no data yet</text>`; return; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y1 - y0 <= Math.abs(y1) * 1e-6 + 1e-15) {  // a constant (the lr): ±10% of it, never below 0 for one >= 0
    const pad = Math.abs(y1) * 0.1 || 1e-3;
    [y0, y1] = [y0 >= 0 ? Math.max(0, y0 - pad) : y0 - pad, y1 + pad];
  }
  const sx = (x) => P + ((x - x0) / (x1 - x0)) * (W - P - 6), sy = (y) => H - 16 - ((y - y0) / (y1 - y0)) * (H - 26);
  series.forEach((s, k) => {
    const pl = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    pl.setAttribute("class", classes[k]); pl.setAttribute("points", s.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "));
    svg.append(pl);
  });
  const fmt = (v) => (Math.abs(v) < 0.01 ? v.toExponential(1) : v.toFixed(3));
  svg.insertAdjacentHTML("beforeend", `<text x="2" y="12">${fmt(y1)}</text><text x="2" y="${H - 18}">${fmt(y0)}</text>` +
    `<text x="${P}" y="${H - 3}">step ${x0}</text><text x="${W - 60}" y="${H - 3}">step ${x1}</text>`);
}

async function loadRuns() {
  const r = await api("/api/runs");
  const names = r.runs.map((x) => x.run);
  $("monitor-empty").hidden = names.length > 0; $("monitor-body").hidden = !names.length;
  $("results-empty").hidden = names.length > 0; $("results-body").hidden = !names.length;
  fillRuns($("run-select"), r.runs); fillRuns($("results-run"), r.runs);  // runs.js: status and date, newest first
  if (state.run && names.includes(state.run)) { $("run-select").value = state.run; $("results-run").value = state.run; }
  await pollRun();
}

async function pollRun() {
  const run = $("run-select").value;
  if (!run) return;
  const r = await api("/api/run?run=" + encodeURIComponent(run), undefined, { quiet: true });
  state.runInfo = r;
  const st = r.status || (r.job ? r.job.status : r.finished ? "finished" : "unknown");
  $("run-status").textContent = runStatusText(r, st);  // runs.js
  $("run-status").dataset.status = st; $("run-status").dataset.step = r.step;
  plot($("loss-plot"), [r.scalars.loss, r.scalars.smoothed], ["raw", "smooth"]);
  const val = r.scalars.val || [], best = r.summary && r.summary.validation_best;
  plot($("val-plot"), [val], ["val"]);
  if (!val.length) $("val-plot").innerHTML = `<text x="20" y="90">no validation: set [validation] folder or fraction</text>`;
  $("val-caption").textContent = "validation loss (held-out)" +
    (best ? ` · best ${Number(best.overall).toFixed(4)} at step ${best.step}` : "");
  plot($("lr-plot"), [r.scalars.lr], ["lr"]);
  showSamples(r);  // runs.js: the grids, their captions and the step thumbnails
  showLog($("log-tail"), r.log); showRunEnd(r);  // jobs.js: newest lines in view; why it failed or stopped
  $("stop-run").disabled = !(r.job && ["queued", "running"].includes(r.job.status));
  $("resume-run").disabled = !(r.states.length && !(r.job && ["queued", "running"].includes(r.job.status)) && !r.finished);
}

// ------------------------------------------------------------------------------------------------ results
// loadResults, compareCandidates: runs.js
// an edit LoRA (its file says how many references it edits from) or a run with sample.control: the field for
// the reference images its sample and compare edit (empty: the run's sample.control)
async function loraReferences() {
  const lora = $("sample-lora").value, row = $("sample-refs-row");
  const r = lora ? await api("/api/lora?lora=" + encodeURIComponent(lora), undefined, { quiet: true })
    .catch(() => null) : null;
  if ($("sample-lora").value !== lora) return;  // another LoRA was chosen meanwhile
  row.hidden = !r || !(r.references || r.control.length);
  const rec = r && r.recommended;  // dev2pro calibrate --write: the strength that does on its target what 1.0 does
  $("strength-hint").textContent = rec ? `calibrated: ${rec.strength} on ${rec.target} (dev2pro calibrate)` : "";
  if (rec) { $("strength").value = rec.strength; $("strength").oninput(); }
  if (!r) return;
  row.dataset.references = r.references;
  $("sample-references").placeholder = r.control.length ? r.control.join("\n") : "e.g. before/test.png";
  $("sample-refs-hint").textContent = (r.references ? `an edit LoRA: ${r.references} reference image(s) per edit`
    : "the run samples with reference images") + (r.control.length ? "; empty: the run's sample.control (" +
    r.control.join(", ") + ")" : "; give them here or set sample.control") +
    (r.control_problem ? "; " + r.control_problem : "");
}
const references = () => ($("sample-refs-row").hidden ? {} : { references: $("sample-references").value });

async function sampleDev() {
  const lora = $("sample-lora").value;
  if (!lora) return toast("no LoRA in this run yet");
  const req = { lora, strength: $("strength").value, prompt: $("sample-prompt").value };
  const job = await api("/api/sample", { ...req, ...references() });
  state.sampleJob = job; state.sampleReq = req;
}

async function compareRun() {
  const lora = $("sample-lora").value;
  if (!lora) return toast("no LoRA in this run yet");
  const job = await api("/api/compare", { lora, other: $("compare-other").value, strength: $("strength").value,
                                          ...references() });
  state.compareJob = job; $("compare-status").textContent = "compare " + job.status;
}

async function pollResults() {
  for (const key of ["sampleJob", "compareJob"]) {
    const j = state[key];
    if (!j) continue;
    const now = await api("/api/jobs/" + j.id, undefined, { quiet: true });
    if (key === "compareJob") { $("compare-status").textContent = "compare " + now.status; $("compare-status").dataset.status = now.status; }
    if (["queued", "running"].includes(now.status)) continue;
    state[key] = null;
    if (now.status !== "done") { toast(`${now.kind} ${now.status}: ` + (now.error || now.log.split("\n").slice(-1)[0])); continue; }
    if (key === "sampleJob") {
      const pngs = now.outputs.filter((p) => p.endsWith(".png"));
      const img = $("sample-result"); img.src = fileUrl(pngs.find((p) => p.endsWith("/grid.png")) || pngs[0]);
      $("sample-result-caption").textContent = state.sampleReq ? sampleLabel(state.sampleReq) : "";  // runs.js
      $("sample-result-box").hidden = false;
    }
    else { const f = $("compare-report"); f.src = fileUrl(j.out + "/report.html"); f.hidden = false; }
  }
}

// ------------------------------------------------------------------------------------------------ polling
async function pollJobs() {
  const r = await api("/api/jobs", undefined, { quiet: true });
  renderJobs(r.jobs);  // jobs.js: the job bar, its jobs list, and how each job ended
}

async function tick() {
  try {
    await pollJobs();
    await pollCaption();
    if (state.page === "monitor") await ($("monitor-empty").hidden ? pollRun() : loadRuns());  // a run may start
    if (state.page === "results") await pollResults();
  } catch (e) { /* the server may be restarting: try again next tick */ }
  setTimeout(tick, 1000);
}

// ------------------------------------------------------------------------------------------------ wiring
for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => show(t.dataset.page));
$("save-models").onclick = async () => {  // carried over to the Train page on its next visit
  state.settings = await api("/api/settings", { train_base: $("train-base").value, inference_base:
    $("inference-base").value, train_transformer: $("train-transformer").value });
  toast("models saved: the Train page uses them", true);
};
$("train-base").addEventListener("change", suggestInference);
$("inspect-train").onclick = () => inspect($("train-transformer").value || $("train-base").value);
$("inspect-inference").onclick = () => inspect($("inference-base").value || $("train-base").value);
$("convert-fp8").onclick = async () => {
  const j = await api("/api/convert", { src: $("convert-src").value, dst: $("convert-dst").value, dtype: "fp8",
    overwrite: $("convert-overwrite").checked });
  toast("queued: " + j.title, true);
  Object.assign($("convert-status"), { textContent: `convert ${j.status}: ${j.title}` }).dataset.job = j.id;
};
$("jobbar").onclick = toggleJobs;
$("load-folder").onclick = async () => {
  state.folder = null; $("bulk-out").hidden = true; state.settings.dataset = $("dataset-folder").value;
  await loading("dataset", loadDataset);
  if (state.folder) api("/api/settings", { dataset: state.folder }, { quiet: true }).catch(() => {});  // for Train
};
$("dataset-controls").oninput = () => { $("dataset-controls").dataset.touched = "1"; fitRows($("dataset-controls")); };
$("trigger").onchange = () => api("/api/settings", { trigger: $("trigger").value }, { quiet: true }).catch(() => {});
$("upload").onclick = upload;
$("bucket-resolution").onchange = $("bucket-step").onchange = () => loadDataset();
$("caption-all").onclick = () => autocaption(false);
$("caption-selected").onclick = () => autocaption(true);
$("bulk-op").onchange = bulkOp;
$("bulk-text").oninput = $("bulk-find").oninput = () => ($("bulk-out").hidden = true);  // a preview of other text
$("bulk-preview").onclick = () => bulkEdit(true);
$("bulk-apply").onclick = () => bulkEdit(false);
$("bulk-undo").onclick = bulkUndo;
$("remove-selected").onclick = removeSelected;
bulkOp();
for (const [id, page] of [["monitor-go-train", "train"], ["results-go-train", "train"], ["results-go-monitor", "monitor"]]) {
  $(id).onclick = () => show(page);
}
$("run-select").onchange = () => { state.run = $("run-select").value; pollRun(); };
$("results-run").onchange = () => { state.run = $("results-run").value; loading("results", loadResults); };
$("stop-run").onclick = async () => { const r = state.runInfo; if (r && r.job) await api(`/api/jobs/${r.job.id}/stop`, {}); pollRun(); };
$("resume-run").onclick = async () => { await api("/api/train/resume", { run: $("run-select").value }); pollRun(); };
$("strength").oninput = () => ($("strength-value").textContent = Number($("strength").value).toFixed(2));
$("sample-lora").onchange = () => { loraReferences(); compareCandidates(); };
$("sample-dev").onclick = sampleDev;
$("compare-run").onclick = compareRun;
show("models");
tick();
