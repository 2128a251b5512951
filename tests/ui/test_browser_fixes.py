"""The three page fixes in a real headless Chromium (Debian's /usr/bin/chromium): the Models page's convert offers
no LoRA as a source and has an overwrite box the server honours; the Dataset page's upload asks for a
folder instead of writing into the workspace root; the Monitor page shows the step a stopped run saved, not its
last logged one. Also: a job's end on the page that started it and Stop in the job bar's list; uploads with names
of any script, the replace box, a failed upload's grid, an unsaved caption kept over a redraw, shared captions
flagged; the caption tools (a prepend previewed, applied, undone) and Remove selected / Restore; the log box
following its newest lines."""

import json

import pytest
import torch
from safetensors.torch import save_file

from .conftest import BROWSER_TEST

pytestmark = BROWSER_TEST


@pytest.fixture
def workspace(tmp_path):
    from dev2pro.lora.formats import save_lora
    from dev2pro.lora.weights import LoraModule

    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    save_file({"img_in.weight": torch.zeros(4, 4)}, str(ws / "models" / "base.safetensors"))
    save_lora({"transformer_blocks.0.attn.to_out.0": LoraModule(torch.zeros(2, 8), torch.ones(8, 2), 2.0)},
              ws / "models" / "style.safetensors", "kohya")  # no "lora" in its name: its header tells
    (ws / "models" / "fp8.safetensors").write_bytes(b"an earlier output")
    run = ws / "runs" / "stopped"  # stopped at step 7: no event file, a complete state
    (run / "state" / "step-000007").mkdir(parents=True)
    (run / "state" / "step-000007" / "common.json").write_text(json.dumps({"step": 7}))
    (run / "state" / "step-000007" / "common.safetensors").write_bytes(b"x")
    (run / "config.toml").write_text("[train]\nsteps = 10\n")
    return ws


def toast_says(page, text):
    page.wait_for_function("t => !document.getElementById('toast').hidden && "
                           "document.getElementById('toast').textContent.includes(t)", arg=text)
    return page.inner_text("#toast")


