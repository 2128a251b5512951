"""The whole workflow in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): upload six
real photos, auto-caption them with a tiny captioner, edit a caption, train 20 steps on the tiny Flux family while
the loss plot and sample grids update, stop and resume, download the LoRA (checked with `dev2pro lora info`),
sample it on the inference base at a chosen strength and open a `dev2pro compare` report.

The web app is killed and restarted while the resumed run trains: the new one re-attaches to it.
Screenshots of every page go to ``<tmp>/screenshots`` (and to $DEV2PRO_UI_SCREENSHOTS when set).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import BROWSER_TEST

pytestmark = BROWSER_TEST
IMAGES = ("astronaut.png", "coffee.png", "chelsea.png", "camera.png", "rocket.jpg", "motorcycle_left.png")
T = 120_000  # ms: generous waits for a loaded 2-core machine; each normally takes a few seconds


@pytest.fixture
def workspace(tmp_path, env):
    """A workspace with a tiny Flux model and a tiny BLIP captioner (built in parallel)."""
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    cmds = [["init-tiny", str(ws / "models" / "tiny-dev")],
            ["init-tiny-captioner", str(ws / "models" / "captioner"), "--family", "blip"]]
    procs = [subprocess.Popen([sys.executable, "-m", "dev2pro.cli", *c], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in cmds]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out
    return ws


def shot(page, tmp_path, name):
    out = tmp_path / "screenshots"
    out.mkdir(exist_ok=True)
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
    if os.environ.get("DEV2PRO_UI_SCREENSHOTS"):
        Path(os.environ["DEV2PRO_UI_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(out / f"{name}.png", Path(os.environ["DEV2PRO_UI_SCREENSHOTS"]) / f"{name}.png")


def wait_status(page, selector, want):
    """Wait until ``selector``'s data-status is ``want`` or 'failed'; fail with the page's log on 'failed'."""
    page.wait_for_selector(f"{selector}[data-status='{want}'], {selector}[data-status='failed']")
    status = page.get_attribute(selector, "data-status")
    assert status == want, page.inner_text(selector) + "\n" + page.inner_text("#log-tail")


def wait_result(page, selector, workspace, kind, seconds=600):
    """Wait until ``selector`` is visible after a ``kind`` job (sample, compare) was started from the page; a job that
    failed fails the test at once with its log, one still running on a loaded machine gets up to ``seconds``."""
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if page.is_visible(selector):
            return
        jobs = sorted((workspace / ".dev2pro-ui" / "jobs").glob(f"*-{kind}/job.json"))
        record = json.loads(jobs[-1].read_text()) if jobs else {}
        if record.get("status") in ("failed", "stopped"):
            log = jobs[-1].parent / "log.txt"
            pytest.fail(f"the {kind} job {record['status']}: {log.read_text()[-3000:] if log.exists() else record}")
        page.wait_for_timeout(500)
    pytest.fail(f"{selector} not visible after {seconds} s; the {kind} job: {record}")


def fill_train_form(page):
    """Basics, then every Advanced group opened and filled (the ids are the config keys)."""
    page.select_option("#f-model-vram", "0")  # no GPU preset: the memory settings below are the schema's
    page.fill("#b-output-name", "ui-lora")
    page.click("#advanced > summary")
    page.evaluate("document.querySelectorAll('#advanced details').forEach(d => d.open = true)")
    values = {"model-dtype": "fp32", "data-resolution": "128", "data-bucket_step": "64", "lora-rank": "4",
              "lora-alpha": "4", "train-steps": "20", "train-lr": "0.01", "sample-every": "4", "sample-steps": "8",
              "sample-width": "128", "sample-height": "128", "save-every": "2",
              "log_every": "1"}
    for key, value in values.items():
        node = page.locator(f"#f-{key}")
        if node.evaluate("e => e.tagName") == "SELECT":
            node.select_option(value)
        else:
            node.fill(value)
    page.locator("#f-model-gradient_checkpointing").select_option("false")  # a choice: auto | true | false
    page.locator("#f-sample-prompts").fill("sks, a photo")
    page.locator("#f-save-formats").fill("kohya\ndiffusers")


def test_whole_workflow_in_chromium(tmp_path, workspace, browser_page, ui_server, capsys):
    page = browser_page
    url = ui_server.start(workspace)
    page.goto(url)

    # Models: the tiny folder is the training base, its transformer the inference base ("dev"); inspect shown
    page.wait_for_selector("#train-base option[value='models/tiny-dev']", state="attached")
    page.select_option("#inference-base", "models/tiny-dev/transformer")
    page.click("#save-models")
    page.click("#inspect-train")
    page.wait_for_function("document.getElementById('inspect-out').textContent.includes('layout')")
    page.select_option("#convert-src", "models/tiny-dev/transformer")
    page.fill("#convert-dst", "models/tiny-fp8.safetensors")
    page.click("#convert-fp8")  # queued: it runs before the caption job below (one job at a time)
    page.wait_for_function("document.getElementById('jobbar').textContent.includes('convert')")
    shot(page, tmp_path, "1-models")

    # Dataset: upload six real photos, auto-caption them all, edit one caption by hand
    page.click("#tab-dataset")
    page.fill("#dataset-folder", "datasets/set")
    src = Path(__import__("skimage").__file__).parent / "data"
    page.set_input_files("#upload-files", [str(src / n) for n in IMAGES])
    page.click("#upload")
    page.wait_for_function("document.querySelectorAll('#thumbs .thumb').length === 6")
    page.select_option("#captioner", "models/captioner")
    page.fill("#trigger", "sks")
    page.fill("#caption-max-length", "12")  # the tiny captioner babbles; keep it short
    page.fill("#caption-batch-size", "3")
    page.click("#caption-all")
    page.wait_for_selector("#caption-status[data-status='done'], #caption-status[data-status='failed']")
    assert "6 written" in page.inner_text("#caption-status"), page.inner_text("#caption-status")
    page.wait_for_function("[...document.querySelectorAll('#thumbs textarea')].every(t => t.value.startsWith('sks'))")
    first = page.locator("#thumbs textarea").first
    image = first.get_attribute("data-path")
    first.fill("sks, an edited caption")
    first.blur()
    page.wait_for_selector("#thumbs textarea[data-saved='1']")
    assert (workspace / image).with_suffix(".txt").read_text().strip() == "sks, an edited caption"
    assert len(list((workspace / "datasets" / "set").glob("*.txt"))) == 6
    assert (workspace / "models" / "tiny-fp8.safetensors").is_file()  # the convert job ran first
    assert "512x512 × 2" in page.inner_text("#bucket-preview")  # astronaut, camera; the rest wide/tall
    page.fill("#bucket-resolution", "64")
    page.dispatch_event("#bucket-resolution", "change")
    page.wait_for_function("document.getElementById('bucket-preview').textContent.includes('64x64 × 6')")
    shot(page, tmp_path, "2-dataset")

    # Train: the generated form; a bad value gets the CLI's message; the TOML preview; start
    page.click("#tab-train")
    page.wait_for_selector("#f-train-steps")
    assert page.input_value("#f-model-path") == "models/tiny-dev"
    fill_train_form(page)
    page.fill("#f-train-steps", "twenty")
    page.click("#preview-toml")
    page.wait_for_function("document.getElementById('train-error').textContent.includes('must be an integer')")
    page.fill("#f-train-steps", "20")
    page.click("#preview-toml")
    page.wait_for_function("document.getElementById('toml-preview').textContent.includes('steps = 20')")
    assert str(workspace / "datasets" / "set") in page.inner_text("#toml-preview")
    shot(page, tmp_path, "3-train")
    page.click("#start-train")

    # Monitor: loss plot grows, a sample grid appears; stop mid-run, then resume to the end
    page.wait_for_selector("#page-monitor:not([hidden])")
    page.wait_for_function("+document.getElementById('loss-plot').dataset.points >= 2")
    page.wait_for_selector("#sample-grid:not([hidden])")
    page.wait_for_function("+document.getElementById('run-status').dataset.step >= 2")  # a state is saved
    page.click("#stop-run")
    wait_status(page, "#run-status", "stopped")
    stopped_at = int(page.get_attribute("#run-status", "data-step"))
    assert 2 <= stopped_at < 20, stopped_at
    shot(page, tmp_path, "4-monitor-stopped")
    page.wait_for_selector("#resume-run:not([disabled])")
    page.click("#resume-run")
    page.wait_for_selector("#run-status[data-status='running']")
    records = lambda: [json.loads(p.read_text())  # noqa: E731
                       for p in sorted((workspace / ".dev2pro-ui" / "jobs").glob("*-train/job.json"))]
    resumed = records()[-1]
    # the web app crashes mid-run; the job lives in its own session; a new web app on the same port re-attaches
    ui_server.crash()
    ui_server.start(workspace, port=int(url.rsplit(":", 1)[1]))
    wait_status(page, "#run-status", "done")
    first, second = records()
    assert first["status"] == "stopped" and second["id"] == resumed["id"]
    assert second["status"] == "done" and second["pid"] == resumed["pid"]  # the same process ran to the end
    page.wait_for_function("document.getElementById('run-status').dataset.step === '20'")
    assert int(page.get_attribute("#loss-plot", "data-points")) == 20
    assert (workspace / "runs" / "ui-lora" / "samples" / "step000020.png").exists()
    shot(page, tmp_path, "5-monitor")

    # Results: download the LoRA and read it back with `dev2pro lora info`; sample at strength 0.5; compare
    page.click("#tab-results")
    # the LoRA file is named after the run (save.name follows the output name), not lora.safetensors for all
    page.wait_for_selector("a.download-lora:text-is('ui-lora.safetensors')")
    with page.expect_download() as dl:
        page.click("a.download-lora:text-is('ui-lora.safetensors')")
    assert dl.value.suggested_filename == "ui-lora.safetensors"
    lora = tmp_path / "downloaded.safetensors"
    dl.value.save_as(str(lora))
    assert lora.read_bytes() == (workspace / "runs" / "ui-lora" / "ui-lora.safetensors").read_bytes()
    from dev2pro.cli import main

    assert main(["lora", "info", str(lora)]) == 0  # `dev2pro lora info`, in this process (saves a start-up)
    info = capsys.readouterr().out  # text or JSON, depending on the version: check what both say
    assert re.search(r"layout\W+kohya", info) and re.search(r"ss_steps\W+20\b", info), info
    assert "transformer_blocks r=4 alpha=4" in info and "single_transformer_blocks r=4 alpha=4" in info
    page.locator("#strength").evaluate("e => { e.value = '0.5'; e.dispatchEvent(new Event('input')); }")
    page.click("#sample-dev")
    wait_result(page, "#sample-result:not([hidden])", workspace, "sample")
    page.click("#compare-run")
    wait_status(page, "#compare-status", "done")
    page.wait_for_selector("#compare-report:not([hidden])")
    report = page.frame_locator("#compare-report")
    assert "no LoRA" in report.locator("body").inner_text(timeout=T)
    shot(page, tmp_path, "6-results")
