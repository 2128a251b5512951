"""Fingerprint of `train` and `dedistill` on tiny models: every loss and a hash of every output (LoRA/state/export
tensors + metadata without the date, sample PNGs, loss.png). A refactor that must not change behaviour gives the
same JSON before and after. One run per process (accelerate's state is process-global):

    for n in train dedistill_flow dedistill_cfg dedistill_adapter; do
        python bench/fingerprint.py /tmp/fp $n; done > after.json

Run it once on the old tree (PYTHONPATH=old/src) and once on the new one, then diff the JSON (minus console lines).
"""
import hashlib, json, os, shutil, sys
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
torch.set_num_threads(1)
import skimage
from dev2pro.flux.tiny import write_tiny_model
from dev2pro.schemas import load_train_config, load_dedistill_config
from dev2pro.recipes.train_lora import train
from dev2pro.recipes.dedistill import dedistill

root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
dev = root / "tiny-dev"
if not dev.exists():
    write_tiny_model(dev, variant="dev", seed=0)
    write_tiny_model(root / "tiny-pro", variant="pro", seed=1)
imgs = root / "imgs"
if not imgs.exists():
    imgs.mkdir()
    src = Path(skimage.__file__).parent / "data"
    for n in ("astronaut.png", "coffee.png", "chelsea.png", "camera.png"):
        shutil.copy(src / n, imgs / n)
    (imgs / "astronaut.txt").write_text("an astronaut in a white suit")

def base(extra_model=""):
    return f"""
[model]
path = "{dev}"
{extra_model}
[[data.folders]]
path = "{imgs}"
[data]
default_caption = "a photo"
resolution = 64
bucket_step = 64
cache_dir = "{root / 'cache'}"
caption_dropout = 0.2
"""

def h(folder):
    from safetensors.torch import load_file
    from safetensors import safe_open
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".png") and "logs" not in p.parts:
            if p.suffix == ".png":
                d = p.read_bytes()
            else:  # tensors + metadata without the date
                t = load_file(str(p)); m = safe_open(str(p), "pt").metadata() or {}
                m.pop("modelspec.date", None)
                d = json.dumps(sorted(m.items())).encode() + b"".join(k.encode() + t[k].float().numpy().tobytes() for k in sorted(t))
            out[str(p.relative_to(folder))] = hashlib.sha256(d).hexdigest()[:16]
    return out

res = {}
runs = {
  "train": ("t", base('dtype = "fp32"') + """
[lora]
rank = 4
[train]
steps = 6
grad_accum = 2
[sample]
prompts = ["a cat"]
steps = 2
size = "64x64"
every = 3
[save]
every = 3
formats = ["kohya", "diffusers"]
"""),
  "dedistill_flow": ("d", base() + """
[train]
steps = 4
[sample]
prompts = ["a cat"]
steps = 2
size = "64x64"
every = 2
[save]
every = 2
"""),
  "dedistill_cfg": ("d", 'objective = "cfg_teacher"\n' + base() + """
[train]
steps = 3
"""),
  "dedistill_adapter": ("d", 'objective = "cfg_teacher"\n' + base() + """
[train]
steps = 3
adapter_rank = 4
"""),
}
for name, (kind, text) in [(n, runs[n]) for n in sys.argv[2:]]:
    out = root / "runs" / name
    if out.exists(): shutil.rmtree(out)
    cfgp = root / f"{name}.toml"
    cfgp.write_text(text + f'\n[save]\noutput_dir = "{out}"\n' if "[save]" not in text else text.replace("[save]", f'[save]\noutput_dir = "{out}"', 1))
    if kind == "t":
        s = train(load_train_config(cfgp), progress=False, quiet=True)
    else:
        s = dedistill(load_dedistill_config(cfgp), progress=False)
    res[name] = {"losses": [round(x, 10) for x in s["losses"]], "files": h(out)}
print(json.dumps(res, indent=1))
