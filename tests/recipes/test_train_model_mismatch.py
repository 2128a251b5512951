"""`dev2pro train` / `dedistill` with ``model.transformer`` of another model than the ``model.path`` folder (a klein
transformer on a FLUX.2 dev folder, FLUX.1 on FLUX.2 and back): one line naming both and the fix, from
``check_training_inputs`` before the run folder exists -- not the folder's "missing component" message (FLUX.1's
text_encoder_2 asked of a FLUX.2 folder, after the run folder was made) or a text-encoder pairing message."""

import pytest

from dev2pro.errors import UserError
from dev2pro.recipes.dedistill import dedistill
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_dedistill_config, load_train_config
from dev2pro.train.preflight import check_training_inputs
from tiny_run import model_and_data

CASES = [  # (transformer's folder fixture, its model, model.path fixture, the folder's model, pipeline, its parts)
    ("klein_base_dir", "FLUX.2 klein", "flux2_dev_dir", "FLUX.2 dev", "Flux2Pipeline", "text encoder does"),
    ("flux2_dev_dir", "FLUX.2 dev", "klein_base_dir", "FLUX.2 klein", "Flux2KleinPipeline", "text encoder does"),
    ("tiny_dev_dir", "FLUX.1", "flux2_dev_dir", "FLUX.2 dev", "Flux2Pipeline", "text encoder and VAE do"),
    ("tiny_dev_dir", "FLUX.1", "klein_base_dir", "FLUX.2 klein", "Flux2KleinPipeline", "text encoder and VAE do"),
    ("flux2_dev_dir", "FLUX.2 dev", "tiny_dev_dir", "FLUX.1", "FluxPipeline", "text encoder and VAE do"),
    ("klein_distilled_dir", "FLUX.2 klein", "tiny_dev_dir", "FLUX.1", "FluxPipeline", "text encoder and VAE do"),
]


def _message(transformer, made, folder, where, pipeline, parts):
    return (f"model.transformer {transformer} is a {made} transformer, model.path {folder} is a {where} folder "
            f"({pipeline}), whose {parts} not fit it: set model.path to the {made} model folder the transformer "
            f"belongs to, or model.transformer to a {where} transformer")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-on-{c[3]}".replace(" ", "_"))
def test_a_transformer_of_another_model_than_the_folder_is_one_line_before_the_run_folder(case, request, tmp_path,
                                                                                          sk_images):
    t_fixture, made, f_fixture, where, pipeline, parts = case
    transformer = request.getfixturevalue(t_fixture) / "transformer"
    folder = request.getfixturevalue(f_fixture)
    expected = _message(transformer, made, folder, where, pipeline, parts)
    with pytest.raises(UserError) as e:
        check_training_inputs(str(transformer), str(folder))
    assert str(e.value) == expected
    toml = tmp_path / "run.toml"
    toml.write_text(model_and_data(folder, sk_images, tmp_path / "cache", model=f'transformer = "{transformer}"')
                    + f'\n[train]\nsteps = 1\n\n[save]\noutput_dir = "{tmp_path / "run"}"\n')
    for run in (lambda: train(load_train_config(toml), progress=False, quiet=True),
                lambda: dedistill(load_dedistill_config(toml), progress=False)):
        with pytest.raises(UserError) as e:
            run()
        assert str(e.value) == expected
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing written


def test_a_transformer_of_the_folders_own_model_passes(tiny_dev_dir, tiny_pro_dir, klein_base_dir,
                                                       klein_distilled_dir, flux2_dev_dir):
    check_training_inputs(str(tiny_pro_dir / "transformer"), str(tiny_dev_dir))  # FLUX.1 pro-like on dev's folder
    check_training_inputs(str(klein_distilled_dir / "transformer"), str(klein_base_dir))  # klein with klein's Qwen3
    check_training_inputs(str(flux2_dev_dir / "transformer"), str(flux2_dev_dir))
    check_training_inputs(str(flux2_dev_dir), str(flux2_dev_dir))
