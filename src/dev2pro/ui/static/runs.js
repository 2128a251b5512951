// dev2pro web app, Monitor and Results pages: the run status line, the sample grids with their labels, the run
// dropdowns (status and date, newest first) and the Results page (LoRA files, sample, compare).
// Uses the helpers of app.js ($, el, api, fill, fileUrl, loading, state).
"use strict";

// h:mm:ss (m:ss under an hour), as fluxgym and ai-toolkit show an ETA
function hms(s) {
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

// s/it below 1 it/s (a real FLUX step takes seconds), it/s above
const speedText = (v) => (v >= 1 ? v.toFixed(2) + " it/s" : (1 / v).toFixed(2) + " s/it");

function runStatusText(r, st) {
  // speed and ETA only while the run trains (the server leaves them out for stopped, failed or finished runs,
  // and for a resumed one until its new session has logged points)
  const live = r.steps_per_second ? ` · ${speedText(r.steps_per_second)}` +
    (r.eta_seconds !== null && r.eta_seconds !== undefined ? ` · ETA ${hms(r.eta_seconds)}` : "") : "";
  const mem = r.memory_gb === null || r.memory_gb === undefined ? "" :
    ` · ${r.memory_label || "peak GPU memory allocated"}: ${Number(r.memory_gb).toFixed(1)} GB`;
  return `${st} · step ${r.step}/${r.total_steps ?? "?"}` + (r.step_from ? ` (${r.step_from})` : "") + live + mem +
    (r.states.length ? ` · saved states: ${r.states.join(", ")}` : "");
}

// "step 250" or "step 250 · training base (Base)" for a grid file (train/samples.py's names; monitor.GRID_LABELS)
const GRID_WORDS = { "": "", "-base": "Base", "-adapter": "with adapter", "-g1": "guidance 1", "-cfg": "true CFG" };
function gridLabel(path, klein) {
  const m = /step(\d+)(-[a-z0-9-]+)?\.png$/.exec(path);
  if (!m) return path.split("/").pop();
  const tag = m[2] || "", words = tag in GRID_WORDS ? GRID_WORDS[tag] : tag.slice(1);
  return `step ${Number(m[1])}` + (words ? " · " + words : klein ? " · distilled" : "");
}

function showGrid(path, caption) {  // the big grid and its caption name the same file
  const grid = $("sample-grid");
  if (grid.dataset.path !== path) { grid.src = fileUrl(path) + "?t=" + Date.now(); grid.dataset.path = path; }
  caption.textContent = "samples: " + gridLabel(path, false) + " (" + path.split("/").pop() + ")";
}

function showSamples(r) {
  const grid = $("sample-grid"), caption = $("sample-caption"), latest = r.latest_samples || [];
  const klein = r.samples.some((s) => /-base\.png$/.test(s));
  const list = $("sample-list"), pair = $("sample-pair");
  if (list.dataset.run !== r.run) { list.dataset.run = r.run; delete list.dataset.picked; }
  const picked = list.dataset.picked && r.samples.includes(list.dataset.picked) ? list.dataset.picked : null;
  if (r.samples.length) showGrid(picked || r.samples[r.samples.length - 1], caption);
  else { grid.dataset.path = ""; caption.textContent = "samples (on the inference base): none yet"; }
  // the latest step's grids side by side when there are several (a klein LoRA on distilled next to Base); a
  // thumbnail picked below shows that one grid instead
  const key = latest.map((g) => g.file).join("|");
  if (latest.length > 1 && pair.dataset.key !== key) {
    pair.innerHTML = "";
    for (const g of latest) {
      pair.append(el("figure", {}, el("figcaption", {}, g.label + ": " + gridLabel(g.file, klein)),
                     el("img", { src: fileUrl(g.file) + "?t=" + Date.now(), alt: g.label })));
    }
    pair.dataset.key = key;
  }
  const paired = latest.length > 1 && !picked;
  pair.hidden = !paired;
  grid.hidden = !r.samples.length || paired;
  caption.hidden = paired;  // the pair's own captions say what each grid is
  if (list.dataset.key !== r.samples.join("|")) {
    list.dataset.key = r.samples.join("|"); list.innerHTML = "";
    for (const s of r.samples) {
      list.append(el("figure", { class: "thumb-step", title: s, "data-path": s, onclick: () => {
        list.dataset.picked = s; showGrid(s, caption); pair.hidden = true; grid.hidden = false; caption.hidden = false;
      } }, el("img", { src: fileUrl(s), alt: gridLabel(s, klein) }), el("figcaption", { text: gridLabel(s, klein) })));
    }
  }
}

// "runs/x — failed · 2025-01-02 14:03": the run dropdowns, newest first (the server's order)
function fillRuns(select, runs) {
  const old = select.value; select.innerHTML = "";
  for (const x of runs) {
    const when = x.modified ? new Date(x.modified * 1000).toLocaleString([], { dateStyle: "short",
      timeStyle: "short" }) : "";
    select.append(el("option", { value: x.run, text: `${x.run} — ${x.status}` + (when ? ` · ${when}` : "") }));
  }
  if (runs.some((x) => x.run === old)) select.value = old;
}

// ------------------------------------------------------------------------------------------------ results
async function loadResults() {
  await loadRuns();
  const run = $("results-run").value;
  if (!run) return;
  const r = await api("/api/run?run=" + encodeURIComponent(run));
  const failed = r.job && ["failed", "stopped"].includes(r.job.status) && !r.loras.length;
  const active = r.job && ["queued", "running"].includes(r.job.status);
  $("results-pending").hidden = r.loras.length > 0;
  $("results-pending-text").textContent = failed ? `This run ${r.job.status} before it wrote a LoRA file` +
    (r.states.length ? " (it has a saved state: Resume it on Monitor)." : "; the log on Monitor says why.")
    : active ? "This run has no LoRA file yet: it is written at each save and when training ends."
    : "This run has no LoRA file.";
  $("results-pending").dataset.status = failed ? r.job.status : active ? "active" : "none";
  $("results-actions").hidden = !r.loras.length;  // nothing to sample or compare without a LoRA
  // the run's last sample grids, side by side (a FLUX.2 klein LoRA on the distilled model next to Base)
  const grids = $("results-grids"); grids.innerHTML = "";
  for (const g of r.latest_samples || []) {
    grids.append(el("figure", {}, el("figcaption", {}, "last samples, " + g.label + ": " + gridLabel(g.file, false)),
                    el("img", { src: fileUrl(g.file), alt: g.label })));
  }
  grids.hidden = !(r.latest_samples || []).length;
  const ul = $("lora-files"); ul.innerHTML = "";
  const isStep = (p) => /-step\d+/.test(p);
  const layout = (p) => (p.includes(".diffusers.") ? "diffusers / PEFT" : p.includes(".comfy.") ? "ComfyUI" :
    "kohya (ComfyUI, Forge)");
  const link = (p) => el("a", { href: fileUrl(p) + "?download=1", class: "download-lora", download: p.split("/").pop(),
    text: p.split("/").pop() });
  const finals = r.loras.filter((p) => !isStep(p)).sort((a, b) => layout(b).length - layout(a).length);
  const offers = r.loras.length ? await loraOffers(run) : {};
  for (const p of finals) {
    ul.append(el("li", {}, link(p), " ", el("span", { class: "status", text: layout(p) }), getAs(p, offers[p])));
  }
  const steps = r.loras.filter(isStep);
  if (steps.length) {
    const det = el("details", {}, el("summary", { text: `${steps.length} intermediate checkpoints` }));
    for (const p of steps) det.append(el("div", {}, link(p), getAs(p, offers[p])));
    ul.append(el("li", {}, det));
  }
  fill($("sample-lora"), [...finals, ...steps], true);
  if (finals.length && !finals.includes($("sample-lora").value)) $("sample-lora").value = finals[0];
  loraReferences();
  await compareCandidates();
}

// ------------------------------------------------------------------------------------------------ get as
// "Get as: kohya | ComfyUI | diffusers" beside a LoRA file: the layouts its run has not written for it (the server
// names the file training would have written, and leaves base models out). A click queues `dev2pro lora convert`;
// the job bar reports its end (api -> noteJob) and the list is loaded again to show the new file.
const LAYOUT_WORDS = { kohya: "kohya", comfy: "ComfyUI", diffusers: "diffusers" };
const converting = {};  // "lora|layout" -> the job queued from this page (its button says so until it ends)

async function loraOffers(run) {  // {lora: {layout: file it would be written to}}
  const r = await api("/api/lora/layouts?run=" + encodeURIComponent(run), undefined, { quiet: true })
    .catch(() => null);
  return Object.fromEntries((r ? r.files : []).map((f) => [f.lora, f.offers]));
}

function getAs(lora, offers) {
  const layouts = Object.keys(offers || {});
  if (!layouts.length) return "";
  const span = el("span", { class: "get-as" }, "Get as: ");
  layouts.forEach((layout, i) => {
    const busy = converting[lora + "|" + layout], words = LAYOUT_WORDS[layout] || layout;
    span.append(i ? " | " : "", el("button", { "data-layout": layout, "aria-label": "Get as " + words,
      title: `write ${offers[layout]} (dev2pro lora convert)`, text: busy ? words + ": queued" : words,
      ...(busy ? { disabled: "" } : {}), onclick: (e) => convertLora(lora, layout, e.target) }));
  });
  return span;
}

async function convertLora(lora, layout, button) {
  button.disabled = true;
  let job;
  try { job = await api("/api/lora/convert", { lora, layout }); }
  catch (e) { button.disabled = false; return; }  // api() showed the refusal
  converting[lora + "|" + layout] = job.id;
  button.textContent = LAYOUT_WORDS[layout] + ": " + job.status;
  toast("queued: " + job.title, true);
  for (;;) {  // as the sample and compare jobs are watched: their record, once a second, until it ends
    await new Promise((done) => setTimeout(done, 1000));
    const now = await api("/api/jobs/" + job.id, undefined, { quiet: true }).catch(() => null);
    if (now && ACTIVE_JOB.includes(now.status)) {
      button.textContent = LAYOUT_WORDS[layout] + ": " + now.status; continue;
    }
    delete converting[lora + "|" + layout];
    if (state.page === "results") await loadResults();
    return;
  }
}

// "Compare against": the LoRA's own run's other checkpoints, then same-model LoRAs of other runs (the server)
async function compareCandidates() {
  const lora = $("sample-lora").value;
  const r = lora ? await api("/api/compare/candidates?lora=" + encodeURIComponent(lora), undefined, { quiet: true })
    .catch(() => null) : null;
  if ($("sample-lora").value !== lora) return;
  fill($("compare-other"), r ? r.candidates : [], true, "(no LoRA: the base alone)");
}

// the label under a sample made on Results: which LoRA, at what strength, with which prompt(s)
function sampleLabel(req) {
  return `${req.lora.split("/").pop()} at strength ${Number(req.strength).toFixed(2)} · ` +
    (req.prompt.trim() ? "prompt: " + req.prompt.trim() : "the run's sample prompts");
}
