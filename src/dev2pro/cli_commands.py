"""The argument parsers of every `dev2pro` subcommand, built without importing torch, diffusers or a recipe.

Each ``add_*`` function adds one subcommand to an ``argparse`` subparsers object and sets ``run`` to a function
that imports its recipe only when called, so ``dev2pro --help`` and ``dev2pro CMD --help`` stay fast (importing
torch + diffusers takes seconds). Choices (sampling modes, layouts) come from the torch-free ``choices`` module the
libraries use too, and the config schemas are torch-free, so both are imported here eagerly.

Conventions shared by all subcommands: every argument has help text; image sizes are ``--size WxH``; output
paths get their missing parent folders created; counts are bounded (``bounded_int``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .arguments import check_size
from .config import INT_LIMIT, SIZE_HELP, parse_size
from .choices import CHECKPOINT_LAYOUTS, FAMILIES, GUIDANCE_MODES, LORA_LAYOUTS, TEXT_DTYPES
from .errors import ConfigError, UserError
from .cli_recipes import add_dedistill, add_train  # noqa: F401 -- train/dedistill's parsers (cli.py names them here)

SAMPLE_MODES = GUIDANCE_MODES
TINY_FAMILIES = ("flux1", "flux2-klein", "flux2-dev")
OVERWRITE_HELP = "replace an existing output (without it, existing outputs are never touched)"
PICKLE_HELP = "allow pickle weights (.ckpt/.pt/.pth/.bin, diffusers folders of .bin): unpickling can run code"


# ------------------------------------------------------------------------------------------------ argument types
def bounded_int(low: int = 0, high: int = INT_LIMIT):
    """An argparse type: an integer in [low, high], with an error that says the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: at least {low}, at most {high}")
        return value
    parse.__name__ = "integer"
    return parse


