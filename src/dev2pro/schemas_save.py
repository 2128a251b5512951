"""The config sections of what a run puts out: ``[sample]`` (sample grids during training) and ``[save]`` (the run
folder, LoRA files or exports, resumable states), for `dev2pro train` and `dev2pro dedistill`. Kept apart from
``schemas`` so that module stays about the model, the data and the optimisation; ``schemas`` re-exports every
name here, so ``from dev2pro.schemas import SaveSection`` keeps working.

Each pair shares a base (``SampleBase``, ``SaveBase``); the LoRA's sections add what only `train` does: the
epoch cadences (``every_epochs``, resolved to steps from the dataset when a run starts) and ``save.keep_loras``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .arguments import check_size
from .choices import COMPUTE_DTYPES, EXPORT_FORMATS, MAX_REFERENCES
from .config import SIZE_HELP, opt, ordered, require, require_path_list, require_range, resolve_size
from .errors import UserError

MAX_RESOLUTION = 4096  # 16.7 MP buckets; FLUX.1 is trained up to ~2 MP -- 100000 is a typo the plan priced at 47 TB
EVERY_EPOCHS = ("every N epochs instead of every N steps (0 = off): every_epochs x batches per epoch / "
                "train.grad_accum steps, rounded up, counted when the run starts; not with {}")


def check_every_epochs(every: int, every_epochs: int, section: str) -> None:
    """``{section}.every_epochs``: >= 0, and not beside a step interval ``{section}.every``."""
    require_range("every_epochs", every_epochs, 0)
    require(not (every and every_epochs), f"every_epochs: set {section}.every (steps) or {section}.every_epochs, "
            f"not both ({section}.every = {every}, {section}.every_epochs = {every_epochs}); delete one of them")


# ------------------------------------------------------------------------------------------------ samples
@dataclass
class SampleBase:
    FOREIGN: ClassVar[dict] = {  # config_hints
        "guidance_scale": "sample.cfg on FLUX.2 klein (true CFG) or sample.guidance on FLUX.1 / FLUX.2 dev (embedded)",
        "sample_steps": "sample.steps", "num_inference_steps": "sample.steps", "sample_every_n_steps": "sample.every",
        "sample_prompts": "sample.prompts", "negative_prompt": "sample.negative"}
    every: int = opt(0, "render samples every N steps (0 = only at the end if prompts are set)")
    prompts: list[str] = opt([], "sample prompts")
    seeds: list[int] = opt([0], "one column per seed")
    steps: int = opt(20, "sampling steps (previews; `dev2pro sample` uses the base's own, e.g. FLUX.2's 50)")
    width: int = opt(512, "sample width (multiple of 16)")
    height: int = opt(512, "sample height (multiple of 16)")
    size: str = opt("", SIZE_HELP + "; the same as width/height, which it replaces")
    cfg: float = opt(3.5, "true CFG scale for bases without guidance embedding (unset: the base's own, e.g. "
                          "4.0 for FLUX.2 klein Base)", model_default=True)

    def validate(self):
        resolve_size(self)
        try:  # the nearest sizes that render, as `sample --size` says them
            check_size(self.width, self.height, "width/height")
        except UserError as e:
            require(False, str(e))
        require_range("width", self.width, 16, MAX_RESOLUTION)
        require_range("height", self.height, 16, MAX_RESOLUTION)
        require(self.steps > 0, "steps must be > 0")
        require_range("steps", self.steps, 1, 1000)
        require_range("every", self.every, 0)
        require(self.cfg <= 100.0, f"cfg must be <= 100, got {self.cfg}")
        require(all(isinstance(x, int) and x >= 0 for x in self.seeds), f"seeds must be integers >= 0, got "
                                                                        f"{self.seeds}")


@ordered("every", "every_epochs", "prompts", "negative", "seeds", "guidance", "cfg", "steps", "width", "height",
         "with_adapter", "size", "baseline", "control")
@dataclass
class SampleSection(SampleBase):
    every_epochs: int = opt(0, "render samples " + EVERY_EPOCHS.format("sample.every"))
    negative: str = opt("", "negative prompt for true CFG (bases without guidance embedding)")
    guidance: float = opt(3.5, "embedded guidance on guidance-distilled bases (unset: the base's own: FLUX.1 dev "
                               "3.5, FLUX.2 dev 4.0)", model_default=True)
    with_adapter: bool = opt(False, "with model.adapter: also render each grid with the adapter on (the LoRA on "
                                    "dev2pro), as step*-adapter.png")
    baseline: bool = opt(True, "render a step-0 grid (the base before training) to compare the others with")
    control: str | list[str] = opt("", "reference image every sample prompt edits (edit-pair LoRAs, "
                                       "[[data.folders]] controls; FLUX.2), fitted to the sample size; a list: "
                                       "several, in the order of the controls folders", path=True)

    def validate(self):
        super().validate()
        check_every_epochs(self.every, self.every_epochs, "sample")
        require_path_list("control", self.control, MAX_REFERENCES)
        require(not self.control or min(self.width, self.height) >= 64, "control: the reference image is fitted "
                f"to the sample size, and FLUX.2's pipelines need >= 64 px a side; got {self.width}x{self.height}")
        require_range("guidance", self.guidance, 0, 100, above=True)
        require_range("cfg", self.cfg, 1, 100)


@dataclass
class DedistillSample(SampleBase):
    RENAMED: ClassVar[dict] = {
        "guidance": "in dedistill configs this is now sample.cfg (the true-CFG scale of the second grid; "
                    "sample.guidance means the embedded guidance everywhere); rename the key to cfg",
    }
    every: int = opt(0, "sample grids every N steps and at the end (0 = off)")
    prompts: list[str] = opt([], "one grid row per prompt")
    seeds: list[int] = opt([0], "one grid column per seed")
    cfg: float = opt(3.5, "true-CFG scale of the second grid (the first is at guidance 1.0, no CFG); unset: the "
                          "base's own (FLUX.1 3.5, FLUX.2 dev 4.0)", model_default=True)

    def validate(self):
        super().validate()
        require(self.every >= 0, "every must be >= 0")
        require(not self.every or bool(self.prompts), "prompts: set sample prompts (or sample.every = 0)")
        require(bool(self.seeds), "seeds: give at least one seed")
        require(self.cfg >= 1.0, "cfg: the true-CFG scale must be >= 1")


# ------------------------------------------------------------------------------------------------ outputs
@dataclass
class SaveBase:
    FOREIGN: ClassVar[dict] = {"save_every_n_steps": "save.every", "save_every_n_epochs": "save.every_epochs (train)",
                               "save_last_n_steps": "save.keep_loras (train)", "max_step_saves_to_keep":
                               "save.keep_loras (train)", "output_name": "save.name"}
    FORMATS: ClassVar[tuple] = ("kohya", "diffusers", "comfy")
    FORMAT_KIND: ClassVar[str] = "layout"
    output_dir: str = opt("", "run folder: LoRA files, samples, state, logs, resolved config", path=True)
    name: str = opt("lora", "file name stem of the saved LoRA")
    every: int = opt(0, "save LoRA + training state every N steps (0 = only at the end)")
    keep_last: int = opt(2, "training states kept for resume (0 = all)")
    formats: list[str] = opt(["kohya"], "LoRA layouts written: kohya (ComfyUI/Forge), diffusers, comfy")
    overwrite: bool = opt(False, "allow reusing an output_dir that holds another run")

    def validate(self):
        require(bool(self.output_dir), "output_dir: set save.output_dir")
        for key in ("every", "keep_last"):  # 0: only at the end / every state kept
            require_range(key, getattr(self, key), 0)
        for f in self.formats:
            require(f in self.FORMATS, f"formats: unknown {self.FORMAT_KIND} {f!r} ({'|'.join(self.FORMATS)})")


@ordered("output_dir", "name", "every", "every_epochs", "keep_last", "keep_loras", "formats", "overwrite")
@dataclass
class SaveSection(SaveBase):
    every_epochs: int = opt(0, "save LoRA + training state " + EVERY_EPOCHS.format("save.every"))
    keep_loras: int = opt(0, "step LoRA files kept (NAME-stepNNNNNN.*, all layouts of a step count as one): after "
                             "each save only the newest N stay; 0 = all; the final NAME.safetensors always stays")

    def validate(self):
        super().validate()
        check_every_epochs(self.every, self.every_epochs, "save")
        require_range("keep_loras", self.keep_loras, 0)


@ordered("output_dir", "name", "every", "keep_last", "formats", "dtype", "keep_guidance", "overwrite")
@dataclass
class DedistillSave(SaveBase):
    FORMATS: ClassVar[tuple] = EXPORT_FORMATS
    FORMAT_KIND: ClassVar[str] = "export"
    output_dir: str = opt("", "run folder: exported model, state, logs, resolved config", path=True)
    name: str = opt("dev2pro", "file name stem of the exported model")
    every: int = opt(0, "save resumable state every N steps (0 = off)")
    formats: list[str] = opt(["bfl"], "exports: bfl (single file), diffusers (transformer folder), fp8 (BFL "
                                      "fp8-scaled)")
    dtype: str = opt("bf16", "dtype of the bfl/diffusers exports", COMPUTE_DTYPES)
    keep_guidance: bool = opt(True, "keep the guidance embedding; false = pro-like model sampled with true CFG")


