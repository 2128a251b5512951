"""`dev2pro caption` on tiny random-weight captioners of each family (real transformers classes, built offline).

The captions are nonsense, but deterministic and image-dependent, so the tests can compare them exactly: across
batch sizes, across runs, with and without a trigger word, and between what --json reported and what was written.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dev2pro.caption import caption_images, detect_family, load_captioner
from dev2pro.caption_tiny import TINY_FAMILIES, write_tiny_captioner
from dev2pro.cli import main
from dev2pro.errors import UserError
from dev2pro.recipes.caption import run_caption

SK_NAMES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="session")
def captioners(tmp_path_factory):
    """family -> tiny captioner folder, each written once per session on first use."""
    root, built = tmp_path_factory.mktemp("captioners"), {}

    def get(family):
        if family not in built:
            built[family] = write_tiny_captioner(root / family, family, seed=0)
        return built[family]
    return get


@pytest.fixture(scope="session")
def loaded(captioners):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_captioner(captioners(family), device="cpu")
        return cache[family]
    return get


@pytest.fixture
def folder(tmp_path, sk_images):
    """Four real photos (astronaut already captioned), a garbage .png and an empty .jpg."""
    d = tmp_path / "imgs"
    d.mkdir()
    for name in SK_NAMES:
        shutil.copy(sk_images / name, d / name)
    (d / "astronaut.txt").write_text("an astronaut in a white suit\n")
    (d / "bad.png").write_bytes(b"this is not a png")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.md").write_text("not an image")
    return d


def _photos(sk_images, n=4):
    return [Image.open(sk_images / name).convert("RGB") for name in SK_NAMES[:n]]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_each_family_loads_offline_and_captions_every_image(family, captioners, loaded, sk_images):
    folder = captioners(family)
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert detect_family(folder) == {"qwen2_5_vl": "qwen", "qwen3_vl": "qwen"}.get(family, family)
    cap = loaded(family)
    captions = caption_images(cap, _photos(sk_images), max_new_tokens=8)
    assert len(captions) == 4 and all(c.strip() for c in captions)
    assert all("\n" not in c and "\ufffd" not in c for c in captions)
    assert len(set(captions)) >= 2  # the image reaches the decoder: not one caption for every input


def test_each_family_gets_its_real_prompt_format(loaded, sk_images):
    from dev2pro.caption import _inputs

    images = _photos(sk_images, 2)
    flo = loaded("florence2")
    inputs, skip = _inputs(flo, images, "<MORE_DETAILED_CAPTION>")
    text = flo.processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)
    assert text == "Describe with a paragraph what is shown in the image." and skip == 0  # the task token's sentence
    n_image = int((inputs["input_ids"][0] == flo.processor.tokenizer.image_token_id).sum())
    assert n_image == flo.processor.image_processor.image_seq_length == 65  # 8x8 DaViT grid + pooled token
    with pytest.raises(UserError, match="not valid for this florence2 model"):
        _inputs(flo, images, "<CAPTION> of a cat")  # a task token must stand alone

    qwen = loaded("qwen2_5_vl")
    inputs, skip = _inputs(qwen, images, "Describe it.")
    text = qwen.processor.decode(inputs["input_ids"][0])
    assert text.endswith("<|vision_end|>Describe it.<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>user\n<|vision_start|><|image_pad|>" in text and skip == inputs["input_ids"].shape[1]
    pads = (inputs["input_ids"] == qwen.processor.convert_tokens_to_ids("<|image_pad|>")).sum(1).tolist()
    assert pads == [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]  # one token per merged 2x2 patch group
    assert inputs["attention_mask"][:, -1].all()  # left padding: every prompt ends where generation starts
    qwen3 = loaded("qwen3_vl")
    inputs, _ = _inputs(qwen3, images, "Describe it.")
    assert qwen3.processor.decode(inputs["input_ids"][0], skip_special_tokens=False).replace("<|endoftext|>", "") \
        .startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")  # Qwen3-VL: no default system turn
    assert qwen3.image_processor.patch_size == 16

    blip = loaded("blip")
    assert all(c.startswith("a picture of ") for c in caption_images(blip, images, max_new_tokens=4))
    assert all(c.startswith("a photo of ") for c in caption_images(blip, images, "a photo of", 4))
    assert not any(c.startswith("a picture of") for c in caption_images(blip, images, "", 4))  # unconditional


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batching_gives_the_same_captions_as_one_at_a_time(family, loaded, sk_images):
    cap, images = loaded(family), _photos(sk_images)  # four sizes: Qwen prompts differ in length and get padded
    one = caption_images(cap, images, max_new_tokens=10, batch_size=1)
    assert caption_images(cap, images, max_new_tokens=10, batch_size=3) == one
    assert caption_images(cap, images, max_new_tokens=10, batch_size=4) == one


def _captions(folder):
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


def test_skip_existing_vs_overwrite(folder, captioners):
    model = captioners("blip")
    first = run_caption(folder, model, max_length=6, progress=False)
    status = {r.image: r.status for r in first}
    assert status == {"astronaut.png": "skipped", "bad.png": "error", "chelsea.png": "written",
                      "coffee.png": "written", "empty.jpg": "error", "rocket.jpg": "written"}
    files = _captions(folder)
    assert files["astronaut.txt"] == "an astronaut in a white suit\n"  # never touched without --overwrite
    assert {r.image: r.caption + "\n" for r in first if r.status == "written"} == {
        name.replace(".txt", ext): files[name] for name, ext in
        (("chelsea.txt", ".png"), ("coffee.txt", ".png"), ("rocket.txt", ".jpg"))}

    again = run_caption(folder, model, max_length=6, progress=False)  # skip-existing: nothing left to do
    assert {r.image: r.status for r in again if r.status != "error"} == dict.fromkeys(
        ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"], "skipped")
    assert _captions(folder) == files

    (folder / "coffee.txt").write_text("  \n")  # an empty caption counts as none
    assert {r.image: r.status for r in run_caption(folder, model, max_length=6, progress=False)}["coffee.png"] \
        == "written"
    assert _captions(folder) == files

    over = run_caption(folder, model, max_length=6, overwrite=True, progress=False)
    assert sorted(r.image for r in over if r.status == "written") == [
        "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
    redone = _captions(folder)
    assert redone["astronaut.txt"] != files["astronaut.txt"] and redone["astronaut.txt"].startswith("a picture of")
    assert {k: v for k, v in redone.items() if k != "astronaut.txt"} == {
        k: v for k, v in files.items() if k != "astronaut.txt"}  # deterministic: same images, same captions


def test_a_caption_typed_during_the_run_is_kept(folder, captioners, monkeypatch):
    """Skip-existing is checked again right before writing: an edit made while the model ran is not clobbered."""
    import dev2pro.caption as C

    real = C.caption_images

    def slow_user(captioner, images, *args, **kwargs):
        (folder / "coffee.txt").write_text("typed by hand\n")  # appears while the batch is being captioned
        return real(captioner, images, *args, **kwargs)
    monkeypatch.setattr(C, "caption_images", slow_user)
    (folder / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \xff")
    results = {r.image: r for r in run_caption(folder, captioners("blip"), max_length=4, batch_size=4,
                                               progress=False)}
    assert (results["coffee.png"].status, results["coffee.png"].caption) == ("skipped", "typed by hand")
    assert (folder / "coffee.txt").read_text() == "typed by hand\n"
    assert results["bad.png"].status == "error" and "not UTF-8" in results["bad.png"].error
    assert results["chelsea.png"].status == results["rocket.jpg"].status == "written"


def test_trigger_prefixes_each_new_caption(folder, captioners):
    model = captioners("florence2")
    plain = {r.image: r.caption for r in run_caption(folder, model, max_length=6, progress=False)
             if r.status == "written"}
    trig = run_caption(folder, model, max_length=6, trigger="ohwx", overwrite=True, progress=False)
    written = {r.image: r.caption for r in trig if r.status == "written"}
    assert written["astronaut.png"].startswith("ohwx, ")
    for image, caption in plain.items():
        assert written[image] == f"ohwx, {caption}"
        assert (folder / image).with_suffix(".txt").read_text(encoding="utf-8") == f"ohwx, {caption}\n"


def test_bad_images_are_listed_and_skipped(folder, captioners, capsys):
    png = (folder / "coffee.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    results = {r.image: r for r in run_caption(folder, captioners("blip"), max_length=4, progress=False)}
    for name in ("bad.png", "empty.jpg", "truncated.png"):
        assert results[name].status == "error" and results[name].caption is None
        assert not (folder / name).with_suffix(".txt").exists()
    assert results["empty.jpg"].error == "empty file"
    assert results["bad.png"].error.startswith("unreadable: ")
    err = capsys.readouterr().err
    assert "3 image(s) cannot be read and are skipped" in err
    assert str(folder / "bad.png") in err and str(folder / "truncated.png") in err
    assert all(results[n].status == "written" for n in ("chelsea.png", "coffee.png", "rocket.jpg"))
    assert "notes.md" not in results


def test_files_subset(folder, captioners):
    model = captioners("blip")
    results = run_caption(folder, model, max_length=4, files=["rocket.jpg", " coffee.png", "rocket.jpg"],
                          progress=False)
    assert [(r.image, r.status) for r in results] == [("rocket.jpg", "written"), ("coffee.png", "written")]
    assert sorted(_captions(folder)) == ["astronaut.txt", "coffee.txt", "rocket.txt"]
    for bad, message in ((["../x.png"], "outside"), ([str(folder / "coffee.png")], "outside"),
                         (["missing.png"], "not in"), (["notes.md"], "not an image")):
        with pytest.raises(UserError, match=message):
            run_caption(folder, model, files=bad, progress=False)
    (folder.parent / "secret.png").write_bytes((folder / "coffee.png").read_bytes())
    (folder / "link.png").symlink_to(folder.parent / "secret.png")
    with pytest.raises(UserError, match="outside"):
        run_caption(folder, model, files=["link.png"], progress=False)


def test_cli_json_lines_are_parseable_and_match_the_files(folder, captioners, capsys):
    rc = main(["caption", str(folder), "--model", str(captioners("qwen2_5_vl")), "--json", "--max-length", "5",
               "--batch-size", "2", "--trigger", "ohwx", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert all(set(d) == {"image", "caption", "status", "error"} for d in lines)
    by_image = {d["image"]: d for d in lines}
    assert sorted(by_image) == ["astronaut.png", "bad.png", "chelsea.png", "coffee.png", "empty.jpg", "rocket.jpg"]
    assert by_image["astronaut.png"] == {"image": "astronaut.png", "caption": "an astronaut in a white suit",
                                         "status": "skipped", "error": None}
    assert by_image["bad.png"]["status"] == "error" and by_image["bad.png"]["error"]
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        d = by_image[name]
        assert d["status"] == "written" and d["error"] is None and d["caption"].startswith("ohwx, ")
        assert (folder / name).with_suffix(".txt").read_text(encoding="utf-8") == d["caption"] + "\n"
    assert "captioned 3, skipped 1" in err


def test_cli_errors_and_init_tiny_captioner(tmp_path, folder, captioners, capsys):
    assert main(["init-tiny-captioner", str(tmp_path / "b"), "--family", "blip", "--seed", "3"]) == 0
    assert (tmp_path / "b" / "model.safetensors").is_file()
    assert main(["init-tiny-captioner", str(tmp_path / "b"), "--family", "blip"]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "b" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["caption", str(folder), "--model", str(tmp_path / "b")]) == 2
    assert "model_type 'llama' is not a supported captioner" in capsys.readouterr().err
    assert main(["caption", str(folder), "--model", str(tmp_path / "nope")]) == 2
    assert main(["caption", str(tmp_path / "nope"), "--model", str(captioners("blip"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["caption", str(folder), "--model", str(captioners("blip")), "--overwrite", "--skip-existing"])
    assert not (folder / "coffee.txt").exists()


@pytest.mark.slow  # ~6 s: a fresh interpreter imports torch + transformers before its first caption
def test_kill_mid_run_leaves_no_half_caption(tmp_path, sk_images, captioners, loaded):
    """SIGKILL after the first caption is reported: every .txt is complete, and a rerun finishes the rest."""
    folder = tmp_path / "many"
    folder.mkdir()
    photo = Image.open(sk_images / "chelsea.png").convert("RGB")
    for i in range(24):  # distinct crops, so distinct captions
        photo.crop((i * 8, i * 4, i * 8 + 96, i * 4 + 96)).save(folder / f"crop{i:02d}.png")
    model = captioners("florence2")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dev2pro.cli", "caption", str(folder), "--model", str(model),
                             "--json", "--max-length", "48", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert first["status"] == "written"
    expected = dict(zip(sorted(p.name for p in folder.glob("*.png")),
                        caption_images(loaded("florence2"), [Image.open(p) for p in sorted(folder.glob("*.png"))],
                                       max_new_tokens=48)))
    written = {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}
    assert 1 <= len(written) < 24  # killed mid-run
    for name, text in written.items():
        assert text == expected[name.replace(".txt", ".png")] + "\n"  # complete, never half a caption
    assert first["caption"] == expected[first["image"]]
    assert all(p.name.endswith(".png") or p.name.endswith(".txt") or p.name.startswith(".")
               for p in folder.iterdir())  # only a hidden temp folder could be left, never a partial .txt

    results = run_caption(folder, model, max_length=48, progress=False)  # the rerun finishes the job
    assert sum(r.status == "skipped" for r in results) == len(written)
    assert {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")} == {
        k.replace(".png", ".txt"): v + "\n" for k, v in expected.items()}
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temp left behind


@pytest.mark.gpu
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cuda_bf16_captioning(family, captioners, sk_images, tmp_path):
    import torch

    cap = load_captioner(captioners(family), device="cuda")
    assert cap.dtype == torch.bfloat16 and next(cap.model.parameters()).is_cuda
    captions = caption_images(cap, _photos(sk_images), max_new_tokens=8, batch_size=2)
    assert len(captions) == 4 and all(c.strip() for c in captions)
    shutil.copy(sk_images / "rocket.jpg", tmp_path / "rocket.jpg")
    results = run_caption(tmp_path, captioners(family), max_length=8, device="cuda", progress=False)
    assert [r.status for r in results] == ["written"] and (tmp_path / "rocket.txt").read_text().strip()


def test_tiny_captioner_folders_are_reproducible(tmp_path, captioners):
    def digest(folder):
        return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}
    same = digest(write_tiny_captioner(tmp_path / "nested" / "a", "blip", seed=0))  # parents are created
    assert same == digest(captioners("blip"))  # byte-identical for the same seed
    other = digest(write_tiny_captioner(tmp_path / "b", "blip", seed=1))
    assert [k for k in same if same[k] != other[k]] == ["model.safetensors"]  # the seed only changes the weights
    with pytest.raises(UserError, match="unknown captioner family"):
        write_tiny_captioner(tmp_path / "c", "llava")


def test_a_max_length_past_the_decoders_positions_stops_there(loaded, sk_images, monkeypatch):
    """BLIP's text decoder has learned positions: asking for more new tokens than it has crashed (IndexError)."""
    cap = loaded("blip")
    monkeypatch.setattr(cap.model.config.text_config, "max_position_embeddings", 24)
    asked = []
    generate = cap.model.generate
    monkeypatch.setattr(cap.model, "generate", lambda **kw: asked.append(kw) or generate(**kw))
    got = caption_images(cap, _photos(sk_images, n=1), max_new_tokens=128)  # the default length
    prompt_len = asked[0]["input_ids"].shape[1]
    assert asked[0]["max_new_tokens"] == 24 - prompt_len and len(got) == 1


