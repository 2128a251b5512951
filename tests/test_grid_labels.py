"""Labelled sample grids: a title band with the step, seed column headers, a prompt band over each row."""

import json

from PIL import Image

from dev2pro.sampling import LABEL_FONT_SIZE, make_grid, make_labelled_grid, save_png


def _tiles(n, w=40, h=30):
    return [Image.new("RGB", (w, h), (20 * i, 100, 200)) for i in range(n)]


def test_labelled_grid_grows_by_the_label_bands_and_keeps_every_tile(tmp_path):
    tiles = _tiles(6)
    grid = make_labelled_grid(tiles, row_labels=["a cat", "a dog"], col_labels=["seed 0", "seed 1", "seed 2"],
                              title="step 100")
    band = LABEL_FONT_SIZE + 6
    assert grid.size == (3 * 40, 2 * 30 + (2 + 2) * band)  # title + seed header, then one prompt band per row
    for i, tile in enumerate(tiles):  # every tile lands where the bands say
        r, c = divmod(i, 3)
        y = 2 * band + r * (30 + band) + band
        assert grid.crop((c * 40, y, c * 40 + 40, y + 30)).tobytes() == tile.tobytes()
    title = grid.crop((0, 0, 120, band)).convert("L")
    assert min(title.getdata()) < 128  # text was drawn in the title band
    plain = make_grid(tiles, rows=2, cols=3)  # the plain grid is unchanged for existing callers
    assert plain.size == (120, 60)
    path = save_png(grid, tmp_path / "g.png", {"title": "step 100", "rows": json.dumps(["a cat", "a dog"])})
    with Image.open(path) as im:
        assert im.info["title"] == "step 100" and json.loads(im.info["rows"]) == ["a cat", "a dog"]


def test_multi_line_and_control_character_prompts_become_one_label_line(tmp_path):
    """Issue 18.6: a prompt with a newline crashed the final grid (Pillow cannot measure multi-line text)."""
    from dev2pro.train.samples import GridSpec, write_grid

    prompts = ["a cat\non a mat", 'tab\there "quoted" \x07 bell', "line\r\nbreak " * 20]
    spec = GridSpec(prompts, [0, 1], [], None, 1, 40, 30)
    path = write_grid(_tiles(6), spec, "step 1\nnext", tmp_path / "g.png", {"step": "1"})
    with Image.open(path) as im:
        assert im.size == (80, 3 * 30 + (3 + 2) * (LABEL_FONT_SIZE + 6))
        assert json.loads(im.info["prompts"]) == prompts  # the metadata keeps the prompts exactly
    plain = make_grid(_tiles(2), rows=1, cols=2, labels=["two\nlines", "\x07"])
    assert plain.size == (80, 30 + LABEL_FONT_SIZE + 6)


def test_a_run_with_newlines_in_its_trigger_and_prompts_finishes_and_resumes(tmp_path, tiny_dev_dir, sk_images,
                                                                            capsys):
    """Issue 18.6 end to end: the run's config.toml reloads (--resume) and the final grid is written."""
    from dev2pro.cli import main
    from dev2pro.config import toml_string
    from tiny_run import model_and_data

    nasty = 'ohwx\n"style"\t\x07'
    config = tmp_path / "run.toml"
    config.write_text(model_and_data(tiny_dev_dir, sk_images, tmp_path / "cache", model='dtype = "fp32"',
                                     data=f"trigger = {toml_string(nasty)}")
                      + f'[lora]\nrank = 4\n[train]\nsteps = 2\n[sample]\nprompts = [{toml_string(nasty)}]\n'
                        f'steps = 1\nsize = "64x64"\nbaseline = false\n[save]\noutput_dir = "{tmp_path / "run"}"\n')
    assert main(["train", str(config), "--no-progress"]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    with Image.open(run / "samples" / "step000002.png") as im:
        assert json.loads(im.info["prompts"]) == [nasty]
    assert main(["train", str(run / "config.toml"), "--resume", "--no-progress"]) == 0
    assert "already finished" in capsys.readouterr().out
