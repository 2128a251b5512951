// dev2pro web app, Train page: Basics + collapsed Advanced groups generated from the schema (/api/schema, labels
// and groups from ui/trainform.py), values carried over from the Models and Dataset pages, and the plan before
// Start (/api/train/plan: the CLI's loader validates, `dev2pro plan` judges), refreshed as the form changes.
// Uses the helpers of app.js ($, el, api, fill, toast, show, state).
"use strict";
const PRESET_GB = [8, 12, 16, 24, 48];
const FAMILY_WORDS = { auto: "auto (from the checkpoint)", flux1: "FLUX.1", flux2: "FLUX.2" };
const train = { schema: null, fetching: null, built: false, timer: null, seq: 0, specs: {} };

function fetchSchema() {  // once per page load (prefetched at start), then on each visit for the carried values
  train.fetching = api("/api/schema", undefined, { quiet: true }).then((r) => {
    train.schema = r; state.settings = r.settings;
    if (r.gpu !== "pending") state.gpu = r.gpu;
    return r;
  }).finally(() => { train.fetching = null; });
  return train.fetching;
}

function specInput(spec, value, id) {
  const a = { "data-key": spec.key, id };
  if (spec.kind === "bool") { const i = el("input", { type: "checkbox", ...a }); i.checked = !!value; return i; }
  if (spec.kind === "choice") {
    const s = el("select", a);
    for (const c of spec.choices) s.append(el("option", { value: String(c), text: FAMILY_WORDS[c] && spec.key ===
      "model.family" ? FAMILY_WORDS[c] : String(c) }));
    s.value = String(value); return s;
  }
  if (spec.kind === "list" || spec.kind === "str_or_list") {
    const t = el("textarea", { rows: 2, placeholder: "one per line", ...a });
    t.value = Array.isArray(value) ? value.join("\n") : (value || ""); return t;
  }
  const num = spec.kind === "int" || spec.kind === "float";
  const i = el("input", { type: "text", ...a, ...(num ? { inputmode: "decimal" } : {}) });
  i.value = value === null || value === undefined ? "" : value; return i;
}

function labelled(spec, control, extraHint = "") {
  const wide = control.tagName === "TEXTAREA" || control.multiple;
  const lab = el("label", { class: (spec.kind === "bool" ? "check" : "") + (wide ? " wide" : ""), "data-field": spec.key },
    el("span", { class: "name", text: spec.label }));
  if (spec.kind === "bool") lab.prepend(control); else lab.append(control);
  lab.append(el("small", { class: "help", text: spec.help + extraHint }));
  lab.title = spec.key;  // the config key, for readers of TOML files (never needed to fill the form)
  return lab;
}

// ------------------------------------------------------------------------------------------------ building
function buildBasics(r) {
  const b = $("basics"), s = train.specs;
  b.append(labelled(s["model.family"], specInput(s["model.family"], s["model.family"].default, "f-model-family")));
  const model = el("select", { "data-key": "model.path", id: "f-model-path" });
  b.append(labelled(s["model.path"], model, " (chosen on the Models page)"));
  const folders = el("select", { id: "b-data-folders", multiple: "", size: 3, "data-field": "data.folders" });
  b.append(labelled({ ...s["data.folders"], help: "folders of images with same-name .txt captions (from the " +
    "Dataset page); Ctrl/Shift-click to pick several" }, folders));
  b.append(labelled(s["data.trigger"], specInput(s["data.trigger"], "", "f-data-trigger")));
  b.append(labelled(s["train.steps"], specInput(s["train.steps"], s["train.steps"].default, "f-train-steps")));
  b.append(labelled(s["lora.rank"], specInput(s["lora.rank"], s["lora.rank"].default, "f-lora-rank")));
  const vram = el("select", { "data-key": "model.vram", id: "f-model-vram" });
  vram.append(el("option", { value: "gpu", text: "this GPU" }));
  for (const gb of PRESET_GB) vram.append(el("option", { value: String(gb), text: gb + " GB" }));
  vram.append(el("option", { value: "0", text: "no preset (set memory options under Advanced)" }));
  b.append(labelled({ ...s["model.vram"], help: "the card you will train on: the preset picks fp8 storage, " +
    "checkpointing, block swap, optimizer and text-encoder placement for it; settings you change under Advanced win" },
    vram));
  b.append(labelled(s["sample.prompts"], specInput(s["sample.prompts"], [], "f-sample-prompts"),
    " (one per line; rendered every 'sample every' steps and at the end)"));
  for (const key of ["sample.every", "save.every"]) {
    b.append(labelled(s[key], specInput(s[key], "", "f-" + key.replace(".", "-"))));
  }
  const out = el("input", { type: "text", id: "b-output-name", "data-field": "save.output_dir" });
  out.value = "lora-" + new Date().toISOString().slice(0, 16).replace(/[-:T]/g, "");
  b.append(labelled({ ...s["save.output_dir"], help: "the run's folder: runs/NAME in the workspace (LoRA files, " +
    "samples, logs); the LoRA file is named after it" }, out));
  gpuOption();
}

