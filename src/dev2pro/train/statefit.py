"""Does a saved training state fit this run? What a state records about its run (``run_facts``: recipe, what it
trains, the model), the adapter pieces its tensor names show (``adapter_facts``: peft's LoRA / DoRA / LoKr / LoHa),
and the one-line refusals of a ``--resume`` that cannot continue here: another kind of run or model
(``check_state_fits``), another LoRA rank, type, factoring or target modules (``check_same_lora``)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# peft's adapter pieces: LoRA / DoRA ``lora_A|B`` (+ ``lora_magnitude_vector``), LoKr ``lokr_w1|w2`` or their
# low-rank factors ``lokr_w1_a|b``, ``lokr_w2_a|b``, LoHa ``hada_w1_a|b``, ``hada_w2_a|b``; then the adapter's name
ADAPTER_PIECE = re.compile(r"\.((?:lora|lokr|hada)_\w+)\.([^.]+)")
RANK_ROWS = ("lora_A", "lokr_w1_b", "lokr_w2_b", "hada_w1_b", "hada_w2_b")  # pieces whose rows are the rank
PIECE_TYPES = {"lora": "lora", "lokr": "lokr", "hada": "loha"}


def adapter_facts(shapes: dict[str, list[int]]) -> tuple[set[str], set[int], dict[str, dict[str, list[int]]]]:
    """(adapter types, the ranks the shapes show, unit -> its pieces' shapes) of trained tensors: a unit is the module
    an adapter piece belongs to (a full fine-tune's weight: itself). A LoKr shows its rank only where a side is
    factored into ``_a @ _b`` (peft factors it when the rank is below half that side's size)."""
    kinds, ranks, units = set(), set(), {}
    for name, shape in shapes.items():
        m = ADAPTER_PIECE.search(name)
        if m is None:
            units.setdefault(name, {})[""] = list(shape)
            continue
        piece = m.group(1)
        units.setdefault(name[:m.start()], {})[piece] = list(shape)
        kinds.add("dora" if piece == "lora_magnitude_vector" else PIECE_TYPES[piece.split("_")[0]])
        if piece in RANK_ROWS:
            ranks.add(shape[0])
    return (kinds - {"lora"} if "dora" in kinds else kinds), ranks, units


def configured_rank(model, names) -> int | None:
    """The rank peft was configured with for the adapter that ``names`` (trained parameters) belong to; None when
    there is no single one (a full fine-tune)."""
    adapters = {m.group(2) for n in names if (m := ADAPTER_PIECE.search(n))}
    for attr in ("module", "_orig_mod"):
        model = getattr(model, attr, model)
    configs = getattr(model, "peft_config", None)
    if len(adapters) != 1 or not isinstance(configs, dict):
        return None
    r = getattr(configs.get(adapters.pop()), "r", None)
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def check_same_lora(folder: Path, saved: dict[str, list[int]], targets: dict[str, torch.Tensor],
                    setting: str = "lora.rank", rank: int | None = None) -> None:
    """A resume whose LoRA (type, rank, trained modules) differs from the saved run's: one line saying how and the
    fix, instead of the first mismatched tensor's shape or name (``setting``: the config key of the rank; ``rank``:
    the live adapter's configured rank, which a LoKr's shapes may not show)."""
    was = {n: s for n, s in saved.items() if n.startswith("model/")}
    now = {n: list(t.shape) for n, t in targets.items() if n.startswith("model/")}
    (k_was, r_was, u_was), (k_now, r_now, u_now) = adapter_facts(was), adapter_facts(now)
    if rank is not None and k_now:
        r_now = {rank}
    if was == now or not (k_was or k_now):
        return  # the same, or no LoRA (a full fine-tune): load_sharded_tensors names any mismatch itself
    gone, added = sorted(u_was.keys() - u_now.keys()), sorted(u_now.keys() - u_was.keys())
    what, parts, keep = [], [], []
    if k_was and k_now and k_was != k_now:
        t_was, t_now = ("/".join(sorted(k)) for k in (k_was, k_now))
        what, parts, keep = ["type"], [f"{t_was} saved, {t_now} now"], [f'lora.type = "{t_was}"']
    elif r_was and r_now and r_was != r_now:  # (a LoRA against no LoRA: only the modules differ)
        r_old, r_new = (", ".join(map(str, sorted(r))) for r in (r_was, r_now))
        what, parts, keep = ["rank"], [f"rank {r_old} saved, {r_new} now"], [f"{setting} = {r_old}"]
    elif k_was == k_now and (odd := [u for u in sorted(u_was.keys() & u_now.keys()) if u_was[u] != u_now[u]]):
        # a LoKr factored otherwise: a rank that no shape of one side shows, or lokr_factor / lokr_decompose_both
        what = ["factoring"]
        parts = [f"{odd[0].removeprefix('model/')} saved as {_pieces(u_was[odd[0]])}, now {_pieces(u_now[odd[0]])}"]
        keep = [f"the saved run's {setting}, lora.lokr_factor and lora.lokr_decompose_both"]
    if gone or added:
        what.append("target modules")
        parts += [f"{len(gone)} saved but not trained now, e.g. {gone[0].removeprefix('model/')}"] if gone else []
        parts += [f"{len(added)} trained now but not saved, e.g. {added[0].removeprefix('model/')}"] if added else []
        keep.append("the saved run's lora.targets, extra_targets, double_blocks, single_blocks and type"
                    if setting == "lora.rank" else f"the saved run's {setting} (an adapter run's state resumes an "
                    "adapter run only, a full fine-tune's a full fine-tune only)")
    if what:
        raise UserError(f"{folder}: the LoRA's {' and '.join(what)} differ{'s' if what[-1] != 'target modules' else ''}"
                        f" from the saved run's ({'; '.join(parts)}): keep {' and '.join(keep)} to resume it, or start "
                        "a new run (without --resume, in another save.output_dir)")


def _pieces(pieces: dict[str, list[int]]) -> str:
    return " + ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in pieces.items())


# ------------------------------------------------------------------------------------------------ a resumed state
_TRAINS = {"full": "a full fine-tune's state (`dev2pro dedistill`: every weight trained)",
           "lora": "a LoRA training state (`dev2pro train`)",
           "adapter": "an adapter de-distillation state (`dev2pro dedistill` with train.adapter_rank)"}
_NOW = {"full": "every weight (a full de-distillation)", "lora": "a LoRA",
        "adapter": "a de-distillation adapter (train.adapter_rank)"}


def run_facts(model, trained: Iterable[str], recipe: str) -> dict:
    """What a training state records about the run that saved it (``common.json``'s ``run``), and what a resume
    compares it with: the recipe, what it trains (``lora``: `train`'s LoRA, ``adapter``: dedistill's adapter,
    ``full``: every weight) and the model (family, FLUX.2 klein or dev, width, blocks)."""
    from .. import families  # on use: the families registry imports training modules

    fam = families.of_model(model)
    lora = any(ADAPTER_PIECE.search(n) for n in trained)
    trains = ("adapter" if recipe == "dedistill" else "lora") if lora else "full"
    inner = model
    for attr in ("module", "_orig_mod"):
        inner = getattr(inner, attr, inner)
    try:
        spec = fam.spec_from_config(dict(inner.config))
    except Exception:  # noqa: BLE001 -- a model without a readable config: the family alone is compared
        spec = None
    return spec_facts(fam, spec, recipe, trains)


def spec_facts(family, spec, recipe: str, trains: str) -> dict:
    """``run_facts`` from a checkpoint's header (``family``, ``spec``: None when unreadable) before the model is
    loaded: ``recipe`` (train | dedistill) training ``trains`` (lora | adapter | full)."""
    facts = {"recipe": recipe, "trains": trains, "family": family.name, "model": family.title}
    if spec is None:
        return facts
    if family.name == "flux2":
        facts["model"] += " klein" if spec.is_klein else " dev"
    return {**facts, "hidden": spec.hidden, "double": spec.num_double, "single": spec.num_single}


def check_state_fits(folder: Path, saved: dict | None, shapes: dict, now: dict, names: set[str] | None) -> None:
    """A ``--resume`` state of another kind of run than this one (``now``: ``run_facts``) -- a full fine-tune's given
    to a LoRA run or the reverse, `train`'s LoRA given to dedistill's adapter run, another model's -- is one line
    saying what it is and how to go on (``state.check_same_lora`` would read it as other target modules).
    ``saved``: what the state recorded (states of older versions record nothing: their tensors' names, the run
    folder's config.toml and the live model's module and parameter ``names`` tell; None: before it is loaded)."""
    saved = dict(saved or {})
    kinds, ranks, units = adapter_facts({n: s for n, s in shapes.items() if n.startswith("model/")})
    recipe = saved.get("recipe") or _recipe_of(folder)
    trains = saved.get("trains") or (("adapter" if recipe == "dedistill" else "lora") if kinds else "full")
    go_on = f"continue it with `{_continue_hint(folder, recipe or ('dedistill' if trains == 'full' else 'train'))}`"
    fresh = "or start this run without --resume (in another save.output_dir, or with --overwrite)"
    if trains != now["trains"]:
        if {trains, now["trains"]} == {"full", "adapter"}:
            go_on = ("set train.adapter_rank = 0 to resume it" if trains == "full" else
                     f"set train.adapter_rank = {', '.join(map(str, sorted(ranks))) or 'its rank'} to resume it")
        raise UserError(f"{folder} is {_TRAINS[trains]}, and this run trains {_NOW[now['trains']]}: {go_on}, {fresh}")
    size = ("family", "hidden", "double", "single")
    if all(k in saved for k in size) and all(k in now for k in size):
        if any(saved[k] != now[k] for k in size):
            other = "another model family" if saved["family"] != now["family"] else "another model"
            raise UserError(f"{folder} is a state of {other}: it trained {_model(saved)}, this run trains "
                            f"{_model(now)}; a state resumes only on the model it was trained on: {go_on}, {fresh}")
        return
    if names is None:
        return
    foreign = sorted(u.removeprefix("model/") for u in units if u.removeprefix("model/") not in names)
    if foreign:  # an older state: trained modules this model does not have
        raise UserError(f"{folder} is a state of another model: it trained {foreign[0]}, which this run's "
                        f"{now['model']} model does not have ({len(foreign)} of its {len(units)} trained modules "
                        f"are not in it); a state resumes only on the model it was trained on: {go_on}, {fresh}")


def _model(facts: dict) -> str:
    return (f"{facts['model']} ({facts['hidden']} wide, {facts['double']} double + {facts['single']} single "
            "blocks)")


def _run_config(folder: Path) -> Path | None:
    """The config.toml of the run a state folder (``RUN/state/step-NNNNNN``) belongs to, if it is there."""
    config = folder.parent.parent / "config.toml"
    return config if folder.parent.name == "state" and config.is_file() else None


def _recipe_of(folder: Path) -> str:
    """``train`` | ``dedistill`` | "" (unknown): the command of the run that saved ``folder``, from its config."""
    config = _run_config(folder)
    try:
        data = tomllib.loads(config.read_text()) if config else {}
    except (OSError, ValueError):
        return ""
    return "dedistill" if "objective" in data else "train" if "lora" in data else ""


def _continue_hint(folder: Path, recipe: str) -> str:
    return f"dev2pro {recipe} {_run_config(folder) or 'ITS_CONFIG.toml'} --resume {folder}"
