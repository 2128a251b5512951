"""A second client for LoKr / LoHa / DoRA files: ComfyUI's loader semantics, written from its published code
(``comfy/lora.py`` key maps, ``comfy/weight_adapter/{lora,lokr,loha,base}.py``), independent of dev2pro's readers.

Keys: ``lora_unet_<BFL weight path, _>`` or ``diffusion_model.<BFL path>`` patches a whole BFL weight (the generic map built from the model's own
state-dict keys); ``lora_transformer_<diffusers path, _>`` patches a row slice of a fused BFL weight (the
``flux_to_diffusers`` map: q/k/v thirds of ``img_attn.qkv`` / ``txt_attn.qkv``, FLUX.1's single-block q/k/v/mlp rows
of ``linear1``) or, for ``norm_out.linear``, the final adaLN with its scale/shift halves swapped.
"""

import re

import torch

_SUFFIX = re.compile(r"\.(lokr_w[12](?:_[ab])?|hada_w[12]_[ab]|lora_(?:down|up)\.weight|alpha|dora_scale)$")


def key_map(bfl_keys, n_double, n_single, hidden, mlp_hidden=None):
    """ComfyUI's Flux key map: lora key prefix -> (BFL weight key, (start, length) or None, swap halves)."""
    km = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): (k, None, False)
          for k in bfl_keys if k.endswith(".weight")}
    km.update({"diffusion_model." + k[: -len(".weight")]: (k, None, False) for k in bfl_keys if k.endswith(".weight")})
    h = hidden
    for i in range(n_double):
        for j, (q, kk, v) in enumerate([("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")]):
            fused = f"double_blocks.{i}.{'img' if j == 0 else 'txt'}_attn.qkv.weight"
            for n, part in enumerate((q, kk, v)):
                km[f"lora_transformer_transformer_blocks_{i}_attn_{part}"] = (fused, (n * h, h), False)
    if mlp_hidden:  # FLUX.1: single-block linear1 = q|k|v|mlp
        for i in range(n_single):
            for n, part in enumerate(("attn_to_q", "attn_to_k", "attn_to_v")):
                km[f"lora_transformer_single_transformer_blocks_{i}_{part}"] = (
                    f"single_blocks.{i}.linear1.weight", (n * h, h), False)
            km[f"lora_transformer_single_transformer_blocks_{i}_proj_mlp"] = (
                f"single_blocks.{i}.linear1.weight", (3 * h, mlp_hidden), False)
    km["lora_transformer_norm_out_linear"] = ("final_layer.adaLN_modulation.1.weight", None, True)
    return km


def weight_decompose(dora_scale, weight, lora_diff, alpha, strength, function):
    """comfy/weight_adapter/base.py (with its output-axis branch), fp32."""
    lora_diff = lora_diff * alpha
    weight_calc = weight + function(lora_diff)
    if dora_scale.shape[0] == weight_calc.shape[0]:
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
    else:
        weight_norm = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True) \
            .transpose(0, 1)
    weight_norm = weight_norm + torch.finfo(torch.float32).eps
    weight_calc = weight_calc * (dora_scale / weight_norm)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def _patch(weight, g, strength, function):
    dora = g.get("dora_scale")
    alpha = float(g["alpha"]) if "alpha" in g else None
    if "lora_up.weight" in g:
        up, down = g["lora_up.weight"].float(), g["lora_down.weight"].float()
        a = alpha / down.shape[0] if alpha is not None else 1.0
        diff = up @ down
    elif "hada_w1_a" in g:
        w1 = g["hada_w1_a"].float() @ g["hada_w1_b"].float()
        w2 = g["hada_w2_a"].float() @ g["hada_w2_b"].float()
        a = alpha / g["hada_w1_b"].shape[0] if alpha is not None else 1.0
        diff = w1 * w2
    else:
        dim = None
        w1 = g.get("lokr_w1")
        if w1 is None:
            dim = g["lokr_w1_b"].shape[0]
            w1 = g["lokr_w1_a"].float() @ g["lokr_w1_b"].float()
        w2 = g.get("lokr_w2")
        if w2 is None:
            dim = g["lokr_w2_b"].shape[0]
            w2 = g["lokr_w2_a"].float() @ g["lokr_w2_b"].float()
        a = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1.float(), w2.float()).reshape(weight.shape)
    if dora is not None:
        return weight_decompose(dora.float(), weight, diff, a, strength, function)
    return weight + function(strength * a * diff)


def _swap(t):
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])


def comfy_merge(base_sd, lora_sd, km, strength=1.0):
    """The BFL state dict ComfyUI would patch from ``lora_sd`` (fp32); raises KeyError on a key it cannot map."""
    out = {k: v.float().clone() for k, v in base_sd.items()}
    groups = {}
    for key, t in lora_sd.items():
        m = _SUFFIX.search(key)
        groups.setdefault(key[: m.start()], {})[m.group(1)] = t
    for prefix, g in groups.items():
        target, offset, swap = km[prefix]
        w = out[target]
        function = _swap if swap else (lambda t: t)
        if offset is None:
            out[target] = _patch(w, g, strength, function)
        else:
            a, n = offset
            w[a:a + n] = _patch(w[a:a + n].clone(), g, strength, function)
    return out