def test_convert_upload_and_monitor_fixes_in_chromium(workspace, browser_page, ui_server):
    page = browser_page
    page.goto(ui_server.start(workspace))
    page.wait_for_selector("#convert-src option[value='models/base.safetensors']", state="attached")
    # a LoRA is not offered as a source (its header says so, whatever its name); the route refuses one anyway
    # (tests/ui/test_convert_upload_web.py), naming `dev2pro lora convert`
    assert page.locator("#convert-src option[value='models/style.safetensors']").count() == 0
    page.select_option("#convert-src", "models/base.safetensors")
    page.fill("#convert-dst", "models/fp8.safetensors")
    page.click("#convert-fp8")
    toast_says(page, "already exists; tick 'overwrite'")
    page.check("#convert-overwrite")
    page.click("#convert-fp8")
    toast_says(page, "queued: convert models/base.safetensors -> models/fp8.safetensors (fp8) (overwrite)")
    # the job's end is reported on the page that started it (its line there, and a toast), with the error line
    page.wait_for_selector("#convert-status[data-status]")
    ended = page.get_attribute("#convert-status", "data-status")
    line = page.inner_text("#convert-status")
    assert ended in ("done", "failed") and line.startswith("convert " + ended), line
    assert ended == "done" or len(line) > len("convert failed: "), line  # a failure names its reason
    # the jobs list under the job bar: the convert job, and Stop for a job still queued or running
    page.click("#jobbar")
    page.wait_for_selector(f"#jobs-panel .job[data-status='{ended}']")
    page.fill("#convert-dst", "models/fp8-b.safetensors")
    page.click("#convert-fp8")
    page.locator("#jobs-panel .job .stop-job").first.click()
    page.wait_for_selector("#jobs-panel .job[data-status='stopped']")
    stopped = page.locator("#jobs-panel .job[data-status='stopped'] .job-title").inner_text()
    assert "-> models/fp8-b.safetensors (fp8)" in stopped, stopped
    page.click("#jobbar")

    page.click("#tab-dataset")
    page.fill("#dataset-folder", "")
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (32, 32)).save(workspace.parent / "photo.png")
    page.set_input_files("#upload-files", [str(workspace.parent / "photo.png")])
    page.click("#upload")
    toast_says(page, "choose the dataset folder to upload into")
    assert page.evaluate("document.activeElement.id") == "dataset-folder"
    assert not list(workspace.rglob("photo*.png"))  # nothing uploaded anywhere, the root included

    # names of any script, all-or-nothing, the "replace files with the same name" box; the grid never shows
    # another folder's images after a failed upload; a caption typed but not blurred survives a redraw
    up = workspace.parent / "up"
    up.mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(up / "猫.png")
    Image.new("RGB", (32, 32), (0, 200, 0)).save(up / "犬.png")
    (up / "notes.png").write_text("not an image")
    page.fill("#dataset-folder", "datasets/intl")
    page.set_input_files("#upload-files", [str(up / "猫.png"), str(up / "犬.png")])
    page.click("#upload")
    toast_says(page, "uploaded 2 images")
    page.wait_for_function("document.querySelectorAll('#thumbs .thumb').length === 2")
    page.fill("#thumbs textarea[data-path='datasets/intl/猫.png']", "a red square")
    page.evaluate("loadDataset()")  # a redraw (a caption job ending, an upload) while the box still has focus
    page.wait_for_function("() => { const t = document.querySelector("
                           "\"#thumbs textarea[data-path='datasets/intl/猫.png']\");"
                           " return t && t.dataset.orig === 'a red square'; }")
    assert (workspace / "datasets" / "intl" / "猫.txt").read_text() == "a red square\n"
    page.set_input_files("#upload-files", [str(up / "猫.png")])
    page.click("#upload")
    toast_says(page, "datasets/intl/猫.png already exists; rename the file(s) or tick 'replace files with the "
                     "same name'")
    page.check("#upload-overwrite")
    page.set_input_files("#upload-files", [str(up / "猫.png")])
    page.click("#upload")
    toast_says(page, "uploaded 1 images (1 replaced)")
    page.fill("#dataset-folder", "datasets/nothere")
    page.set_input_files("#upload-files", [str(up / "犬.png"), str(up / "notes.png")])
    page.click("#upload")
    toast_says(page, "'notes.png' is not a readable image")
    page.wait_for_function("document.querySelectorAll('#thumbs .thumb').length === 0")  # not intl's images
    assert not (workspace / "datasets" / "nothere").exists()
    for ext in ("png", "jpg"):  # two images, one caption file
        Image.new("RGB", (32, 32)).save(workspace / "datasets" / "intl" / f"cat.{ext}")
    page.fill("#dataset-folder", "datasets/intl")
    page.click("#load-folder")
    page.wait_for_function("document.querySelectorAll('#thumbs .shared-caption').length === 2")
    assert "cat.jpg and cat.png share cat.txt" in page.inner_text("#bucket-preview")

    # the caption tools: a prepend previewed (nothing written), applied (the shared cat.txt once), later undone;
    # an image removed into .removed/ with its caption, gone from the grid, restored from the Removed list
    intl = workspace / "datasets" / "intl"
    page.fill("#bulk-text", "sks")
    page.click("#bulk-preview")
    page.wait_for_selector("#bulk-counts")
    assert page.inner_text("#bulk-counts") == "would change 1 caption, would create 2 (images without a caption " \
                                              "file); 0 unchanged"
    assert page.inner_text("#bulk-out tr[data-caption='datasets/intl/猫.txt'] td.after") == "sks, a red square"
    assert not (intl / "cat.txt").exists()
    page.click("#bulk-apply")
    wait_caption = "([p, v]) => { const t = document.querySelector(`#thumbs textarea[data-path='${p}']`);" \
                   " return t && t.value === v; }"
    page.wait_for_function(wait_caption, arg=["datasets/intl/猫.png", "sks, a red square"])
    assert page.input_value("#thumbs textarea[data-path='datasets/intl/cat.jpg']") == "sks"
    assert (intl / "猫.txt").read_text() == "sks, a red square\n" and (intl / "cat.txt").read_text() == "sks\n"
    page.check("#thumbs .thumb[data-path='datasets/intl/犬.png'] .select")
    page.click("#remove-selected")
    page.wait_for_function("document.querySelectorAll('#thumbs .thumb').length === 3")
    assert page.locator("#thumbs .thumb[data-path='datasets/intl/犬.png']").count() == 0
    assert sorted(p.name for p in (intl / ".removed").glob("犬*")) == ["犬.png", "犬.txt"]
    assert page.inner_text("#removed-count") == "1"
    page.click("#removed-box summary")
    page.click("#removed-list li[data-path='datasets/intl/.removed/犬.png'] .restore")
    page.wait_for_function("document.querySelectorAll('#thumbs .thumb').length === 4")
    assert page.is_hidden("#removed-box") and (intl / "犬.txt").read_text() == "sks\n"
    page.click("#bulk-undo")
    page.wait_for_function(wait_caption, arg=["datasets/intl/猫.png", "a red square"])
    assert (intl / "猫.txt").read_text() == "a red square\n" and not (intl / "cat.txt").exists()

    # the log box follows its newest lines, unless the user scrolled up to read
    box = "(() => { const p = document.createElement('pre'); p.className = 'out'; p.id = 'log-probe';" \
          " document.body.append(p); return true; })()"
    page.evaluate(box)
    lines = "Array.from({length: %d}, (_, i) => 'line ' + i).join('\\n')"
    page.evaluate(f"showLog(document.getElementById('log-probe'), {lines % 200})")
    at = page.evaluate("(() => { const p = document.getElementById('log-probe');"
                       " return [p.scrollTop, p.scrollHeight, p.clientHeight]; })()")
    assert at[1] > at[2] and at[0] + at[2] >= at[1] - 2, at  # scrolled to the bottom
    page.evaluate("(() => { const p = document.getElementById('log-probe'); p.scrollTop = 0;"
                  " p.dispatchEvent(new Event('scroll')); })()")
    page.evaluate(f"showLog(document.getElementById('log-probe'), {lines % 201})")
    assert page.evaluate("document.getElementById('log-probe').scrollTop") == 0

    page.click("#tab-monitor")
    page.wait_for_selector("#run-select option[value='runs/stopped']", state="attached")
    page.select_option("#run-select", "runs/stopped")
    page.wait_for_selector("#run-status[data-step='7']")
    assert "step 7/10 (saved state step-000007; the last logged step is 0)" in page.inner_text("#run-status")
