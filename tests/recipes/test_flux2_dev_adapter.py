"""Issue 21 on tiny FLUX.2 dev: de-distillation as an adapter (``dedistill`` with ``train.adapter_rank``), then a
LoRA trained with that adapter on at guidance 1.0 and sampled on dev with it off at guidance 4 -- and what users
load: the adapter and the LoRA in diffusers' ``Flux2Pipeline`` with no key left, equal to dev2pro's merge; the
adapter run resumes bit for bit after kill -9; the 24B text encoder is gone before the first training step."""

import gc
import weakref

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dev2pro.cli import main
from dev2pro.families import get
from dev2pro.flux import checkpoint as C
from dev2pro.recipes.dedistill import dedistill
from dev2pro.recipes.train_lora import train
from dev2pro.schemas import load_dedistill_config, load_train_config
from tiny_run import assert_fused_equals_merged, model_and_data, same_tensors

from .test_dedistill import _run_cli, _toml
from .test_flux2_lora_acceptance import DiffusersLog

from diffusers import Flux2Pipeline  # noqa: E402

ADAPTER = ["train.adapter_rank=4"]


def forward(model, seed=0, guidance=4.0):
    g = torch.Generator().manual_seed(seed)
    x, pe = torch.randn(1, 16, 128, generator=g), torch.randn(1, 7, 96, generator=g)
    kw = get("flux2").model_inputs(x, torch.tensor([0.7]), {"prompt_embeds": pe}, 8, 8, torch.tensor([guidance]),
                                   "cpu", torch.float32)
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, flux2_dev_dir, sk_images):
    """cfg_teacher adapter de-distillation of tiny FLUX.2 dev: rank 4, 6 steps, state every 4, EMA."""
    root = tmp_path_factory.mktemp("f2dev-adapter")
    path = _toml(root, flux2_dev_dir, sk_images, out="adapter", steps=6, objective="cfg_teacher")
    summary = dedistill(load_dedistill_config(path, ADAPTER), progress=False)
    return root, path, summary


