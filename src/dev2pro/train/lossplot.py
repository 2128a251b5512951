"""``loss.png`` beside a run: the loss per step and its moving average, readable without TensorBoard.

matplotlib draws it when installed; otherwise PIL (already a dependency) draws a plain chart -- axes, min/max
labels, the raw loss in light grey, a moving average in blue. Not worth a plotting dependency of its own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from ..outputs import atomic_path


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def save_loss_plot(losses: Sequence[float | None], path: Path, first_step: int = 1, title: str = "") -> Path | None:
    """Plot ``losses`` (step ``first_step + i``; None/non-finite = skipped step); None if nothing is finite."""
    points = [(first_step + i, float(v)) for i, v in enumerate(losses) if v is not None and math.isfinite(v)]
    if not points:
        return None
    steps, values = [p[0] for p in points], [p[1] for p in points]
    smooth = moving_average(values, max(1, len(values) // 20))
    with atomic_path(path, overwrite=True, what="loss plot") as tmp:
        try:
            _matplotlib(steps, values, smooth, tmp, title)
        except ImportError:
            _pil(steps, values, smooth, tmp, title)
    return Path(path)


def _matplotlib(steps, values, smooth, path, title):
    import matplotlib  # optional (not a dependency): the PIL plot below is the fallback

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, values, color="0.75", linewidth=0.8, label="loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label="moving average")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _pil(steps, values, smooth, path, title, size=(800, 450)):
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(s, v):
        return (left + (s - x0) / (x1 - x0) * (w - left - right), top + (hi - v) / (hi - lo) * (h - top - bottom))

    for i in range(5):  # light grid with value labels
        v = lo + (hi - lo) * i / 4
        y = xy(x0, v)[1]
        draw.line([(left, y), (w - right, y)], fill=(230, 230, 230))
        draw.text((4, y - 6), f"{v:.4g}", fill="black")
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    draw.text((left, h - bottom + 8), f"step {x0}", fill="black")
    draw.text((w - right - 90, h - bottom + 8), f"step {steps[-1]}", fill="black")
    draw.text((left, 8), f"{title}  loss (grey) and moving average (blue)".strip(), fill="black")
    for series, colour, width in ((values, (180, 180, 180), 1), (smooth, (31, 119, 180), 2)):
        pts = [xy(s, v) for s, v in zip(steps, series)]
        if len(pts) == 1:
            x, y = pts[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        else:
            draw.line(pts, fill=colour, width=width)
    img.save(path, format="PNG")
