"""FLUX.2 LoRA layouts on a tiny Flux2Transformer2DModel: diffusers' own loader reads what we write, ComfyUI's reading
rules (re-implemented here from comfy/lora.py) give the same model, conversions round-trip bit for bit, deltas merge,
and FLUX.1 / FLUX.2 LoRAs are told apart."""

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from dev2pro.errors import UserError
from dev2pro.families.flux2 import lora_keys as K

pytest.importorskip("peft")
from diffusers import Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

ND, NS, HID = 2, 2, 16
CFG = dict(patch_size=1, in_channels=8, num_layers=ND, num_single_layers=NS, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=12, timestep_guidance_channels=16, mlp_ratio=3.0,
           axes_dims_rope=(2, 2, 2, 2))
# the linears diffusers' kohya converter drops (it warns "Unsupported keys"); musubi never trains them
KOHYA_DROPPED = ("stream_modulation", "guidance_embedder", "norm_out.linear")


def base_model(guidance: bool) -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    m = Flux2Transformer2DModel(**CFG, guidance_embeds=guidance).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def inputs(guidance: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    pos = torch.arange(4.0)
    return dict(hidden_states=torch.randn(1, 4, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 3, 12, generator=g), timestep=torch.tensor([0.6]),
                img_ids=torch.stack([torch.zeros(4), torch.zeros(4), pos // 2, pos % 2], 1),  # (t, h, w, l)
                txt_ids=torch.stack([torch.zeros(3)] * 3 + [torch.arange(3.0)], 1),
                guidance=torch.tensor([3.5]) if guidance else None, return_dict=False)


def run(m, guidance):
    with torch.no_grad():
        return m(**inputs(guidance))[0]


def targets(guidance: bool, skip=()) -> list[str]:
    return [t for t in K.diffusers_targets(ND, NS, guidance) if not any(s in t for s in skip)]


def peft_model(base, guidance, names, r=4, alpha=8, seed=2, **cfg):
    """``base`` + a peft LoRA on ``names`` with random (non-zero) A and B."""
    m = copy.deepcopy(base)
    m.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=names, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def diffusers_file(tmp_path, model, name="peft.safetensors"):
    """The peft LoRA of ``model`` written by diffusers' own save_lora_weights, as its training scripts call it."""
    Flux2LoraLoaderMixin.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                           weight_name=name,
                                           transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    return tmp_path / name


def read_file(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def save(path, sd, meta):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return path


class DiffusersLog(logging.Handler):
    """diffusers' library logger does not propagate to the root logger, so caplog misses it."""

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


def diffusers_load(base, path):
    """A copy of ``base`` with ``path`` loaded by diffusers' Flux2LoraLoaderMixin; (model, warnings, injected)."""
    from peft.tuners.lora import LoraLayer

    m = copy.deepcopy(base)
    with DiffusersLog() as log:
        sd, md = Flux2LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        Flux2LoraLoaderMixin.load_lora_into_transformer(sd, transformer=m, metadata=md)
    injected = sum(isinstance(x, LoraLayer) for x in m.modules())
    return m, log.messages, injected


def close(a, b, tol=1e-5):
    return float((a - b).abs().max() / b.abs().max()) < tol


# ------------------------------------------------------------------------------------------ the key map
def test_map_covers_every_linear_and_matches_diffusers_base_converter():
    for guidance in (False, True):
        m = Flux2Transformer2DModel(**CFG, guidance_embeds=guidance)
        linears = {n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)}
        assert set(K.diffusers_targets(ND, NS, guidance)) == linears
    # real block counts: klein 4B 5+20, 9B 8+24, dev 8+48 (+ guidance)
    for nd, ns, n in ((5, 20, 5 * 8 + 20 * 2 + 9), (8, 24, 8 * 8 + 24 * 2 + 9), (8, 48, 8 * 8 + 48 * 2 + 11)):
        assert len(K.module_map(nd, ns, guidance=nd == 8 and ns == 48)) == n


def to_bfl_base(sd: dict) -> dict:
    """A diffusers FLUX.2 state dict in BFL names, built from module_map (+ the norms), to check the map against
    diffusers' own BFL -> diffusers converter."""
    out = {}
    for bfl, names in K.module_map(ND, NS).items():
        if names[0] + ".weight" not in sd:
            continue
        w = torch.cat([sd[n + ".weight"] for n in names])
        out[bfl + ".weight"] = torch.cat(w.chunk(2)[::-1]) if bfl == K.ADALN else w
    for i in range(ND):
        for side, names in (("img", ("norm_q", "norm_k")), ("txt", ("norm_added_q", "norm_added_k"))):
            for bfl_norm, d in zip(("query_norm", "key_norm"), names):
                out[f"double_blocks.{i}.{side}_attn.norm.{bfl_norm}.scale"] = \
                    sd[f"transformer_blocks.{i}.attn.{d}.weight"]
    for i in range(NS):
        for bfl_norm, d in (("query_norm", "norm_q"), ("key_norm", "norm_k")):
            out[f"single_blocks.{i}.norm.{bfl_norm}.scale"] = sd[f"single_transformer_blocks.{i}.attn.{d}.weight"]
    return out


@pytest.mark.parametrize("guidance", [False, True])
def test_module_map_agrees_with_diffusers_checkpoint_converter(guidance):
    sd = base_model(guidance).state_dict()
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(to_bfl_base(sd)))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------- (a) diffusers' own loader
@pytest.fixture(scope="module", params=[False, True], ids=["klein", "guidance"])
def world(request, tmp_path_factory):
    guidance = request.param
    base = base_model(guidance)
    tmp = tmp_path_factory.mktemp("flux2-lora")
    full = peft_model(base, guidance, targets(guidance))
    blocks = peft_model(base, guidance, targets(guidance, KOHYA_DROPPED))
    no_adaln = peft_model(base, guidance, targets(guidance, ("norm_out.linear",)))
    return dict(guidance=guidance, base=base, tmp=tmp, base_out=run(base, guidance),
                models={"full": full, "blocks": blocks, "no_adaln": no_adaln},
                outs={k: run(m, guidance) for k, m in (("full", full), ("blocks", blocks), ("no_adaln", no_adaln))},
                files={k: diffusers_file(tmp, m, f"{k}.safetensors") for k, m in
                       (("full", full), ("blocks", blocks), ("no_adaln", no_adaln))})


def written(world, which, layout):
    sd, meta = read_file(world["files"][which])
    out, out_meta = K.convert(sd, meta, layout, ND, NS)
    return save(world["tmp"] / f"{which}-{layout}.safetensors", out, out_meta)


def test_diffusers_file_reads_with_its_alpha(world):
    sd, meta = read_file(world["files"]["full"])
    assert K.detect_layout(sd) == "peft"
    lw = K.read_lora(sd, meta, ND, NS)
    assert set(lw) == set(targets(world["guidance"]))
    assert all(m.alpha == 8.0 and m.rank == 4 for m in lw.values())


@pytest.mark.parametrize("layout", ["peft", "bfl", "kohya"])
def test_diffusers_loads_every_key_and_gives_the_lora_model(world, layout):
    """Every layout, with the modules diffusers can read in it: no key left, same output as the LoRA we saved."""
    which = {"peft": "full", "bfl": "no_adaln", "kohya": "blocks"}[layout]
    path = written(world, which, layout)
    m, log, injected = diffusers_load(world["base"], path)
    assert log == []
    assert injected == len(K.read_lora(*read_file(path), ND, NS))
    out = run(m, world["guidance"])
    assert not close(out, world["base_out"], 1e-3)  # the LoRA does something
    assert close(out, world["outs"][which])


def test_diffusers_bfl_adaln_quirk(world):
    """diffusers 0.42.1 maps final_layer.adaLN_modulation.1 without swapping B's shift|scale halves: our bfl file
    (correct for ComfyUI, see test_comfy_rules...) loads with every key but a wrong norm_out delta. Our own reader
    gets it right. If this starts failing, diffusers fixed it: drop the note in the module docstring."""
    path = written(world, "full", "bfl")
    m, log, injected = diffusers_load(world["base"], path)
    assert log == [] and injected == len(targets(world["guidance"]))
    assert not close(run(m, world["guidance"]), world["outs"]["full"], 1e-3)
    lw = K.read_lora(*read_file(path), ND, NS)
    ref = K.read_lora(*read_file(world["files"]["full"]), ND, NS)
    assert torch.equal(lw["norm_out.linear"].up, ref["norm_out.linear"].up)


def test_diffusers_kohya_drops_modulation_guidance_and_adaln(world):
    path = written(world, "full", "kohya")
    m, log, injected = diffusers_load(world["base"], path)
    dropped = [t for t in targets(world["guidance"]) if any(s in t for s in KOHYA_DROPPED)]
    assert injected == len(targets(world["guidance"])) - len(dropped)
    assert len(log) == 1 and "Unsupported keys" in log[0]
    assert log[0].count(".alpha") == len(dropped)


# --------------------------------------------------------------- ComfyUI's reading rules (comfy/lora.py)
def comfy_apply(bfl_sd: dict, lora_sd: dict) -> dict:
    """What ComfyUI does with a LoRA on a BFL checkpoint: key_map lora_unet_<underscored> and diffusion_model.<path>
    -> weight; weight += up @ down * (alpha / down rows if .alpha else 1)."""
    key_map = {}
    for k in bfl_sd:
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = k
            key_map["diffusion_model." + k[: -len(".weight")]] = k
    out = {k: v.clone() for k, v in bfl_sd.items()}
    loaded = set()
    for x, target in key_map.items():
        for up_s, down_s in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if x + up_s in lora_sd:
                up, down = lora_sd[x + up_s].float(), lora_sd[x + down_s].float()
                alpha = lora_sd[x + ".alpha"].item() / down.shape[0] if x + ".alpha" in lora_sd else 1.0
                out[target] += up @ down * alpha
                loaded |= {x + up_s, x + down_s, x + ".alpha"}
    assert set(lora_sd) - loaded == set(), "lora key not loaded"
    return out


@pytest.mark.parametrize("layout", ["bfl", "kohya"])
def test_comfy_rules_give_the_lora_model(world, layout):
    """Every module, adaLN included, applied to a BFL checkpoint as ComfyUI does, converted by diffusers' own
    checkpoint converter: the same output as the peft LoRA model."""
    base = world["base"]
    lora_sd, _ = read_file(written(world, "full", layout))
    merged = comfy_apply(to_bfl_base(base.state_dict()), lora_sd)
    m = copy.deepcopy(base)
    m.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(merged))
    assert close(run(m, world["guidance"]), world["outs"]["full"])


@pytest.mark.parametrize("layout", ["peft", "peft-generated", "bfl", "kohya"])
def test_diffusers_loads_odd_alphas_ranks_and_missing_parts(world, layout, tmp_path):
    """Scale 1.5 (bfl stores B one dtype wider), per-module rank/alpha, a fused qkv with its k part missing
    (a zero block in bfl/kohya): diffusers reads all of it. peft-generated: our own adapter config (rank_pattern,
    alpha_pattern), not diffusers' kept verbatim."""
    guidance = world["guidance"]
    names = [t for t in targets(guidance, KOHYA_DROPPED) if not t.endswith("attn.to_k")]
    m = peft_model(world["base"], guidance, names, alpha=6, rank_pattern={"^transformer_blocks.1.attn.to_q": 2},
                   alpha_pattern={"^transformer_blocks.0.attn.to_v": 3})
    sd, meta = read_file(diffusers_file(tmp_path, m))
    if layout == "peft-generated":
        lw = K.read_lora(sd, meta, ND, NS)
        lw.metadata.pop(K.CONFIG_KEY)
        out = K.write_lora(lw, "peft", ND, NS)
        assert "rank_pattern" in out[1]["lora_adapter_metadata"] and out[1]["lora_adapter_metadata"] != meta[
            "lora_adapter_metadata"]
        layout = "peft"
    else:
        out = K.convert(sd, meta, layout, ND, NS)
    path = save(tmp_path / f"odd-{layout}.safetensors", *out)
    loaded, log, injected = diffusers_load(world["base"], path)
    # from a fused qkv diffusers also injects the missing k part: a zero block, which changes nothing
    assert log == [] and injected == len(names) + (ND if layout != "peft" else 0)
    assert len(K.read_lora(*read_file(path), ND, NS)) == len(names)  # we drop it again
    assert close(run(loaded, guidance), run(m, guidance))
    lora_sd, _ = read_file(path)
    if layout != "peft":  # and ComfyUI's rules
        ref = copy.deepcopy(world["base"])
        ref.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(
            comfy_apply(to_bfl_base(world["base"].state_dict()), lora_sd)))
        assert close(run(ref, guidance), run(m, guidance))