def _loads_cleanly(pipe, path, name):
    """Load a diffusers-layout LoRA into ``pipe``: nothing dropped, every module of the file becomes a peft layer."""
    from peft.tuners.lora import LoraLayer

    with safe_open(str(path), framework="pt") as f:
        n_modules = len([k for k in f.keys() if k.endswith("lora_A.weight")])
    with DiffusersLog() as log:
        pipe.load_lora_weights(str(path), adapter_name=name)
    assert log.messages == []  # no "unexpected keys", no "Unsupported keys": no key left
    layers = [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
    assert len(layers) == n_modules > 0


def _equals_our_merge(pipe, dev_dir, lora_file, out, capsys, what):
    """diffusers with the LoRA loaded == `dev2pro lora merge` of the same file (outputs and fused weights)."""
    lora_out = forward(pipe.transformer)
    assert main(["lora", "merge", "--base", str(dev_dir), "--lora", str(lora_file), str(out)]) == 0
    ours, _ = C.load_transformer(out, dtype=torch.float32)
    assert_fused_equals_merged(pipe, lora_out, ours, forward, what, capsys)


def test_adapter_exports_and_loads_in_diffusers_as_our_merge(adapter_run, flux2_dev_dir, tmp_path, capsys):
    root, _, summary = adapter_run
    out = root / "adapter"
    assert len(summary["losses"]) == 6 and all(x > 0 for x in summary["losses"])
    assert not (out / "dev2pro.safetensors").exists()  # the adapter alone, not a 32B model
    with safe_open(str(out / "dev2pro-adapter.safetensors"), framework="pt") as f:
        assert f.metadata()["dev2pro.kind"] == "training_adapter"
    pipe = Flux2Pipeline.from_pretrained(flux2_dev_dir, torch_dtype=torch.float32)
    base_out = forward(pipe.transformer)
    _loads_cleanly(pipe, out / "dev2pro-adapter.diffusers.safetensors", "dedistill")
    assert float((forward(pipe.transformer) - base_out).abs().max()) > 1e-4  # six steps moved it
    _equals_our_merge(pipe, flux2_dev_dir, out / "dev2pro-adapter.diffusers.safetensors", tmp_path / "merged",
                      capsys, "FLUX.2 dev adapter")


@pytest.mark.slow
def test_adapter_dedistill_resumes_bit_for_bit_after_kill(adapter_run, flux2_dev_dir, sk_images):
    root, _, summary = adapter_run
    killed = _toml(root, flux2_dev_dir, sk_images, out="killed", steps=6, objective="cfg_teacher")
    proc = _run_cli([str(killed), "--set", ADAPTER[0]], kill_after=5)
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert (root / "killed" / "state" / "step-000004").is_dir()
    assert not (root / "killed" / "dev2pro-adapter.safetensors").exists()
    resumed = dedistill(load_dedistill_config(killed, ADAPTER), resume="latest", progress=False)
    assert resumed["losses"] == summary["losses"][4:]
    for name in ("dev2pro-adapter.safetensors", "dev2pro-adapter.diffusers.safetensors"):
        assert same_tensors(root / "adapter" / name, root / "killed" / name)


def _watch_text_encoder(monkeypatch):
    """Record weak references to every module of each FLUX.2 text encoder loaded (and the device it ran on)."""
    from dev2pro.families.flux2 import text

    seen = []
    real = text.load_text_encoder

    def load(model_dir, device="cpu", dtype=torch.float32):
        pipe = real(model_dir, device, dtype)
        seen.append(([weakref.ref(m) for m in pipe.text_encoder.modules()],
                     {p.dtype for p in pipe.text_encoder.parameters()}))
        return pipe
    monkeypatch.setattr(text, "load_text_encoder", load)
    return seen


@pytest.fixture(scope="module")
def lora_run(adapter_run, flux2_dev_dir, sk_images):
    """`dev2pro train` on tiny FLUX.2 dev with the exported adapter on (guidance 1.0), samples at guidance 4 with
    it off (sample.guidance unset: FLUX.2 dev's default); a hook after the first step records whether any
    text-encoder module is still alive."""
    root, _, _ = adapter_run
    mp = pytest.MonkeyPatch()
    from dev2pro.train import loop

    seen = _watch_text_encoder(mp)
    alive = []

    def after_step(done):
        if done == 1:
            gc.collect()
            alive.append(sum(r() is not None for refs, _ in seen for r in refs))
    mp.setattr(loop, "after_step", after_step)
    toml = root / "train.toml"
    toml.write_text(model_and_data(flux2_dev_dir, sk_images, root / "cache", model=f"""dtype = "fp32"
adapter = "{root / 'adapter' / 'dev2pro-adapter.safetensors'}"
text_encoder_dtype = "bf16"
""") + f"""
[lora]
rank = 4
alpha = 4
[train]
steps = 3
lr = 1e-2
seed = 3
[sample]
prompts = ["a red cat"]
steps = 2
size = "64x64"
with_adapter = true
baseline = false
[save]
output_dir = "{root / 'lora'}"
formats = ["kohya", "diffusers", "comfy"]
""")
    try:
        summary = train(load_train_config(toml), progress=False)
    finally:
        mp.undo()
    return root / "lora", summary, seen, alive


def test_text_encoder_is_freed_before_the_first_training_step(lora_run):
    _, summary, seen, alive = lora_run
    assert len(summary["losses"]) == 3
    assert len(seen) == 1 and len(seen[0][0]) > 40  # one Mistral3 load (40 layers + the vision tower)
    assert seen[0][1] == {torch.bfloat16}  # model.text_encoder_dtype honoured
    assert alive == [0]  # no text-encoder module alive at step 1: none can sit on the training device


def test_lora_trained_with_the_adapter_loads_on_dev_and_equals_our_merge(lora_run, flux2_dev_dir, tmp_path,
                                                                        capsys):
    run, _, _, _ = lora_run
    files = {"kohya": "lora.safetensors", "diffusers": "lora.diffusers.safetensors", "comfy": "lora.comfy.safetensors"}
    raw = load_file(str(run / files["diffusers"]))
    assert raw and not any("training_adapter" in k for k in raw)  # the adapter is not part of the LoRA
    with safe_open(str(run / files["kohya"]), framework="pt") as f:
        assert f.metadata()["dev2pro.training_adapter"] == "dev2pro-adapter.safetensors"
    # samples: on dev with the adapter off at embedded guidance 4 (Flux2Pipeline's default), and with it on
    with Image.open(run / "samples" / "step000003.png") as im:
        assert "guidance 4" in im.text["title"]
    assert (run / "samples" / "step000003-adapter.png").exists()
    pipe = Flux2Pipeline.from_pretrained(flux2_dev_dir, torch_dtype=torch.float32)
    _loads_cleanly(pipe, run / files["diffusers"], "trained")
    _equals_our_merge(pipe, flux2_dev_dir, run / files["diffusers"], tmp_path / "merged", capsys,
                      "LoRA trained with the adapter, on dev")
    merged = {}
    for lay, name in files.items():  # every layout merges to the same weights, bit for bit
        merged[lay] = tmp_path / f"m-{lay}"
        assert main(["lora", "merge", "--base", str(flux2_dev_dir), "--lora", str(run / name), str(merged[lay])]) == 0
    w = {lay: p / "diffusion_pytorch_model.safetensors" for lay, p in merged.items()}
    assert same_tensors(w["kohya"], w["diffusers"]) and same_tensors(w["kohya"], w["comfy"])


def test_adapter_loads_as_model_adapter_of_train(lora_run):
    """The train run above used the exported adapter as ``model.adapter``: it was attached (the ``-adapter`` grid
    differs from the plain one) and left out of the files."""
    import numpy as np

    run = lora_run[0]
    off = np.asarray(Image.open(run / "samples" / "step000003.png")).astype(int)
    on = np.asarray(Image.open(run / "samples" / "step000003-adapter.png")).astype(int)
    assert off.shape == on.shape and np.abs(off - on).max() > 0


def test_adapter_dedistill_on_an_fp8_dev(tmp_path, flux2_dev_dir, sk_images, monkeypatch):
    """`dedistill` with train.adapter_rank on one fp8-stored FLUX.2 dev, cfg_teacher with the
    teacher = the same fp8 weights with the LoRA off: the block Linears are fp8, only the LoRA trains."""
    from dev2pro.flux.fp8 import Fp8Linear
    from dev2pro.train import model as modelmod

    seen = {}
    real = modelmod.with_adapter_lora

    def spy(model, rank, compute, fp8):
        out = real(model, rank, compute, fp8)
        seen["fp8"] = sum(isinstance(m, Fp8Linear) for m in out.modules())
        seen["trainable"] = {n.split(".")[-2] for n, p in out.named_parameters() if p.requires_grad}
        return out
    monkeypatch.setattr(modelmod, "with_adapter_lora", spy)
    from dev2pro.recipes import dedistill as recipe

    monkeypatch.setattr(recipe, "load_student", lambda *a, **k: modelmod.load_student(*a, **k))
    path = _toml(tmp_path, flux2_dev_dir, sk_images, out="fp8", steps=2, objective="cfg_teacher")
    # fp32 compute here: accelerate fixes one mixed precision per process and the other tests run without
    summary = dedistill(load_dedistill_config(path, ADAPTER + ["model.fp8_storage=true"]), progress=False)
    assert len(summary["losses"]) == 2 and all(0 < x < float("inf") for x in summary["losses"])
    # every block Linear stored in fp8 (the LoRA's own A/B Linears stay fp32 and are the only trainable weights)
    plain, _ = C.load_transformer(flux2_dev_dir, dtype=torch.float32)
    blocks = list(plain.transformer_blocks) + list(plain.single_transformer_blocks)
    assert seen["fp8"] == sum(isinstance(m, torch.nn.Linear) for b in blocks for m in b.modules()) > 0
    assert seen["trainable"] == {"default"}
    assert (tmp_path / "fp8" / "dev2pro-adapter.diffusers.safetensors").exists()


def test_samples_default_to_flux2_devs_own_guidance(tmp_path, flux2_dev_dir, tiny_dev_dir, sk_images):
    """sample.guidance left unset: 4.0 on FLUX.2 dev (Flux2Pipeline's default), 3.5 on FLUX.1 dev; a written value
    is kept."""
    import inspect

    from diffusers import Flux2Pipeline as P

    assert inspect.signature(P.__call__).parameters["guidance_scale"].default == 4.0

    def guidance(model_dir, extra=""):
        toml = tmp_path / "g.toml"
        toml.write_text(model_and_data(model_dir, sk_images, tmp_path / "c") + f"\n[sample]\n{extra}\n"
                        f"[save]\noutput_dir = \"{tmp_path / 'r'}\"\n")
        return load_train_config(toml).sample.guidance

    assert guidance(flux2_dev_dir) == 4.0 and guidance(tiny_dev_dir) == 3.5
    assert guidance(flux2_dev_dir, "guidance = 3.0") == 3.0


def test_trained_dev_lora_files_convert_into_each_other_bit_identically(lora_run, tmp_path):
    """`lora convert` between the three FLUX.2 layouts `train` wrote on dev: each direction gives the file training
    wrote in that layout, byte for byte."""
    run = lora_run[0]
    files = {"kohya": "lora.safetensors", "diffusers": "lora.diffusers.safetensors", "comfy": "lora.comfy.safetensors"}
    assert any("to_qkv_mlp_proj" in k for k in load_file(str(run / files["diffusers"])))  # FLUX.2's fused linear
    for src, name in files.items():
        for dst, dst_name in files.items():
            if dst != src:
                out = tmp_path / f"{src}-to-{dst}.safetensors"
                assert main(["lora", "convert", str(run / name), str(out), "--layout", dst]) == 0
                assert out.read_bytes() == (run / dst_name).read_bytes(), (src, dst)