def finite_float(low: float, *, above: bool = False):
    """An argparse type: a finite number >= ``low`` (> ``low`` with ``above``); NaN and inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text} is out of range: a finite number {'>' if above else '>='} "
                                             f"{low:g}")
        return value
    parse.__name__ = "number"
    return parse


def size_arg(text: str) -> tuple[int, int]:
    """``--size WxH`` -> (width, height), both multiples of 16 (what the pipelines render)."""
    try:
        return check_size(*parse_size(text), flag="size")  # argparse prefixes "argument --size: "
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def make_parent(path: str | Path) -> None:
    """Create the missing parent folders of an output path (like kohya and ai-toolkit do); a full or read-only
    disk is a one-line error."""
    from .outputs import make_parent as make  # when a command runs: outputs loads torch, --help must not

    make(Path(path).expanduser().absolute())


def hide_aliases(action: argparse.Action, *flags: str) -> argparse.Action:
    """Old spellings of ``action``'s flag kept working but left out of --help and usage (``lora convert --to`` is
    now ``--layout``): one action for all spellings, so a required flag is satisfied by any of them."""
    for flag in flags:
        action.option_strings.remove(flag)  # the parser still maps it to the action; help and usage list the rest
    return action


# ------------------------------------------------------------------------------------------------ checkpoints
def add_init_tiny(sub):
    p = sub.add_parser("init-tiny", help="write a tiny random-weight model folder in a real diffusers layout "
                                         "(FLUX.1-dev, FLUX.2 klein or FLUX.2 dev)")
    p.add_argument("dir", help="folder to create (missing parents are created)")
    p.add_argument("--family", choices=TINY_FAMILIES, default="flux1",
                   help="flux1 (FluxPipeline), flux2-klein (Flux2KleinPipeline, Qwen3) or flux2-dev (Flux2Pipeline, "
                        "Mistral3)")
    p.add_argument("--variant", choices=["dev", "pro", "base", "distilled"], default=None,
                   help="flux1: dev (guidance embedding, default) | pro (none, true CFG); flux2-klein: base "
                        "(undistilled, true CFG, default) | distilled (4 steps, no CFG)")
    p.add_argument("--seed", type=bounded_int(), default=0, help="seed of the random weights (default 0)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    def run(a):
        from .recipes.checkpoint_tools import init_tiny
        make_parent(a.dir)
        init_tiny(a.dir, a.variant, a.seed, a.overwrite, family=a.family)
    p.set_defaults(run=run)


def add_inspect(sub):
    p = sub.add_parser("inspect", help="describe a Flux checkpoint: layout, variant, dtypes, blocks, size")
    p.add_argument("path", help="a .safetensors file or a diffusers model/transformer folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)

    def run(a):
        from .recipes.checkpoint_tools import inspect
        inspect(a.path, a.json, a.allow_pickle)
    p.set_defaults(run=run)


def add_convert(sub):
    p = sub.add_parser("convert", help="convert a Flux checkpoint between layouts and dtypes (streaming)")
    p.add_argument("src", help="input checkpoint: a .safetensors file or a diffusers folder")
    p.add_argument("dst", help="output file, or folder for --layout diffusers (missing parent folders are created)")
    p.add_argument("--layout", choices=CHECKPOINT_LAYOUTS,
                   help="output layout (default: as input; a diffusers folder into NAME.safetensors: one bfl file)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp8", "fp8-scaled"],
                   help="output dtype of the weights (default: as input)")
    p.add_argument("--keep", metavar="GROUPS",
                   help="fp8 only: comma-separated groups kept in bf16 (default norms,biases,embedders,modulation,"
                        "final; pass '' to quantise every 2-D weight)")
    p.add_argument("--drop-guidance", action="store_true",
                   help="drop the guidance embedding (the output is sampled with true CFG)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.add_argument("--allow-incomplete", action="store_true",
                   help="write the output even if the source lacks transformer tensors (it will not load)")
    p.add_argument("--variant", choices=("klein-base", "klein-distilled"), default=None,
                   help="record which FLUX.2 klein this is (Base and distilled share their keys; a BFL / ComfyUI "
                        "single file does not say, and is sampled as Base until it does)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs: the result line only)")

    def run(a):
        from .recipes.checkpoint_tools import convert
        make_parent(a.dst)
        convert(a.src, a.dst, a.layout, a.dtype, a.keep, a.overwrite, a.allow_pickle, a.drop_guidance,
                a.allow_incomplete, show_progress=not a.no_progress, variant=a.variant)
    p.set_defaults(run=run)


# ------------------------------------------------------------------------------------------------ data + training
def add_cache(sub):
    p = sub.add_parser("cache", help="encode image folders / webdataset tars into sharded latent+text caches")
    p.add_argument("inputs", nargs="+", help="image folders (name.png + name.txt, or a kohya parent of N_name/ "
                                             "folders) and/or webdataset .tar shards")
    p.add_argument("--model", required=True, help="diffusers model folder whose VAE and text encoder encode the "
                                                  "data: FLUX.1 dev, FLUX.2 klein or dev (the one you train on)")
    p.add_argument("--out", required=True, help="output folder for shards and index.json (created)")
    p.add_argument("--family", choices=("auto", *FAMILIES), default="auto",
                   help="model family (default: from the folder's model_index.json)")
    p.add_argument("--per-shard", type=bounded_int(1), default=1000, help="samples per shard file (default 1000)")
    p.add_argument("--resolution", type=bounded_int(16, 16384), default=512,
                   help="bucket target side: buckets hold about resolution^2 pixels (default 512)")
    p.add_argument("--bucket-step", type=bounded_int(16, 16384), default=64,
                   help="bucket sides are multiples of this, a multiple of 16 (default 64)")
    p.add_argument("--t5-max-length", type=bounded_int(1, 512), default=512,
                   help="caption tokens of the text encoder (FLUX.1's T5, FLUX.2's Qwen3/Mistral): 512 for dev, "
                        "de-distilled bases and FLUX.2 (default 512)")
    p.add_argument("--text-encoder", choices=("gpu", "cpu"), default="gpu",
                   help="where the text encoder runs (default gpu when there is one)")
    p.add_argument("--text-encoder-dtype", choices=TEXT_DTYPES, default="fp32",
                   help="text encoder dtype: bf16 halves T5-XXL's 19 GB; fp8: FLUX.2 only, Mistral 24B in ~25 GB "
                        "(default fp32)")
    p.add_argument("--default-caption", default="", help="caption for images without a .txt file")
    p.add_argument("--min-size", type=bounded_int(1), default=16,
                   help="images smaller than this on a side are skipped and listed (default 16, as in train)")
    p.add_argument("--recursive", action="store_true", help="also read images in subfolders of each folder")
    p.add_argument("--strict", action="store_true",
                   help="stop on unusable images (broken, tiny, unsupported format) instead of skipping them")
    p.add_argument("--batch-size", type=bounded_int(1, 4096), default=4, help="encoder batch size (default 4)")
    p.add_argument("--controls", action="append", default=[], metavar="DIR",
                   help="FLUX.2 edit pairs: folder of same-name reference images (as [[data.folders]] controls); "
                        "repeat for several references per image, in order")

    def run(a):
        from .recipes.cache import cache
        r = cache(a.inputs, a.model, a.out, a.per_shard, a.resolution, a.bucket_step, a.t5_max_length,
                  a.default_caption, a.batch_size, min_size=a.min_size, recursive=a.recursive, strict=a.strict,
                  family=a.family, text_device="cpu" if a.text_encoder == "cpu" else None,
                  text_dtype=a.text_encoder_dtype, controls=a.controls)
        skipped = f" ({len(r['skipped'])} skipped, listed above and in index.json)" if r["skipped"] else ""
        print(f"{r['samples']} samples ({r['family']}) -> {r['index']}{skipped}")
    p.set_defaults(run=run)


# ------------------------------------------------------------------------------------------------ sampling
def add_sample(sub):
    p = sub.add_parser("sample", help="render prompts x seeds from a Flux base (+ LoRAs) to PNGs and a grid")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="diffusers model folder, FLUX.1 or FLUX.2 (VAE, text encoders, scheduler, default transformer)")
    p.add_argument("--transformer", metavar="FILE",
                   help="transformer checkpoint to use instead of the folder's (any layout/dtype, incl. fp8)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA file with optional strength (default 1.0); repeat for several")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for several")
    src.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line ('#' lines skipped)")
    p.add_argument("--negative", default="", metavar="TEXT", help="negative prompt for true CFG (default: empty)")
    p.add_argument("--guidance", type=finite_float(0, above=True), default=None,
                   help="guidance strength: the embedded value on dev-like bases, the CFG scale on bases without a "
                        "guidance embedding (default: the base's own: 3.5 FLUX.1, 4 FLUX.2 dev and klein Base; klein "
                        "distilled runs without CFG)")
    p.add_argument("--cfg", type=finite_float(1), default=None,
                   help="true CFG scale (> 1 adds a negative-prompt pass; combines with embedded guidance; 1 turns "
                        "it off on a base without guidance embedding, whose default is its own, e.g. klein Base 4)")
    p.add_argument("--mode", choices=SAMPLE_MODES, default="auto",
                   help="auto: embedded if the base has a guidance embedding, else true_cfg")
    p.add_argument("--steps", type=bounded_int(1, 10000), default=None,
                   help="sampling steps (default: the base's own: 20 FLUX.1, 50 FLUX.2 dev and klein Base, 4 klein "
                        "distilled)")
    p.add_argument("--size", type=size_arg, default=(1024, 1024), metavar="WxH",
                   help=SIZE_HELP + "; default 1024x1024")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=bounded_int(0, 2**64 - 1), help="one seed (default 0)")
    seeds.add_argument("--seeds", metavar="A,B,C", help="comma-separated seeds")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created with its parents; empty, absent, or an earlier sample's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this command (a folder holding other files is refused)")
    p.add_argument("--fp8", action="store_true", help="keep fp8 checkpoints in fp8 storage (less memory)")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP + "; the transformer only")
    p.add_argument("--blocks-to-swap", type=bounded_int(0, 1000), default=0, metavar="N",
                   help="keep N transformer blocks' weights in host RAM, copied in just before use (less VRAM)")
    p.add_argument("--adapter", default=None, metavar="FILE[:SCALE]",
                   help="training adapter (e.g. a dev -> dev2pro LoRA) as a side branch: dev + adapter + LoRA "
                        "renders the LoRA on dev2pro with one base")
    p.add_argument("--image", action="append", default=None, metavar="FILE",
                   help="reference image every prompt edits (FLUX.2: an edit-pair LoRA; fitted to --size); repeat "
                        "for several, in the order the LoRA was trained with")

    def run(a):
        from . import sampling as S
        from .recipes.sample import run_sample
        prompts = S.read_prompts(a.prompts) if a.prompts else a.prompt
        seeds = S.parse_seeds(a.seeds) if a.seeds else [a.seed if a.seed is not None else 0]
        make_parent(a.out)
        run_sample(a.model, prompts, a.out, transformer=a.transformer, loras=a.lora, negative=a.negative,
                   guidance=a.guidance, cfg=a.cfg, mode=a.mode, steps=a.steps, size=a.size, seeds=seeds,
                   overwrite=a.overwrite, fp8=a.fp8, blocks_to_swap=a.blocks_to_swap, adapter=a.adapter,
                   image=a.image, allow_pickle=a.allow_pickle)
    p.set_defaults(run=run)


def add_plan(sub):
    p = sub.add_parser("plan", help="estimate GPU memory and host RAM of a `dev2pro train` config before running it")
    p.add_argument("config", help="a train config TOML, or a dedistill config with train.adapter_rank")
    p.add_argument("--vram", type=finite_float(0, above=True), metavar="GB",
                   help="check against a card of this size (default: the GPU seen)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")

    def run(a):
        from .recipes.plan import run_plan  # torch: only when the command runs
        run_plan(a.config, a.vram, a.set)
    p.set_defaults(run=run)


def add_calibrate(sub):
    p = sub.add_parser("calibrate", help="the strength at which a LoRA does on a target model (e.g. FLUX.2 klein "
                                         "distilled) what it does at 1.0 on the model it was trained on (Base)")
    p.add_argument("lora", metavar="LORA", help="the LoRA file (any layout dev2pro reads)")
    p.add_argument("--model", required=True, metavar="DIR", help="model folder: text encoder, VAE, scheduler and "
                                                                "the default reference transformer")
    p.add_argument("--target", required=True, metavar="FILE|DIR", help="the model the LoRA will be used on")
    p.add_argument("--reference", metavar="FILE|DIR", help="the model it was trained on (default: the folder's)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for several")
    src.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line ('#' lines skipped)")
    p.add_argument("--seeds", default="0,1", metavar="A,B,C", help="comma-separated seeds (default 0,1)")
    p.add_argument("--size", type=size_arg, default=(512, 512), metavar="WxH", help=SIZE_HELP + "; default 512x512")
    p.add_argument("--reference-steps", type=bounded_int(1, 10000), default=None, metavar="N",
                   help="sampling steps on the reference (default: its variant's, e.g. 50 for klein Base)")
    p.add_argument("--reference-cfg", type=finite_float(0, above=True), default=None, metavar="X",
                   help="guidance / CFG on the reference (default: its variant's, e.g. true CFG 4 for klein Base; "
                        "a dev2pro de-distillation: true CFG at guidance 1)")
    p.add_argument("--steps", type=bounded_int(1, 10000), default=None, metavar="N",
                   help="sampling steps on the target (default: its variant's, e.g. 4 for klein distilled)")
    p.add_argument("--cfg", type=finite_float(0, above=True), default=None, metavar="X",
                   help="guidance / CFG on the target (default: its variant's, e.g. 1 for klein distilled)")
    p.add_argument("--strengths", default=",".join(str(s) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)),
                   metavar="A,B,C", help="the grid searched before bisection (default 0.5..3.0)")
    p.add_argument("--report", metavar="FILE.json", help="write the measurements and recommendation as JSON")
    p.add_argument("--write", action="store_true",
                   help="record the recommendation in the LoRA file's metadata (dev2pro.recommended_strength; the "
                        "tensors are rewritten unchanged)")

    def run(a):
        from . import sampling as S
        from .recipes.calibrate import run_calibrate
        prompts = S.read_prompts(a.prompts) if a.prompts else a.prompt
        try:
            strengths = [float(s) for s in a.strengths.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--strengths {a.strengths!r}: comma-separated numbers, e.g. 1,1.5,2") from None
        if a.report:
            make_parent(a.report)
        run_calibrate(a.model, a.lora, a.target, prompts, reference=a.reference, seeds=S.parse_seeds(a.seeds),
                      size=a.size, reference_steps=a.reference_steps, reference_cfg=a.reference_cfg, steps=a.steps,
                      cfg=a.cfg, strengths=strengths, report=a.report, write=a.write)
    p.set_defaults(run=run)


def add_compare(sub):
    p = sub.add_parser("compare", help="render the same prompts and seeds through several arms (bases, LoRAs, "
                                       "guidance) and write a side-by-side grid, an HTML report and metrics")
    p.add_argument("config", metavar="CONFIG.toml", help="compare config: model, prompts, seeds, size, [[arms]]")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the config's 'out'; parents created)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this command (a folder holding other files is refused)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set steps=4 (repeatable)")
    p.add_argument("--strengths", metavar="A,B,C", default=None,
                   help="render every arm that has LoRAs once per strength (e.g. 1,1.25,1.5,2: a Base-trained LoRA "
                        "on the distilled model at several strengths)")

    def run(a):
        from .recipes.compare import compare
        if a.out:
            make_parent(a.out)
        strengths = None
        if a.strengths:
            try:
                strengths = [float(s) for s in a.strengths.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"--strengths {a.strengths!r}: comma-separated numbers, e.g. 1,1.5,2") from None
        compare(a.config, a.out, a.overwrite, a.overrides, strengths)
    p.set_defaults(run=run)


# ------------------------------------------------------------------------------------------------ LoRA tools
def add_lora(sub):
    p = sub.add_parser("lora", help="LoRA tools: info, convert, merge, extract")
    lsub = p.add_subparsers(dest="lora_command", required=True, metavar="{info,convert,merge,extract}")
    for add in (_add_lora_info, _add_lora_convert, _add_lora_merge, _add_lora_extract):
        add(lsub)


def _add_lora_info(lsub):
    i = lsub.add_parser("info", help="layout, targets, rank/alpha per group, metadata")
    i.add_argument("file", help="a LoRA .safetensors file (kohya, diffusers/peft or comfy layout)")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    def info(a):
        from .recipes.lora_tools import info
        info(a.file, as_json=a.json)
    i.set_defaults(run=info)


def _add_lora_convert(lsub):
    c = lsub.add_parser("convert", help="convert between kohya, diffusers and comfy layouts (exact)")
    c.add_argument("src", help="input LoRA file (any supported layout)")
    c.add_argument("dst", help="output LoRA file (missing parent folders are created)")
    hide_aliases(c.add_argument("--layout", "--to", required=True, choices=LORA_LAYOUTS,
                                help="output layout (the same flag as `dev2pro convert`)"), "--to")
    c.add_argument("--family", choices=FAMILIES, default=None,
                   help="the model the LoRA is for, when neither its keys nor its header tell (an attention-only "
                        "LoRA fits FLUX.1 and FLUX.2 klein 4B alike; default: read as FLUX.1, with a note)")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    def convert(a):
        from .recipes.lora_tools import convert
        make_parent(a.dst)
        convert(a.src, a.dst, a.layout, a.overwrite, a.family)
    c.set_defaults(run=convert)


def _add_lora_merge(lsub):
    m = lsub.add_parser("merge", help="bake LoRAs into a checkpoint (fp8 requantised with the same scheme)")
    m.add_argument("--base", required=True, help="base checkpoint (.safetensors; any layout, fp8 included)")
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]",
                   help="LoRA file with optional strength (default 1.0); repeat for several")
    m.add_argument("out", help="output checkpoint file (missing parent folders are created)")
    m.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    def merge(a):
        from .recipes.lora_tools import merge
        from .sampling import parse_lora_arg
        loras = [parse_lora_arg(x) for x in a.lora]
        make_parent(a.out)
        merge(a.base, loras, a.out, a.overwrite)
    m.set_defaults(run=merge)


def _add_lora_extract(lsub):
    e = lsub.add_parser("extract", help="SVD of (TUNED - BASE) per linear layer into a kohya LoRA "
                                        "(e.g. --base dev --tuned dev2pro); a retained-energy report is written "
                                        "beside it as <out>.json")
    # the old spelling: --from A --to B
    hide_aliases(e.add_argument("--base", "--from", required=True, help="the original checkpoint, e.g. FLUX.1-dev"),
                 "--from")
    hide_aliases(e.add_argument("--tuned", "--to", required=True, help="the fine-tuned checkpoint, e.g. your dev2pro"),
                 "--to")
    e.add_argument("out", help="output LoRA file, or with --ranks the JSON fidelity report (missing parent folders "
                               "are created)")
    e.add_argument("--rank", type=bounded_int(1, 65536), default=None,
                   help="LoRA rank (the maximum with --energy); required unless --ranks")
    e.add_argument("--energy", type=float, default=None,
                   help="per layer, the smallest rank keeping this fraction of the difference's energy (0-1]; warns "
                        "where --rank does not reach it; also the target of the recommended rank (default 0.9)")
    e.add_argument("--ranks", default=None, metavar="4,16,64",
                   help="write only a fidelity report for these ranks (energy and output error), no LoRA file")
    e.add_argument("--exact", action="store_true",
                   help="full SVD for every layer (default: randomized truncated SVD when rank << width)")
    e.add_argument("--device", default=None, help="where the SVDs run (default: cuda if available, else cpu)")
    e.add_argument("--niter", type=bounded_int(0, 100), default=4, help="power iterations of the randomized SVD")
    e.add_argument("--oversample", type=bounded_int(0, 4096), default=16,
                   help="extra columns of the randomized SVD")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    def extract(a):
        from .recipes.lora_tools import extract_lora
        ranks = None
        if a.ranks:
            try:
                ranks = sorted({int(x) for x in a.ranks.split(",") if x.strip()})
            except ValueError:
                e.error(f"--ranks {a.ranks!r} must be comma-separated integers, e.g. 4,16,64")
        elif a.rank is None:
            e.error("the following arguments are required: --rank (or --ranks for a fidelity report)")
        make_parent(a.out)
        extract_lora(a.base, a.tuned, a.out, a.rank, a.energy, a.overwrite, exact=True if a.exact else None,
                     ranks=ranks, device=a.device, oversample=a.oversample, niter=a.niter)
    e.set_defaults(run=extract)


# ------------------------------------------------------------------------------------------------ demo
def add_demo(sub):
    p = sub.add_parser("demo", help="measure the Dev2Pro claim end to end on toy Flux models (CPU, ~10 min)")
    p.add_argument("--out", default=None,
                   help="output folder (default demo-out, demo-flux2-dev-out, demo-klein-out, demo-klein-edit-out; "
                        "a finished stage is reused on rerun)")
    p.add_argument("--family", choices=("flux1", "flux2-dev", "flux2-klein", "flux2-klein-edit"), default="flux1",
                   help="flux2-dev: the same Dev2Pro story on FLUX.2 [dev] architecture models; flux2-klein: train "
                        "on klein Base, use on the distilled model, with calibrated strengths; flux2-klein-edit: "
                        "does an edit-pair LoRA (controls) learn to use its reference image")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="profile", const="quick", help="smoke test, ~2 min")
    size.add_argument("--full", action="store_const", dest="profile", const="full",
                      help="longer training, 8 seeds, a cfg_teacher arm (on 2 cores about 30 minutes; "
                           "flux2-dev about 70, where it is the profile whose toy learns the prompt; "
                           "flux2-klein-edit: 3 seeds, about 12)")
    p.add_argument("--seeds", type=bounded_int(1, 1000), default=None,
                   help="LoRA seeds per arm (default 5; 3 with --quick; flux2-klein-edit: 2, 1 with --quick)")
    p.add_argument("--workers", type=bounded_int(1, 1024), default=2, help="parallel LoRA jobs (one CPU core each)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier demo's folder first (a folder holding other files is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")

    def run(a):
        if a.family == "flux2-klein-edit":
            from .recipes.demo_edit import run_demo_edit
            out = a.out or "demo-klein-edit-out"
            make_parent(out)
            return run_demo_edit(out, a.profile, a.seeds, a.overwrite, not a.no_progress, a.workers)
        if a.family == "flux2-klein":
            from .recipes.demo_klein import run_demo_klein
            out = a.out or "demo-klein-out"
            make_parent(out)
            return run_demo_klein(out, a.profile, a.seeds, a.overwrite, not a.no_progress, a.workers)
        from .recipes.demo import run_demo
        out = a.out or {"flux1": "demo-out", "flux2-dev": "demo-flux2-dev-out"}[a.family]
        make_parent(out)
        run_demo(out, a.profile, a.seeds, a.overwrite, not a.no_progress, a.workers, a.family)
    p.set_defaults(profile="default", run=run)