# ------------------------------------------------------------------------------------------ (c) deltas
@pytest.mark.parametrize("layout", ["peft", "bfl", "kohya"])
def test_delta_weights_merge_to_the_lora_model(world, layout):
    sd, meta = read_file(written(world, "full", layout))
    deltas = K.delta_weights(sd, meta, ND, NS)
    m = copy.deepcopy(world["base"])
    with torch.no_grad():
        for name, d in deltas.items():
            m.get_submodule(name).weight += d
    assert close(run(m, world["guidance"]), world["outs"]["full"])


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_bfl_deltas_merge_into_a_bfl_checkpoint(world, layout):
    """naming='bfl': merged into the BFL checkpoint, converted by diffusers' own checkpoint converter."""
    sd, meta = read_file(written(world, "full", layout))
    bfl = to_bfl_base(world["base"].state_dict())
    for name, d in K.delta_weights(sd, meta, ND, NS, naming="bfl").items():
        bfl[name + ".weight"] = bfl[name + ".weight"] + d
    m = copy.deepcopy(world["base"])
    m.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(bfl))
    assert close(run(m, world["guidance"]), world["outs"]["full"])


# --------------------------------------------------------------------------------- (b) exact round trips
def lora_sd(dtype, alpha=8, r=4, skip=(), **cfg):
    """A peft file's (state dict, metadata), written as diffusers writes it, in ``dtype``."""
    base = base_model(True)
    m = peft_model(base, True, targets(True, skip), r=r, alpha=alpha, **cfg)
    sd = {f"transformer.{k}": v.to(dtype) for k, v in get_peft_model_state_dict(m).items()}
    cfg_json = {f"transformer.{k}": (list(v) if isinstance(v, set) else v)
                for k, v in m.peft_config["default"].to_dict().items()}
    return sd, {"format": "pt", "lora_adapter_metadata": json.dumps(cfg_json, indent=2, sort_keys=True)}