// about a quarter of the steps in round numbers (1000 -> 250): trainform.every_default, the server's default for
// values sent without them; a field the user typed in keeps its value
function everyDefault(steps) {
  steps = parseInt(steps, 10);
  if (!(steps > 0)) return 0;
  const q = steps / 4;
  if (q < 10) return Math.max(1, Math.floor(q + 0.5));
  const unit = 10 ** Math.floor(Math.log10(q)) / 2;
  return Math.min(steps, Math.max(unit, Math.floor(q / unit + 0.5) * unit));
}

// a quarter of train.epochs in whole epochs, at least 1: trainform.every_epochs_default
function everyEpochsDefault(epochs) { return Math.max(1, Math.floor(epochs / 4 + 0.5)); }

// save/sample every (in steps, or in epochs for a run counted in epochs) and the LoRA file name follow the steps,
// the epochs and the output name; a step cadence is 0 beside an epoch one (the loader refuses both)
function autoFields() {
  const every = everyDefault($("f-train-steps").value);
  const epochs = parseFloat(($("f-train-epochs") || {}).value) || 0;
  const prompts = $("f-sample-prompts").value.trim();
  for (const [sec, wanted] of [["save", true], ["sample", prompts]]) {
    const steps = $(`f-${sec}-every`), inEpochs = $(`f-${sec}-every_epochs`);
    if (inEpochs && !inEpochs.dataset.touched) inEpochs.value = epochs > 0 && wanted ? everyEpochsDefault(epochs) : 0;
    const byEpoch = inEpochs && parseInt(inEpochs.value, 10) > 0;
    if (steps && !steps.dataset.touched) steps.value = byEpoch ? 0 : (wanted ? every : 0);
  }
  const name = $("f-save-name");
  const stem = $("b-output-name").value.trim().replace(/\/+$/, "").split("/").pop()
    .replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[-.]+|[-.]+$/g, "").slice(0, 100);
  if (name && !name.dataset.touched && stem) name.value = stem;
}

function buildAdvanced(r) {
  const holder = $("advanced-groups"), groups = {};
  for (const spec of r.fields) {
    if (spec.basic && spec.key !== "data.folders") continue;
    if (!groups[spec.group]) {
      groups[spec.group] = el("div", { class: "fields" });
      holder.append(el("details", { class: "group", "data-group": spec.group }, el("summary", { text: spec.group }),
        groups[spec.group]));
    }
    if (spec.kind === "tables") {  // data.folders: per-folder options for the folders picked in Basics
      groups[spec.group].append(el("div", { class: "wide table-list", id: "folder-options", "data-field": spec.key },
        el("span", { class: "name", text: "Per-folder options" }),
        el("small", { class: "help", text: "repeats, a caption for images without one, subfolders: one row per " +
          "folder picked in Basics" })));
      continue;
    }
    groups[spec.group].append(labelled(spec, specInput(spec, spec.default, "f-" + spec.key.replaceAll(".", "-"))));
  }
  for (const [name, g] of Object.entries(groups)) {
    g.parentElement.querySelector("summary").textContent = `${name} (${g.querySelectorAll("[data-key]").length})`;
  }
}

