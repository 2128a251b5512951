"""Recipe for `dev2pro caption`: write a ``NAME.txt`` caption beside every image of a folder with a local VLM.

The story: check the folder and the model folder, list the folder's images (or the ``--files`` subset), set aside
those that already have a caption (unless ``--overwrite``) and those that cannot be read (listed, never fatal),
load the captioner only if something is left, caption in batches under a progress bar, and write each caption the
moment its batch is done -- atomically (temp + rename), so a run killed at any point leaves every ``.txt`` either
complete or absent, and a rerun picks up where it stopped. ``--json`` prints one line per image on stdout
(``{"image", "caption", "status": "written"|"skipped"|"error", "error"}``) for the web app and scripts.

Heavy imports (torch, transformers: the captioner and ``outputs``) happen inside the functions that use them, so
``dev2pro --help`` (which imports this module to build the parser) stays fast.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..data.folders import IMAGE_EXTENSIONS, add_trigger
from ..errors import UserError

_LIST_LIMIT = 20  # how many bad images the warning spells out
DEFAULT_MAX_LENGTH = 128  # = caption.DEFAULT_MAX_LENGTH (not imported: it would load torch for --help)


@dataclass
class CaptionResult:
    """What happened to one image; ``image`` is its path relative to the folder (POSIX separators)."""

    image: str
    caption: str | None
    status: str  # "written" | "skipped" | "error"
    error: str | None = None


def list_images(folder: Path, files: list[str] | None = None) -> list[Path]:
    """The folder's images (non-recursive, sorted by name), or the named subset, each checked to lie inside it."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"image folder {folder} {what}; pass the folder that holds the images to caption")
    if files is None:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    root, paths, missing = folder.resolve(), [], []
    for name in dict.fromkeys(n.strip() for n in files if n.strip()):
        path = folder / name
        if Path(name).is_absolute() or not path.resolve().is_relative_to(root):
            raise UserError(f"--files entry {name!r} is outside {folder}; give names relative to the folder")
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserError(f"--files entry {name!r} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        (paths if path.is_file() else missing).append(path)
    if missing:
        raise UserError(f"--files names {len(missing)} image(s) not in {folder}: "
                        f"{', '.join(p.name for p in missing[:5])}; check the names")
    return paths


def caption_path(image: Path) -> Path:
    return image.with_suffix(".txt")


def existing_caption(image: Path) -> str | None:
    """The caption already beside ``image``; an empty file counts as none (as the dataset reader does)."""
    txt = caption_path(image)
    if not txt.is_file():
        return None
    try:
        return txt.read_text(encoding="utf-8-sig").strip() or None
    except UnicodeDecodeError:
        raise UserError(f"caption file {txt} is not UTF-8 text; re-save it as UTF-8 or pass --overwrite") from None


def image_problem(path: Path) -> str | None:
    """Why an image cannot be captioned (empty, not decodable), or None when it can."""
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(path) as im:
            im.verify()  # structure check without decoding pixels; catches truncated and non-image files
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"unreadable: {type(e).__name__}: {e}"
    return None


def write_caption(image: Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8, one trailing newline) as the image's caption file."""
    from ..outputs import atomic_path  # lazy: outputs loads torch, and the CLI imports this module for --help

    with atomic_path(caption_path(image), overwrite=True, what="caption file") as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return caption_path(image)


def run_caption(folder: str | Path, model: str | Path, *, prompt: str | None = None, trigger: str | None = None,
                max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 1, overwrite: bool = False,
                files: list[str] | None = None, device: str = "auto", emit=None,
                progress: bool = True) -> list[CaptionResult]:
    """Caption a folder's images; ``emit(result)`` is called for each image as soon as its outcome is final."""
    from .. import caption as C  # lazy: torch + transformers; the CLI imports this module for --help

    if max_length < 1 or batch_size < 1:
        raise UserError(f"--max-length and --batch-size must be >= 1, got {max_length} and {batch_size}")
    folder = Path(folder).expanduser()
    C.detect_family(model)  # a bad --model fails before any image is touched
    images = list_images(folder, files)
    if not images:
        raise UserError(f"no images ({', '.join(('png', 'jpg', 'jpeg', 'webp'))}) in {folder}")
    emit = emit or (lambda result: None)
    name = lambda p: p.relative_to(folder).as_posix()  # noqa: E731
    results, todo, bad = [], [], []
    for image in images:
        try:
            old = None if overwrite else existing_caption(image)
            problem = None if old is not None else image_problem(image)
        except UserError as e:  # a caption file that is not UTF-8: report it, caption the rest
            old, problem = None, str(e)
        if old is not None:
            results.append(CaptionResult(name(image), old, "skipped"))
        elif problem:
            results.append(CaptionResult(name(image), None, "error", problem))
            bad.append(f"{image} ({problem})")
        else:
            todo.append(image)
            continue
        emit(results[-1])
    if bad:
        listing = "\n".join(f"  {b}" for b in bad[:_LIST_LIMIT])
        more = f"\n  ... and {len(bad) - _LIST_LIMIT} more" if len(bad) > _LIST_LIMIT else ""
        print(f"{len(bad)} image(s) cannot be read and are skipped:\n{listing}{more}", file=sys.stderr)
    if not todo:
        return results
    captioner = C.load_captioner(model, device)
    with tqdm(total=len(todo), desc="caption", unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            for result in _caption_batch(captioner, batch, folder, prompt, trigger, max_length, overwrite):
                results.append(result)
                emit(result)
            bar.update(len(batch))
    return results


def _caption_batch(captioner, batch: list[Path], folder: Path, prompt, trigger, max_length,
                   overwrite: bool) -> list[CaptionResult]:
    """Decode, caption and write one batch; an image that fails to decode is reported, the others go on.

    Without ``overwrite``, a caption that appeared while the batch was generated (typed in the web app, say) is
    kept: the file is checked again right before writing.
    """
    from .. import caption as C  # lazy: torch + transformers; the CLI imports this module for --help
    from ..data.buckets import open_rgb  # lazy, as above (buckets imports torch)

    loaded, out = [], {}
    for path in batch:
        try:  # opened as training opens it: the captioner describes the image the LoRA is trained on
            loaded.append((path, open_rgb(path)))
        except Exception as e:  # truncated data passes verify() and fails only when decoded
            out[path] = CaptionResult(path.relative_to(folder).as_posix(), None, "error",
                                      f"unreadable: {type(e).__name__}: {e}")
    captions = C.caption_images(captioner, [im for _, im in loaded], prompt, max_length, batch_size=len(batch))
    for (path, _), text in zip(loaded, captions):
        name = path.relative_to(folder).as_posix()
        try:
            newer = None if overwrite else existing_caption(path)
        except UserError as e:
            out[path] = CaptionResult(name, None, "error", str(e))
            continue
        if newer is not None:
            out[path] = CaptionResult(name, newer, "skipped")
            continue
        text = add_trigger(text, trigger)
        write_caption(path, text)
        out[path] = CaptionResult(name, text, "written")
    return [out[p] for p in batch]


def summary(results: list[CaptionResult]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "error")}
    return (f"captioned {counts['written']}, skipped {counts['skipped']} (already captioned; --overwrite redoes "
            f"them), unreadable {counts['error']}")


def add_caption_parser(sub):
    p = sub.add_parser("caption", help="write a NAME.txt caption beside each image with a local vision-language "
                                       "model (Florence-2, Qwen-VL, BLIP)")
    p.add_argument("folder", help="folder of images (png/jpg/jpeg/webp, not recursive)")
    p.add_argument("--model", required=True, metavar="MODEL_DIR",
                   help="local captioner folder (transformers layout; family from config.json model_type)")
    p.add_argument("--prompt", metavar="TEXT",
                   help="instruction: Florence-2 task token (default <DETAILED_CAPTION>; <CAPTION>, "
                        "<MORE_DETAILED_CAPTION>), Qwen-VL instruction text, BLIP caption prefix ('' = none)")
    p.add_argument("--trigger", metavar="WORD", help="prefix every caption as 'WORD, caption'")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, metavar="N",
                   help=f"most new tokens per caption (default {DEFAULT_MAX_LENGTH})")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per generate call (default 1)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--skip-existing", dest="overwrite", action="store_false",
                      help="keep images that already have a non-empty .txt (default)")
    mode.add_argument("--overwrite", dest="overwrite", action="store_true", help="recaption them too")
    p.add_argument("--files", metavar="A.png,B.jpg", help="caption only these images (names relative to FOLDER)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the captioner runs (auto: CUDA when available, else the CPU)")
    p.add_argument("--json", action="store_true",
                   help='one JSON line per image on stdout: {"image", "caption", "status", "error"}')

    def run(a):
        def emit(result: CaptionResult) -> None:
            if a.json:
                print(json.dumps(asdict(result), ensure_ascii=False), flush=True)
        files = a.files.split(",") if a.files is not None else None
        results = run_caption(a.folder, a.model, prompt=a.prompt, trigger=a.trigger, max_length=a.max_length,
                              batch_size=a.batch_size, overwrite=a.overwrite, files=files, device=a.device,
                              emit=emit)
        print(summary(results), file=sys.stderr if a.json else sys.stdout)
    p.set_defaults(run=run, overwrite=False)


def add_init_tiny_captioner_parser(sub):
    p = sub.add_parser("init-tiny-captioner",
                       help="write a tiny random-weight captioner folder (for tests and demos; captions are nonsense)")
    p.add_argument("dir", help="folder to write (missing parents are created)")
    p.add_argument("--family", required=True, choices=["florence2", "qwen2_5_vl", "qwen3_vl", "blip"],
                   help="captioner family whose real classes, config and processor files are used")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier tiny captioner folder")

    def run(a):
        from ..caption_tiny import write_tiny_captioner  # lazy: torch + transformers, see run_caption

        out = write_tiny_captioner(a.dir, a.family, a.seed, a.overwrite)
        print(f"wrote a tiny {a.family} captioner to {out}")
    p.set_defaults(run=run)