def same_files(a, b):
    (sa, ma), (sb, mb) = a, b
    assert ma == mb
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].view(torch.uint8) if sa[k].ndim else sa[k], sb[k].view(torch.uint8)
                           if sb[k].ndim else sb[k]), k


CASES = {
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "bf16-scale-1.5": dict(dtype=torch.bfloat16, alpha=6),  # not a power of two: B folds one dtype wider in bfl
    "fp32-scale-0.3": dict(dtype=torch.float32, alpha=1.2),
    "no-k-no-txt-v": dict(dtype=torch.bfloat16, skip=("attn.to_k", "add_v_proj")),  # zero blocks in the fused qkv
    "per-module": dict(dtype=torch.float32, alpha=8, rank_pattern={"^transformer_blocks.0.attn.to_k": 2},
                       alpha_pattern={"^transformer_blocks.0.attn.to_q": 3, "^proj_out": 5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trips_are_bit_identical(case):
    kw = dict(CASES[case])
    peft = lora_sd(kw.pop("dtype"), **kw)
    files = {"peft": peft}
    for layout in ("bfl", "kohya"):
        files[layout] = K.convert(*peft, layout, ND, NS)
    assert not any(k.endswith(".alpha") for k in files["bfl"][0])
    for src in K.LAYOUTS:
        assert K.detect_layout(files[src][0]) == src
        for dst in K.LAYOUTS:
            same_files(K.convert(*K.convert(*files[src], dst, ND, NS), src, ND, NS), files[src])
            for via in K.LAYOUTS:  # three hops
                hop = K.convert(*K.convert(*files[src], via, ND, NS), dst, ND, NS)
                same_files(K.convert(*hop, src, ND, NS), files[src])


def test_peft_metadata_survives_verbatim_and_alpha_stays_out_of_diffusers_reach():
    peft = lora_sd(torch.float32)
    bfl_sd, bfl_meta = K.convert(*peft, "bfl", ND, NS)
    assert "lora_adapter_metadata" not in bfl_meta  # diffusers would apply its alpha on top of the folded B
    assert bfl_meta[K.CONFIG_KEY] == peft[1]["lora_adapter_metadata"]
    assert K.convert(bfl_sd, bfl_meta, "peft", ND, NS)[1] == peft[1]


def test_a_foreign_bfl_file_reads_at_scale_one():
    """Without our exactness note (ai-toolkit's files), a bfl file is what ComfyUI and diffusers see: scale 1."""
    peft = lora_sd(torch.float32, alpha=6)
    sd, meta = K.convert(*peft, "bfl", ND, NS)
    foreign = K.read_lora(sd, {}, ND, NS)
    ours = K.read_lora(*peft, ND, NS)
    assert set(foreign) == set(ours) and all(m.alpha == m.rank for m in foreign.values())
    for n in ours:
        a, b = foreign[n], ours[n]
        assert torch.allclose(a.up.float() @ a.down.float() * a.scale, b.up.float() @ b.down.float() * b.scale,
                              rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["kohya", "bfl"])
def test_dense_qkv_round_trips_and_loads(world, tmp_path, layout):
    """musubi (kohya keys, .alpha) and ai-toolkit (its BFL model's keys with diffusion_model., lora_A/B) train the
    fused qkv as one linear: one down for q, k and v. Read, convert, write back: same bytes; diffusers reads it."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(ND):
        for side in ("img", "txt"):
            if layout == "kohya":
                key, dn, upn = f"lora_unet_double_blocks_{i}_{side}_attn_qkv", ".lora_down.weight", ".lora_up.weight"
                sd[key + ".alpha"] = torch.tensor(2.0)
            else:
                key, dn, upn = f"diffusion_model.double_blocks.{i}.{side}_attn.qkv", ".lora_A.weight", ".lora_B.weight"
            sd[key + dn] = torch.randn(4, HID, generator=g)
            sd[key + upn] = torch.randn(3 * HID, 4, generator=g)
    for dst in K.LAYOUTS:
        same_files(K.convert(*K.convert(sd, {}, dst, ND, NS), layout, ND, NS), (sd, {}))
    deltas = K.delta_weights(sd, {}, ND, NS)
    key = "double_blocks_1_txt_attn_qkv" if layout == "kohya" else "double_blocks.1.txt_attn.qkv"
    full = sd[[k for k in sd if key in k and ("lora_up" in k or "lora_B" in k)][0]] @ \
        sd[[k for k in sd if key in k and ("lora_down" in k or "lora_A" in k)][0]] * (0.5 if layout == "kohya" else 1)
    assert torch.allclose(deltas["transformer_blocks.1.attn.add_v_proj"], full[2 * HID:])
    m, log, injected = diffusers_load(world["base"], save(tmp_path / "dense.safetensors", sd, {}))
    assert log == [] and injected == 3 * 2 * ND
    ref = copy.deepcopy(world["base"])
    with torch.no_grad():
        for name, d in deltas.items():
            ref.get_submodule(name).weight += d
    assert close(run(m, world["guidance"]), run(ref, world["guidance"]))


def test_kohya_bf16_alpha_dtype_round_trips():
    peft = lora_sd(torch.bfloat16)
    sd, meta = K.convert(*peft, "kohya", ND, NS)
    sd = {k: v.to(torch.bfloat16) if k.endswith(".alpha") else v for k, v in sd.items()}  # as musubi saves bf16
    for dst in ("peft", "bfl"):
        same_files(K.convert(*K.convert(sd, meta, dst, ND, NS), "kohya", ND, NS), (sd, meta))


# ---------------------------------------------------------------------------------------- (d) detection
def flux1_lora(layout, preset="all_linear", extras=()):
    """A tiny FLUX.1 LoRA (hidden 16, mlp 64) written by dev2pro.lora.formats in one of its layouts."""
    from diffusers import FluxTransformer2DModel

    from dev2pro.lora.formats import LoraModule, LoraWeights, lora_to_state_dict
    from dev2pro.lora.targets import target_modules

    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=8,
                               guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    lw = LoraWeights()
    for name in target_modules(preset, 2, 2, extras):
        lin = m.get_submodule(name)
        lw[name] = LoraModule(torch.randn(4, lin.in_features), torch.randn(lin.out_features, 4), 4.0)
    return lora_to_state_dict(lw, layout, hidden=HID, mlp_hidden=4 * HID)[0]


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["kohya", "comfy", "diffusers"])
def test_flux1_loras_are_not_flux2(layout):
    sd = flux1_lora(layout, extras=("modulation",))
    assert K.lora_family(sd, shapes(sd))[0] == "flux1" and not K.looks_like_flux2(sd, shapes(sd))
    with pytest.raises(UserError, match="not a linear layer of a FLUX.2"):
        K.read_lora(sd, {}, ND, NS)
    # without modulation keys, kohya/comfy names are FLUX.2's too: the mlp width ratio (4 vs 3 SwiGLU) tells
    plain = flux1_lora(layout)
    assert K.lora_family(plain, shapes(plain))[0] == "flux1"


@pytest.mark.parametrize("layout", ["peft", "bfl", "kohya"])
def test_flux2_loras_are_flux2(world, layout):
    sd, _ = read_file(written(world, "full", layout))
    assert K.detect_layout(sd) == layout
    assert K.looks_like_flux2(sd, shapes(sd)) and K.looks_like_flux2(sd)  # names alone: *_stream_modulation
    blocks, _ = read_file(written(world, "blocks", layout))  # musubi's targets: only the shapes can tell (kohya/bfl)
    assert K.looks_like_flux2(blocks, shapes(blocks))


def test_attention_only_double_block_loras_are_undecidable():
    f1 = flux1_lora("kohya", preset="attention")
    f1 = {k: v for k, v in f1.items() if "double_blocks" in k}
    fam, why = K.lora_family(f1, shapes(f1))
    assert fam is None and "both" in why
    assert len(K.read_lora(f1, {}, ND, NS)) == 8 * ND  # a valid FLUX.2 LoRA as far as names go: check the shapes


def test_block_indices_decide_at_real_sizes():
    dbl = {"lora_unet_double_blocks_12_img_attn_qkv.lora_down.weight": torch.zeros(1)}
    sgl = {"lora_unet_single_blocks_40_linear2.lora_down.weight": torch.zeros(1)}
    assert K.lora_family(dbl)[0] == "flux1" and K.lora_family(sgl)[0] == "flux2"


def test_diffusers_names_under_other_prefixes_read_as_peft():
    down, up = torch.randn(2, HID), torch.randn(HID, 2)
    for prefix in ("diffusion_model.", "base_model.model.", ""):
        sd = {f"{prefix}transformer_blocks.1.attn.to_q.lora_A.weight": down,
              f"{prefix}transformer_blocks.1.attn.to_q.lora_B.weight": up}
        assert K.detect_layout(sd) == "peft"
        assert torch.equal(K.read_lora(sd, {}, ND, NS)["transformer_blocks.1.attn.to_q"].up, up)


def test_bad_input_is_one_line():
    with pytest.raises(UserError, match="LyCORIS"):
        K.detect_layout(["diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1"])
    with pytest.raises(UserError, match="no LoRA tensors"):
        K.detect_layout(["double_blocks.0.img_attn.qkv.weight"])
    with pytest.raises(UserError, match="more blocks"):
        K.read_lora({"transformer.transformer_blocks.3.attn.to_q.lora_A.weight": torch.zeros(2, HID),
                     "transformer.transformer_blocks.3.attn.to_q.lora_B.weight": torch.zeros(HID, 2)}, {}, ND, NS)
    with pytest.raises(UserError, match="incomplete"):
        K.read_lora({"lora_unet_img_in.lora_down.weight": torch.zeros(2, 8)}, {}, ND, NS)