function syncFolderRows() {
  const holder = $("folder-options"), spec = train.specs["data.folders"];
  const picked = [...$("b-data-folders").selectedOptions].map((o) => o.value);
  for (const row of [...holder.querySelectorAll(".table-row")]) if (!picked.includes(row.dataset.path)) row.remove();
  for (const path of picked) {
    if (holder.querySelector(`.table-row[data-path="${CSS.escape(path)}"]`)) continue;
    const row = el("div", { class: "row table-row", "data-path": path }, el("code", { text: path }));
    for (const f of spec.fields) {
      if (f.key === "path") continue;
      const i = specInput(f, f.default, "f-data-folders-" + f.key);
      i.removeAttribute("id"); i.dataset.item = f.key; i.removeAttribute("data-key");
      row.append(labelled({ ...f, key: "data.folders." + f.key }, i));
    }
    holder.append(row);
  }
}

async function loadTrain() {
  const first = !train.built;
  if (first && train.schema) buildForm(train.schema);  // prefetched at page load: no wait on the click
  await loading("train", async () => {
    const r = await (train.fetching || fetchSchema());
    if (!train.built) buildForm(r);
    carryOver(r);
  });
  refreshPlan();
}

function buildForm(r) {
  for (const spec of r.fields) train.specs[spec.key] = spec;
  buildBasics(r); buildAdvanced(r); carryOver(r); autoFields();
  train.built = true;
  $("basics").dataset.ready = "1";
}

// values from the Models and Dataset pages, on every visit, into fields the user has not changed here
function carryOver(r) {
  const s = r.settings || {};
  const model = $("f-model-path");
  if (!model.dataset.touched) {
    const want = s.train_base && r.models.includes(s.train_base) ? s.train_base : model.value || r.models[0] || "";
    fill(model, r.models, false, r.models.length ? null : "(no model folder: see the Models page)");
    model.value = want;
  }
  const adv = { "model.transformer": s.train_transformer, "model.inference_base": s.inference_base };
  for (const [key, value] of Object.entries(adv)) {
    const i = document.querySelector(`#page-train form [data-key="${key}"]`);
    if (i && !i.dataset.touched && value !== undefined) i.value = value || "";
  }
  const trig = $("f-data-trigger");
  if (!trig.dataset.touched && s.trigger !== undefined) trig.value = s.trigger;
  const folders = $("b-data-folders");
  if (!folders.dataset.touched) {
    const list = [...r.datasets]; if (s.dataset && !list.includes(s.dataset)) list.unshift(s.dataset);
    folders.innerHTML = "";
    for (const f of list) folders.append(el("option", { value: f, text: f }));
    const pick = s.dataset && list.includes(s.dataset) ? s.dataset : list.length === 1 ? list[0] : null;
    for (const o of folders.options) o.selected = o.value === pick;
    folders.size = Math.min(Math.max(list.length, 2), 5);
  }
  syncFolderRows();
  gpuOption();
}

function gpuOption() {  // "this GPU (name, N GB)" once nvidia-smi has answered; disabled without one
  const sel = $("f-model-vram"), opt = sel && sel.querySelector("option[value='gpu']");
  if (!opt) return;
  const g = state.gpu;
  opt.textContent = g === undefined ? "this GPU (detecting…)" : g ? `this GPU: ${g.name}, ${g.gb} GB` +
    ` (the ${g.preset} GB preset)` : "this GPU (none seen here)";
  opt.disabled = !g;
  const want = g ? "gpu" : "24";
  if (!sel.dataset.touched && sel.value !== want) { sel.value = want; return true; }
  return false;
}