def test_images_reach_the_captioner_as_training_opens_them(tmp_path, captioners, monkeypatch):
    """EXIF orientation applied (upright), transparency over white, 16-bit greyscale scaled: the captioner describes
    the image the LoRA trains on (``Image.open(...).convert("RGB")`` did none of these)."""
    import numpy as np

    import dev2pro.caption as C

    d = tmp_path / "imgs"
    d.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(d / "rotated.jpg", exif=exif.tobytes())
    Image.new("RGBA", (24, 24), (0, 0, 255, 0)).save(d / "clear.png")  # fully transparent blue
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(d / "grey16.png")  # 16-bit white
    seen = {}

    def record(captioner, images, *args, **kwargs):
        seen.update({im.size: im for im in images})
        return ["a caption"] * len(images)
    monkeypatch.setattr(C, "caption_images", record)
    monkeypatch.setattr(C, "load_captioner", lambda model, device: object())
    results = run_caption(d, captioners("blip"), progress=False)
    assert sorted(r.status for r in results) == ["written"] * 3
    assert set(seen) == {(20, 40), (24, 24), (16, 16)}  # 40x20 stored, tag 6: 20 wide, 40 tall upright
    assert all(im.mode == "RGB" for im in seen.values())
    assert seen[24, 24].getpixel((3, 3)) == (255, 255, 255)  # over white, not the hidden blue
    assert seen[16, 16].getpixel((3, 3)) == (255, 255, 255)  # scaled to 255, not clipped
    assert (d / "rotated.txt").read_text() == "a caption\n"
