"""Issue 19's LoRA acceptance, end to end on tiny klein Base: a LoRA trained by `dev2pro train` loads in diffusers
(``Flux2KleinPipeline.load_lora_weights``) with no key left, equals `dev2pro lora merge` of it (fp32 round-off), and
`lora convert` round trips between the three layouts are bit-identical."""

import logging

import pytest
import torch
from safetensors import safe_open

from dev2pro.cli import main
from dev2pro.flux import checkpoint as C
from tiny_run import assert_fused_equals_merged, model_and_data, same_tensors

pytest.importorskip("peft")
from diffusers import Flux2KleinPipeline  # noqa: E402

LAYOUTS = {"kohya": "lora.safetensors", "diffusers": "lora.diffusers.safetensors", "comfy": "lora.comfy.safetensors"}


class DiffusersLog(logging.Handler):
    """diffusers' logger does not propagate to the root logger, so caplog misses what it says."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("diffusers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("diffusers").removeHandler(self)


def forward(model, seed=0):
    from dev2pro.families import get

    g = torch.Generator().manual_seed(seed)
    x, pe = torch.randn(1, 16, 128, generator=g), torch.randn(1, 7, 96, generator=g)
    kw = get("flux2").model_inputs(x, torch.tensor([0.7]), {"prompt_embeds": pe}, 8, 8, None, "cpu", torch.float32)
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


@pytest.fixture(scope="module")
def trained(klein_base_dir, sk_images, tmp_path_factory):
    d = tmp_path_factory.mktemp("klein-train")
    toml = d / "train.toml"
    toml.write_text(model_and_data(klein_base_dir, sk_images, d / "cache", model='dtype = "fp32"',
                                   data="batch_size = 1") + f"""
[lora]
rank = 4
alpha = 4

[train]
steps = 3
lr = 1e-2
seed = 3

[save]
output_dir = "{d / 'run'}"
formats = ["kohya", "diffusers", "comfy"]
""")
    assert main(["train", str(toml), "--no-progress"]) == 0
    return d / "run"


def test_trained_klein_lora_loads_in_diffusers_and_equals_our_merge(trained, klein_base_dir, tmp_path, capsys):
    from peft.tuners.lora import LoraLayer

    path = trained / LAYOUTS["diffusers"]
    with safe_open(str(path), framework="pt") as f:
        n_modules, meta = len(list(f.keys())) // 2, f.metadata()
    assert meta["ss_base_model_version"] == "flux_2" and meta["modelspec.architecture"] == "flux-2-custom/lora"
    pipe = Flux2KleinPipeline.from_pretrained(klein_base_dir, torch_dtype=torch.float32)
    base_out = forward(pipe.transformer)
    with DiffusersLog() as log:
        pipe.load_lora_weights(str(path), adapter_name="trained")
    assert log.messages == []  # no "unexpected keys", no "Unsupported keys": nothing left
    layers = [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer) and "trained" in m.lora_A]
    assert len(layers) == n_modules > 0
    lora_out = forward(pipe.transformer)
    assert float((lora_out - base_out).abs().max()) > 1e-3  # three steps at lr 1e-2 moved it

    merged = {}
    for lay, name in LAYOUTS.items():  # every layout training wrote merges to the same tensors, bit for bit
        merged[lay] = tmp_path / f"merged-{lay}"
        main(["lora", "merge", "--base", str(klein_base_dir), "--lora", str(trained / name), str(merged[lay])])
    files = {lay: p / "diffusion_pytorch_model.safetensors" for lay, p in merged.items()}
    assert same_tensors(files["kohya"], files["diffusers"]) and same_tensors(files["kohya"], files["comfy"])

    ours, _ = C.load_transformer(merged["kohya"], dtype=torch.float32)
    assert_fused_equals_merged(pipe, lora_out, ours, forward, "klein LoRA", capsys)


def test_trained_files_convert_into_each_other_bit_identically(trained, tmp_path):
    """kohya <-> comfy <-> diffusers: each of the 6 directions gives the file training wrote in that layout (byte
    for byte), and converting back gives the source file."""
    for src, name in LAYOUTS.items():
        for dst, dst_name in LAYOUTS.items():
            if dst == src:
                continue
            out = tmp_path / f"{src}-to-{dst}.safetensors"
            main(["lora", "convert", str(trained / name), str(out), "--layout", dst])
            assert out.read_bytes() == (trained / dst_name).read_bytes(), (src, dst)
            back = tmp_path / f"{src}-to-{dst}-back.safetensors"
            main(["lora", "convert", str(out), str(back), "--layout", src])
            assert back.read_bytes() == (trained / name).read_bytes(), (src, dst)
