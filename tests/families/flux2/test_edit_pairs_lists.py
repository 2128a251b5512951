"""Edit pairs with several controls folders (``controls = ["a", "b"]``): the folder list as the scanner and the plan
read it -- a folder listed twice under two spellings, a controls folder that is the dataset folder, and the memory
the plan gives each phase when references ride along."""

import shutil

import pytest
from PIL import Image, ImageOps

from dev2pro.data.folders import DatasetFolder, scan
from dev2pro.errors import UserError


@pytest.fixture
def pairs(tmp_path, sk_images):
    """after/ (two photos) with a mirrored reference in before/ and a flipped one in before2/."""
    for d in ("after", "before", "before2"):
        (tmp_path / d).mkdir()
    for name in ("astronaut.png", "coffee.png"):
        shutil.copy(sk_images / name, tmp_path / "after" / name)
        with Image.open(sk_images / name) as im:
            ImageOps.mirror(im.convert("RGB")).save(tmp_path / "before" / name)
            ImageOps.flip(im.convert("RGB")).save(tmp_path / "before2" / name)
    return tmp_path


def test_one_controls_folder_listed_twice_is_refused(pairs):
    """Two spellings of one folder passed the config's 'distinct paths' check (it compares the strings before they
    are resolved) and every image then trained on the same reference twice."""
    again = pairs / "before" / ".." / "before"
    with pytest.raises(UserError, match=r"controls of .*after: .*before and .*before are the same folder"):
        scan([DatasetFolder(pairs / "after", controls=(pairs / "before", again))], default_caption="edit")
    (pairs / "alias").symlink_to(pairs / "before")
    with pytest.raises(UserError, match="are the same folder"):
        scan([DatasetFolder(pairs / "after", controls=(pairs / "before", pairs / "alias"))], default_caption="edit")
    found = scan([DatasetFolder(pairs / "after", controls=(pairs / "before", pairs / "before2"))],
                 default_caption="edit").items
    assert [it.controls for it in found] == [(pairs / "before" / n, pairs / "before2" / n)
                                             for n in ("astronaut.png", "coffee.png")]


def test_an_image_missing_a_reference_in_each_folder_counts_once(pairs):
    """The refusal counts images (it said '2 image(s)' for one image without either reference) and names the folder
    of each missing one."""
    (pairs / "before" / "coffee.png").unlink()
    (pairs / "before2" / "coffee.png").unlink()
    with pytest.raises(UserError, match=r"(?s)^1 image\(s\) have no usable reference.*after/coffee.png \(no .*"
                                        r"before/coffee.png/.jpg/\.\.\. in .*; no .*before2/coffee.png/.jpg/"):
        scan([DatasetFolder(pairs / "after", controls=(pairs / "before", pairs / "before2"))], default_caption="e")


def test_the_dataset_folder_as_its_own_controls_folder_is_named(pairs):
    """It was 'the dataset is empty': every image was skipped as a reference."""
    with pytest.raises(UserError, match=r"controls of .*after: .*after is the dataset folder itself or holds it"):
        scan([DatasetFolder(pairs / "after", controls=(pairs / "before", pairs / "after"))], default_caption="edit")
    with pytest.raises(UserError, match="is the dataset folder itself or holds it"):
        scan([DatasetFolder(pairs / "after", controls=pairs)], default_caption="edit")


def test_the_config_refuses_two_spellings_of_one_folder(tmp_path, pairs, klein_base_dir):
    from dev2pro.recipes.train_lora import train
    from dev2pro.schemas import load_train_config

    config = tmp_path / "sub" / "edit.toml"
    config.parent.mkdir()
    config.write_text(f'[model]\npath = "{klein_base_dir}"\n[[data.folders]]\npath = "../after"\n'
                      'controls = ["../before", "../before/"]\n[data]\ndefault_caption = "edit"\nresolution = 64\n'
                      '[train]\nsteps = 1\n[lora]\nrank = 4\n'
                      f'[save]\noutput_dir = "{tmp_path / "run"}"\n')
    cfg = load_train_config(config)
    assert cfg.data.folders[0].controls == [str(pairs / "before")] * 2  # resolved against the config's folder
    with pytest.raises(UserError, match="are the same folder"):
        train(cfg, progress=False)


def test_the_plan_counts_references_where_they_are(tmp_path, pairs, klein_base_dir):
    """Training forwards carry 1 + n token sets, so do the sample forwards with n sample.control images; caching
    encodes each reference on its own, at its image's size: no more VAE memory than the image alone (it was
    counted (1 + n) times: 15 GB instead of 5 GB at 1024 px with two references)."""
    from dev2pro.plan import DTYPE_BYTES, estimate
    from dev2pro.recipe_inputs import plan_inputs
    from dev2pro.schemas import load_train_config

    def planned(controls, control="", sample=True):
        folder = f'{{path="{pairs / "after"}"' + (f', controls={controls}' if controls else "") + "}"
        sets = [f'model.path="{klein_base_dir}"', f'save.output_dir="{tmp_path / "run"}"', "data.resolution=1024",
                f"data.folders=[{folder}]", 'sample.size="512x512"']
        sets += ['sample.prompts=["edit"]'] if sample else []
        sets += [f"sample.control={control}"] if control else []
        return estimate(plan_inputs(load_train_config(None, sets)))

    refs = f'["{pairs / "before"}", "{pairs / "before2"}"]'
    shots = f'["{pairs / "before" / "coffee.png"}", "{pairs / "before2" / "coffee.png"}"]'
    plain, edit, edit_sampled = planned(""), planned(refs), planned(refs, shots)
    assert edit.inputs.image_tokens == (3 * 4096,) and edit.caching_peak == plain.caching_peak
    assert max(edit.activations.values()) > 2 * max(plain.activations.values())
    assert edit_sampled.inputs.sample_references == 2 and planned(refs, sample=False).inputs.sample_references == 0
    per_token = 12 * plain.inputs.spec.hidden * DTYPE_BYTES[plain.inputs.dtype]  # plan.estimate's sampling term
    tokens = (lambda p: (p.sampling_extra - plain.sampling_extra) / per_token)
    assert tokens(edit) == 0 and tokens(edit_sampled) == 2 * 512 * 512 // 256  # two more sets of 1024