// ------------------------------------------------------------------------------------------------ values
function formValues() {
  const v = {}, read = (i) => (i.type === "checkbox" ? i.checked : i.value);
  for (const i of document.querySelectorAll("#page-train form [data-key]")) v[i.dataset.key] = read(i);
  if (v["model.vram"] === "gpu") v["model.vram"] = String(state.gpu ? state.gpu.preset : 0);
  v["data.folders"] = [...document.querySelectorAll("#folder-options .table-row")].map((row) => {
    const item = { path: row.dataset.path };
    for (const i of row.querySelectorAll("[data-item]")) item[i.dataset.item] = read(i);
    return item;
  });
  const name = $("b-output-name").value.trim();
  v["save.output_dir"] = !name ? "" : name.includes("/") ? name : "runs/" + name;
  return v;
}

const planKey = () => JSON.stringify({ values: formValues(), card: cardValue() });

function cardValue() {
  const v = $("f-model-vram").value;
  if (v === "gpu") return "gpu";
  if (v === "0") return state.gpu ? "gpu" : null;
  return Number(v);
}

// ------------------------------------------------------------------------------------------------ the plan
function schedulePlan() {
  // a 'change' that repeats the last 'input' (fired on blur, e.g. by the click on Start) changes nothing: keep the
  // verdict and the button, or that very click would land on a disabled button
  if (train.planned === planKey() && $("plan").dataset.state !== "pending") return;
  clearTimeout(train.timer);
  $("plan").dataset.state = "pending";
  setStart(false, "checking the settings…");  // never Start on a verdict for other settings
  train.timer = setTimeout(refreshPlan, 350);
}

function clearFieldErrors() {
  for (const e of document.querySelectorAll("#page-train form .field-error")) e.remove();
  for (const e of document.querySelectorAll("#page-train form .invalid")) e.classList.remove("invalid");
}

function markField(key, message) {
  const lab = document.querySelector(`#page-train form [data-field="${CSS.escape(key)}"]`);
  if (!lab) return false;
  for (let d = lab.closest("details"); d; d = d.parentElement.closest("details")) d.open = true;
  lab.classList.add("invalid");
  lab.append(el("span", { class: "field-error", text: message }));
  return true;
}

const gb = (x) => (x === null || x === undefined ? "–" : x >= 0.1 ? x.toFixed(1) + " GB" : (x * 1024).toFixed(0) + " MB");
const duration = (s) => (s < 90 ? Math.round(s) + " s" : s < 5400 ? Math.round(s / 60) + " min" :
  (s / 3600).toFixed(1) + " h");

function setStart(ok, reason) {
  $("start-train").disabled = !ok;
  $("start-reason").textContent = ok ? "" : reason;
}

