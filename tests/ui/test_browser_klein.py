"""In Chromium: choosing a FLUX.2 klein Base folder on the Models page offers its distilled model as inference
base (the samples then show the LoRA where it is used), and the choice is what Save carries to the Train page."""

import json
import shutil
import urllib.request

from .conftest import BROWSER_TEST

pytestmark = BROWSER_TEST


def test_klein_base_gets_its_distilled_model_as_inference_base(tmp_path, klein_base_dir, klein_distilled_dir,
                                                                browser_page, ui_server):
    ws = tmp_path / "ws"
    shutil.copytree(klein_base_dir, ws / "models" / "klein-base")
    shutil.copytree(klein_distilled_dir, ws / "models" / "klein")
    url = ui_server.start(ws)
    page = browser_page
    page.goto(url)
    page.wait_for_selector("#train-base option[value='models/klein-base']", state="attached")
    page.select_option("#train-base", "models/klein-base")
    assert page.input_value("#inference-base") == "models/klein/transformer"
    assert "the distilled klein" in page.text_content("#toast")
    page.click("#save-models")
    # the suggestion's toast is already "ok": wait for the save's own message, not any green toast
    page.wait_for_selector("#toast.ok:has-text('models saved')")
    with urllib.request.urlopen(urllib.request.Request(f"{url}/api/models", headers={"x-dev2pro-ui": "1"})) as r:
        settings = json.loads(r.read())["settings"]
    assert settings["train_base"] == "models/klein-base" and settings["inference_base"] == "models/klein/transformer"
    page.select_option("#inference-base", "")  # "(the training base)": the user's own choice
    page.select_option("#train-base", "models/klein")  # a base without a distilled partner: nothing is offered
    assert page.input_value("#inference-base") == ""
