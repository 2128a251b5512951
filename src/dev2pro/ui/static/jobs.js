// dev2pro web app: the job bar's jobs list (running, queued, recent; Stop), how every job ends (a toast on the
// page in view, success or the error line), the Monitor's log box (newest lines in view), and the Dataset page's
// upload and unsaved captions. Loaded before app.js: only definitions here, app.js calls them (it owns $, api, el).
"use strict";
const ACTIVE_JOB = ["queued", "running"];
const jobsSeen = {};  // job id -> the status this page last saw (an end is reported once, when it is seen)

function renderJobs(jobs) {
  const active = jobs.filter((j) => ACTIVE_JOB.includes(j.status)).reverse();
  $("jobbar").textContent = (active.length ? active.map((j) => `${j.status}: ${j.title}`).join(" · ")
    : "no jobs running") + " ▾";
  $("jobbar").dataset.active = active.length;
  for (const j of jobs) {  // a job this page saw queued or running has ended: say how, whichever page is open
    const before = jobsSeen[j.id];
    if (before && ACTIVE_JOB.includes(before) && !ACTIVE_JOB.includes(j.status)) reportJobEnd(j);
    jobsSeen[j.id] = j.status;
  }
  const panel = $("jobs-panel");
  if (panel.hidden) return;
  const recent = jobs.filter((j) => !ACTIVE_JOB.includes(j.status)).slice(0, 8);
  const key = [...active, ...recent].map((j) => j.id + j.status + j.error).join("|");
  if (panel.dataset.key === key) return;  // unchanged: a Stop button is not redrawn under the pointer
  panel.dataset.key = key; panel.innerHTML = "";
  if (!active.length && !recent.length) panel.append(el("div", { class: "status", text: "no jobs yet" }));
  for (const j of [...active, ...recent]) {
    const when = new Date(1000 * (j.ended || j.started || j.created)).toLocaleTimeString();
    panel.append(el("div", { class: "job", "data-job": j.id, "data-status": j.status },
      el("span", { class: "job-status", text: j.status }), el("span", { class: "job-title", text: j.title }),
      el("span", { class: "status", text: when }),
      ACTIVE_JOB.includes(j.status) ? el("button", { class: "danger stop-job", text: "Stop",
        title: j.status === "queued" ? "cancel it before it starts" : "stop it like Ctrl-C (training saves a state)",
        onclick: () => stopJob(j.id) }) : "",
      j.error ? el("div", { class: "job-error", text: j.error }) : ""));
  }
}

function noteJob(data) {  // a job record the server just sent (queued by this page): watched until it ends
  if (data && typeof data.id === "string" && data.kind && ACTIVE_JOB.includes(data.status) && !jobsSeen[data.id]) {
    jobsSeen[data.id] = data.status;
  }
}

function reportJobEnd(j) {
  const what = `${j.kind} ${j.status}`;
  if (j.status === "done") toast(`${what}: ${j.title}`, true);
  else toast(`${what}: ${j.error || j.title}`);
  const status = j.kind === "convert" ? $("convert-status") : null;  // the page that started it keeps the line
  if (status && status.dataset.job === j.id) {
    status.textContent = `${what}` + (j.error ? `: ${j.error}` : ""); status.dataset.status = j.status;
  }
}

async function stopJob(id) {
  const j = await api(`/api/jobs/${id}/stop`, {});
  toast(j.status === "stopped" ? "cancelled: " + j.title : "stopping: " + j.title, true);
  await pollJobs();
}

function toggleJobs() {
  $("jobs-panel").hidden = !$("jobs-panel").hidden; $("jobs-panel").dataset.key = "";
  pollJobs().catch(() => {});
}

// the log box shows its newest lines, unless the user scrolled up to read (then it stays where it is)
function showLog(pre, text) {
  if (!pre.dataset.follow) {
    pre.dataset.follow = "1";
    pre.addEventListener("scroll", () => {
      pre.dataset.follow = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24 ? "1" : "0";
    });
  }
  if (pre.textContent !== text) pre.textContent = text;
  if (pre.dataset.follow === "1") pre.scrollTop = pre.scrollHeight;
}

// the Monitor status line: why a run's job failed or stopped (its error line, or the state it saved)
function showRunEnd(r) {
  const j = r.job;
  if (j && j.error && ["failed", "stopped"].includes(j.status) && r.status !== "finished") {
    $("run-status").textContent += " · " + j.error;  // not for a refused job whose run another process finished
  }
}

// ------------------------------------------------------------------------------------------------ dataset
// a caption typed but not yet saved (no blur): saved before the grid is drawn again
async function saveTypedCaptions() {
  for (const ta of document.querySelectorAll("#thumbs textarea.caption")) {
    if (ta.value === ta.dataset.orig) continue;
    await api("/api/caption", { image: ta.dataset.path, text: ta.value });
    ta.dataset.orig = ta.value;
  }
}

function captionClashes(d) {  // cat.png and cat.jpg share cat.txt: one caption for two images
  return !d.caption_clashes || !d.caption_clashes.length ? "" : " · shared captions: " + d.caption_clashes
    .map((c) => `${c.images.join(" and ")} share ${c.caption.split("/").pop()} (rename one)`).join("; ");
}

async function upload() {
  const files = $("upload-files").files;
  if (!files.length) return toast("choose image files first");
  const folder = $("dataset-folder").value.trim();  // a dataset folder, never the workspace root (the server agrees)
  if (!folder) { $("dataset-folder").focus(); return toast("choose the dataset folder to upload into (Folder)"); }
  await saveTypedCaptions();
  const fd = new FormData();
  fd.append("folder", folder);
  if ($("upload-overwrite").checked) fd.append("overwrite", "1");
  for (const f of files) fd.append("files", f, f.name);
  let r;
  try { r = await api("/api/upload", fd); }
  catch (e) {  // nothing was saved: show the typed folder (or nothing), never the folder opened before
    state.folder = null; state.settings.dataset = folder; await loadDataset(); return;
  }
  const renamed = r.renamed.length ? "; saved as " + r.renamed.map((x) => `${x.from} → ${x.to}`).join(", ") : "";
  toast(`uploaded ${r.saved.length} images` + (r.replaced.length ? ` (${r.replaced.length} replaced)` : "") +
    renamed, true);
  $("upload-files").value = "";
  await api("/api/settings", { dataset: r.folder });
  state.settings.dataset = r.folder; await loadDataset();
}
