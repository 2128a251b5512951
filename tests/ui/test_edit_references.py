"""The Results page's sample and compare of an edit LoRA (``dev2pro.references`` in its file): the references the
page gives (workspace paths, one per line) or the run's ``sample.control`` become the job's ``--image`` / compare
``image``; an edit LoRA with none or another count is refused before a job is queued, naming the fix; a
text-to-image LoRA given references renders them as `dev2pro sample --image` does. ``/api/lora`` tells the page
which LoRAs are edit LoRAs (a header read). Jobs only queue (conftest ``web_app``)."""

import json
import re
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("starlette")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LORA = "runs/r1/lora.safetensors"


def _lora(path, references: int | None):
    """A LoRA file whose header says ``references`` per edit (None: no such key, as before edit LoRAs)."""
    meta = {"dev2pro.references": str(references)} if references is not None else {}
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4)}, str(path), metadata=meta)


@pytest.fixture
def app(web_app):
    """The conftest workspace with ref/a.png, ref/b.png and runs/r1's LoRA an edit LoRA of 2 references."""
    app, ws, out, ui = web_app
    (ws / "ref").mkdir()
    for name, colour in (("a", "red"), ("b", "blue"), ("c", "green")):
        Image.new("RGB", (64, 64), colour).save(ws / "ref" / f"{name}.png")
    _lora(ws / "runs" / "r1" / "lora.safetensors", 2)
    return app, ws, out, ui


def _post(asgi, app, route: str, **body) -> tuple[int, dict]:
    status, raw = asgi(app, "POST", route, json.dumps({"lora": LORA, **body}))
    return status, json.loads(raw)


def _set_control(ws, value: str):
    config = ws / "runs" / "r1" / "config.toml"
    text = re.sub(r"control = .*\n", "", config.read_text())
    config.write_text(text.replace("[sample]\n", f"[sample]\ncontrol = {value}\n"))


def _images(ui, job: dict) -> list[str]:
    args = ui.jobs.get(job["id"])["args"]
    return [args[i + 1] for i, a in enumerate(args) if a == "--image"]


def test_lora_endpoint_says_references_and_the_runs_control(app, asgi):
    app, ws, out, ui = app
    status, body = asgi(app, "GET", f"/api/lora?lora={LORA}")
    assert status == 200, body
    assert json.loads(body) == {"lora": LORA, "references": 2, "control": [], "control_problem": None,
                                "recommended": None}
    _set_control(ws, f'["{ws / "ref" / "a.png"}", "{ws / "ref" / "b.png"}"]')
    assert json.loads(asgi(app, "GET", f"/api/lora?lora={LORA}")[1])["control"] == ["ref/a.png", "ref/b.png"]
    _set_control(ws, f'"{out / "pic.png"}"')  # a control outside the workspace: said, never read
    d = json.loads(asgi(app, "GET", f"/api/lora?lora={LORA}")[1])
    assert d["control"] == [] and "outside the workspace" in d["control_problem"]
    for refs in (None, 0):  # a text-to-image LoRA: older files have no key
        _lora(ws / "runs" / "r1" / "lora.safetensors", refs)
        assert json.loads(asgi(app, "GET", f"/api/lora?lora={LORA}")[1])["references"] == 0
    (ws / "runs" / "r1" / "lora.safetensors").write_bytes(b"\0" * 16)  # unreadable header: text-to-image
    assert json.loads(asgi(app, "GET", f"/api/lora?lora={LORA}")[1])["references"] == 0
    status, body = asgi(app, "GET", "/api/lora?lora=loose.safetensors")
    assert status == 400 and b"not in a run folder" in body


def test_lora_endpoint_gives_the_calibrated_strength(app, asgi):
    """A LoRA `dev2pro calibrate --write` annotated: the page gets the strength (its slider starts there)."""
    from dev2pro.recipes.calibrate import _write_metadata

    app, ws, out, ui = app
    result = {"recommended_strength": 1.5, "target": str(ws / "klein-distilled"), "reference": "base",
              "target_sampling": {"variant": "klein-distilled"}, "reference_effect": 0.25}
    _write_metadata(ws / "runs" / "r1" / "lora.safetensors", result)
    rec = json.loads(asgi(app, "GET", f"/api/lora?lora={LORA}")[1])["recommended"]
    assert rec["strength"] == 1.5 and rec["target"] == "klein-distilled" and rec["target_variant"] == "klein-distilled"


@pytest.mark.parametrize("route", ["/api/sample", "/api/compare"])
def test_an_edit_lora_without_references_is_refused_naming_the_fix(app, asgi, route):
    app, ws, out, ui = app
    status, d = _post(asgi, app, route)
    assert status == 400
    assert d["error"] == ("lora.safetensors is an edit LoRA: trained on edit pairs with 2 reference image(s) per "
                          "edit, and no reference image is given or set in the run's config; give 2 reference "
                          "image(s) (workspace paths, one per line) or set sample.control in runs/r1/config.toml")
    status, d = _post(asgi, app, route, references="ref/a.png\n")
    assert status == 400 and "2 reference image(s) per edit; 1 given; give 2 reference image(s)" in d["error"]
    _set_control(ws, f'"{ws / "ref" / "a.png"}"')
    status, d = _post(asgi, app, route)
    assert status == 400 and "; 1 the run's sample.control (runs/r1/config.toml); give 2" in d["error"]
    assert d["error"].endswith("or fix sample.control")
    assert ui.jobs.list() == []  # nothing queued