async function refreshPlan() {
  if (!train.built) return;
  clearTimeout(train.timer);
  const seq = ++train.seq, box = $("plan");
  box.dataset.state = "pending";
  let r;
  const body = { values: formValues(), card: cardValue() };
  train.planned = JSON.stringify(body);
  try { r = await api("/api/train/plan", body, { quiet: true }); }
  catch (e) { if (seq === train.seq) { box.dataset.state = "error"; setStart(false, e.message); } return; }
  if (seq !== train.seq) return;  // a newer request is on its way
  clearFieldErrors();
  const verdict = $("plan-verdict"), details = $("plan-details");
  details.innerHTML = ""; $("plan-text").textContent = "";
  if (!r.ok) {
    const marked = r.field && markField(r.field, r.error);
    verdict.dataset.fits = "invalid";
    verdict.textContent = "Fix this setting first: " + r.error + (marked ? "" : "");
    setStart(false, "a setting needs fixing (marked above)");
    box.dataset.state = "ready";
    return;
  }
  const p = r.plan;
  if (p.gpu !== undefined && JSON.stringify(state.gpu) !== JSON.stringify(p.gpu)) {
    state.gpu = p.gpu;
    if (gpuOption()) return schedulePlan();  // "this GPU" became the default: plan for it
  }
  verdict.dataset.fits = p.fits === true ? "yes" : p.fits === false ? "no" : "unknown";
  verdict.textContent = p.fits === true ? `Fits ${p.card}: ~${gb(p.need_gb)} of ${gb(p.card_gb)} at the peak` :
    p.fits === false ? `Does not fit ${p.card}: ${p.message.replace("WARNING: ", "")}` : p.message;
  const li = (label, text) => details.append(el("li", {}, el("strong", { text: label + ": " }), text));
  const parts = [`training ${gb(p.train_peak_gb)}`, `caching ${gb(p.caching_peak_gb)}`];
  if (p.sampling_peak_gb !== null) parts.push(`sampling ${gb(p.sampling_peak_gb)}`);
  const meter = el("meter", { min: 0, max: p.card_gb || p.need_gb, value: p.need_gb, id: "plan-meter" });
  li("Peak GPU memory", el("span", {}, `~${gb(p.need_gb)} with the CUDA context (${parts.join(", ")})` +
    (p.card_gb ? ` of ${gb(p.card_gb)} ` : " "), meter));
  li("Host RAM", `~${gb(p.host_ram_gb)} at the peak`);
  const chosen = Object.entries(p.preset);
  if (p.vram) li(`The ${p.vram} GB preset chose`, chosen.length ? chosen.map(([k, v]) =>
    `${train.specs[k] ? train.specs[k].label.toLowerCase() : k} = ${Array.isArray(v) ? v.join(", ") : v}`).join("; ") :
    "nothing (you set all its options)");
  li("Time", p.speed ? `~${p.speed.s_per_step.toFixed(2)} s per step, ~${duration(p.speed.total_s)} for the run ` +
    (p.speed.steps_estimated ? `of ~${p.speed.steps} steps (${p.saving.epochs} epochs; counted when it starts) ` : "") +
    `(${p.speed.source})` : "no measurement for these settings yet; the Monitor page shows the speed once it runs");
  const d = p.dataset;
  li("Dataset", d.shards ? "pre-encoded shards" : `${d.images} images, ${d.captioned} with a caption`);
  const sv = p.saving;
  li("Saving", el("span", { id: "plan-saving", class: sv.warnings.length ? "error" : "" },
    (sv.save_every ? `a LoRA and a resumable state every ${sv.save_every} steps` : sv.save_every_epochs ?
      `a LoRA and a resumable state every ${sv.save_every_epochs} epoch(s)` : "at the end only") + "; " +
    (sv.sample_every ? `samples every ${sv.sample_every} steps` : sv.sample_every_epochs ?
      `samples every ${sv.sample_every_epochs} epoch(s)` : "no samples before the end") +
    (sv.warnings.length ? " — " + sv.warnings.join("; ") : "")));
  $("plan-text").textContent = p.text;
  setStart(p.can_start, p.reasons.join("; "));
  box.dataset.state = "ready";
}

// ------------------------------------------------------------------------------------------------ actions
async function previewToml() {
  $("train-error").textContent = "";
  try { $("toml-preview").textContent = (await api("/api/train/preview", { values: formValues() }, { quiet: true })).toml; }
  catch (e) { $("train-error").textContent = e.message; }
}

async function startTrain() {
  $("train-error").textContent = "";
  try {
    const r = await api("/api/train/start", { values: formValues(), card: cardValue() }, { quiet: true });
    toast("training queued: " + r.job.run_dir, true);
    state.run = r.job.run_dir; show("monitor");
  } catch (e) { $("train-error").textContent = e.message; }
}

for (const [form, ev] of [["train-form", "input"], ["train-form", "change"], ["advanced-form", "input"],
  ["advanced-form", "change"]]) {
  $(form).addEventListener(ev, (e) => {
    if (e.target.dataset) e.target.dataset.touched = "1";  // carried values never overwrite it now
    if (e.target.id === "b-data-folders") syncFolderRows();
    autoFields();
    schedulePlan();
  });
}
$("preview-toml").onclick = previewToml;
$("start-train").onclick = startTrain;
fetchSchema().catch(() => {});  // prefetch: the Train tab renders from it on the first click
