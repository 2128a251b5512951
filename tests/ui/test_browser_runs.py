"""The audit's Monitor/Results/Train page fixes in a real headless Chromium (Debian's /usr/bin/chromium): a finished
run shows no speed or ETA and a constant lr's axis stays positive; sample thumbnails carry their step and a click
names the grid shown; a run without samples clears the caption; the run dropdown says status and date; Results for
a failed run says it failed and hides sample/compare, a finished one's "Get as diffusers" writes and lists the
LoRA's diffusers file; Basics save and sample about every quarter of the steps."""

import json
import time

import pytest

from .conftest import BROWSER_TEST

pytestmark = BROWSER_TEST


@pytest.fixture
def workspace(tmp_path):
    import torch
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    from dev2pro.lora.formats import LoraModule, save_lora

    ws = tmp_path / "ws"
    done = ws / "runs" / "done"
    (done / "samples").mkdir(parents=True)
    (done / "config.toml").write_text('[train]\nsteps = 20\n[model]\npath = ""\n[sample]\nseeds = [1]\n')
    w = SummaryWriter(str(done / "logs"))
    for s in range(1, 21):
        w.add_scalar("loss/step", 1.0 / s, s, walltime=1000 + s)
        w.add_scalar("lr", 1e-4, s, walltime=1000 + s)  # a constant schedule
    w.close()
    for step in (10, 20):
        Image.new("RGB", (16, 16), (step * 10, 0, 0)).save(done / "samples" / f"step{step:06d}.png")
    save_lora({"transformer_blocks.0.attn.to_q": LoraModule(torch.ones(2, 8), torch.ones(8, 2), 2.0)},
              done / "done.safetensors", "kohya")
    (done / "summary.json").write_text(json.dumps({"steps": 20}))
    failed = ws / "runs" / "failed"
    (failed / "logs").mkdir(parents=True)
    (failed / "config.toml").write_text("[train]\nsteps = 20\n")
    job = ws / ".dev2pro-ui" / "jobs" / "20250101-000000-001-train"
    job.mkdir(parents=True)
    (job / "job.json").write_text(json.dumps({
        "id": job.name, "kind": "train", "title": "train runs/failed", "args": [], "run_dir": "runs/failed",
        "out": "", "status": "failed", "created": time.time(), "started": time.time(), "ended": time.time(),
        "pid": None, "pid_started": None, "returncode": 1, "stop_requested": False, "error": ""}))
    return ws


def test_monitor_results_and_basics_in_chromium(workspace, browser_page, ui_server):
    page = browser_page
    page.goto(ui_server.start(workspace))
    page.click("#tab-monitor")
    page.wait_for_selector("#run-select option[value='runs/done']", state="attached")
    labels = page.eval_on_selector_all("#run-select option", "os => os.map(o => o.textContent)")
    assert any(t.startswith("runs/failed — failed · ") for t in labels), labels
    page.select_option("#run-select", "runs/done")
    page.wait_for_selector("#sample-list figcaption")
    status = page.inner_text("#run-status")
    assert status.startswith("finished · step 20/20") and "it/s" not in status and "ETA" not in status, status
    lr_labels = page.eval_on_selector_all("#lr-plot text", "ts => ts.map(t => t.textContent)")
    assert not any(t.startswith("-") for t in lr_labels), lr_labels  # no negative learning rate
    assert page.eval_on_selector_all("#sample-list figcaption", "cs => cs.map(c => c.textContent)") == \
        ["step 10", "step 20"]
    assert "step 20" in page.inner_text("#sample-caption")
    page.click("#sample-list figure:first-child")
    assert "step 10 (step000010.png)" in page.inner_text("#sample-caption")
    assert page.get_attribute("#sample-grid", "data-path") == "runs/done/samples/step000010.png"
    page.select_option("#run-select", "runs/failed")
    page.wait_for_function("document.getElementById('sample-caption').textContent.includes('none yet')")
    assert page.locator("#sample-list figure").count() == 0

    page.click("#tab-results")
    page.wait_for_selector("#results-run option[value='runs/failed']", state="attached")
    page.select_option("#results-run", "runs/failed")
    page.wait_for_function("document.getElementById('results-pending-text').textContent.includes('failed')")
    assert page.locator("#results-actions").is_hidden()
    page.select_option("#results-run", "runs/done")
    page.wait_for_selector("#results-actions:not([hidden])")
    page.click("#lora-files button[aria-label='Get as diffusers']")  # a `dev2pro lora convert` job
    new = page.wait_for_selector("#lora-files li:has(a[download='done.diffusers.safetensors'])")
    assert "diffusers / PEFT" in new.inner_text() and (workspace / "runs/done/done.diffusers.safetensors").is_file()
    offered = page.eval_on_selector_all("#lora-files button[data-layout]", "bs => bs.map(b => b.dataset.layout)")
    assert offered == ["comfy", "comfy"], offered  # both files: the one layout the run has not written yet

    page.click("#tab-train")
    page.wait_for_selector("#f-save-every")
    page.fill("#f-train-steps", "1000")
    assert page.input_value("#f-save-every") == "250" and page.input_value("#f-sample-every") == "0"  # no prompts
    page.fill("#f-sample-prompts", "a cat")
    assert page.input_value("#f-sample-every") == "250"
    page.fill("#b-output-name", "my-style")
    assert page.input_value("#f-save-name") == "my-style"
    assert "typical 16-64" in page.inner_text("[data-field='lora.rank'] .help")