def test_sample_edits_the_references_given_else_the_runs(app, asgi):
    app, ws, out, ui = app
    a, b, c = (str(ws / "ref" / f"{n}.png") for n in "abc")
    status, job = _post(asgi, app, "/api/sample", references="ref/b.png\n\n  ref/a.png  \n")
    assert status == 200, job
    assert _images(ui, job) == [b, a]  # in the order given, blank lines ignored
    _set_control(ws, f'["{a}", "{c}"]')
    status, job = _post(asgi, app, "/api/sample")  # the default: the run's sample.control
    assert status == 200 and _images(ui, job) == [a, c]
    status, job = _post(asgi, app, "/api/sample", references="ref/c.png\nref/b.png")  # the page's win
    assert status == 200 and _images(ui, job) == [c, b]


def test_compare_edits_the_references_given_in_every_arm(app, asgi):
    app, ws, out, ui = app
    status, job = _post(asgi, app, "/api/compare", references="ref/a.png\nref/b.png")
    assert status == 200, job
    config = tomllib.loads((ws / job["config"]).read_text())
    assert config["image"] == [str(ws / "ref" / "a.png"), str(ws / "ref" / "b.png")]


def test_compare_against_an_edit_lora_of_another_count_is_refused(app, asgi):
    """Every arm edits the same references: the other LoRA's count must match them too."""
    app, ws, out, ui = app
    (ws / "runs" / "r2").mkdir()
    _lora(ws / "runs" / "r2" / "one.safetensors", 1)
    status, d = _post(asgi, app, "/api/compare", references="ref/a.png\nref/b.png", other="runs/r2/one.safetensors")
    assert status == 400 and d["error"].startswith("one.safetensors is an edit LoRA: trained on edit pairs with 1 "
                                                   "reference image(s) per edit; 2 given; give 1"), d
    _lora(ws / "runs" / "r2" / "t2i.safetensors", 0)  # a text-to-image LoRA edits them too, as the CLI renders it
    status, job = _post(asgi, app, "/api/compare", references="ref/a.png\nref/b.png", other="runs/r2/t2i.safetensors")
    assert status == 200, job
    assert len(tomllib.loads((ws / job["config"]).read_text())["image"]) == 2


def test_a_text_to_image_lora_renders_references_as_the_cli_does(app, asgi):
    """`dev2pro sample --image` with a LoRA trained without references: rendered as asked (the CLI neither refuses
    nor notes it); none given: text-to-image, as before."""
    app, ws, out, ui = app
    _lora(ws / "runs" / "r1" / "lora.safetensors", 0)
    status, job = _post(asgi, app, "/api/sample", references="ref/a.png")
    assert status == 200 and _images(ui, job) == [str(ws / "ref" / "a.png")]
    status, job = _post(asgi, app, "/api/sample")
    assert status == 200 and _images(ui, job) == []


@pytest.mark.parametrize("refs, says", [("escape/pic.png", "outside the workspace"), ("../x.png", "contains '..'"),
                                        ("/etc/passwd", "is absolute"), ("ref/none.png", "does not exist"),
                                        ("ref", "is not a file"), ("mixed/c.png", "outside the workspace"),
                                        ("ref/a.png\n" * 11, "at most 10"), (5, "must be a string")])
@pytest.mark.parametrize("route", ["/api/sample", "/api/compare"])
def test_references_are_confined_to_the_workspace(app, asgi, route, refs, says):
    app, ws, out, ui = app
    status, d = _post(asgi, app, route, references=refs)
    assert status == 400 and says in d["error"], d
    assert "CANARY" not in json.dumps(d) and ui.jobs.list() == []


@pytest.mark.slow
@pytest.mark.skipif(not __import__("pathlib").Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium")
def test_results_page_asks_an_edit_lora_for_its_references(tmp_path, ui_server, browser_page):
    """In Chromium: an edit LoRA's run shows the reference field with its count; Sample without references is
    refused with the fix (no job); a text-to-image LoRA of the same run hides the field."""
    from .conftest import RUN_TOML

    ws = tmp_path / "ws"
    (ws / "runs" / "r1" / "logs").mkdir(parents=True)
    (ws / "runs" / "r1" / "config.toml").write_text(RUN_TOML.format(ws=ws))
    _lora(ws / "runs" / "r1" / "lora.safetensors", 2)
    _lora(ws / "runs" / "r1" / "plain.safetensors", 0)
    page = browser_page
    page.goto(ui_server.start(ws))
    page.click("#tab-results")
    page.wait_for_selector("#sample-refs-row:not([hidden])")
    assert page.inner_text("#sample-refs-hint").startswith("an edit LoRA: 2 reference image(s) per edit; give them")
    page.click("#sample-dev")
    page.wait_for_selector("#toast:has-text('is an edit LoRA')")
    assert "give 2 reference image(s)" in page.inner_text("#toast")
    page.select_option("#sample-lora", "runs/r1/plain.safetensors")
    page.wait_for_selector("#sample-refs-row", state="hidden")
