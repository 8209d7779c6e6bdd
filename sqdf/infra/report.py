"""Pictures and the self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


WHOLE_FROM = 1e3  # from here a table cell drops its decimals and groups the thousands
POWER_FROM = 1e6  # from here it gives three significant figures and a power of ten


def _style(magnitude: float) -> str:
    if magnitude < WHOLE_FROM:
        return "decimals"
    return "whole" if magnitude < POWER_FROM else "power"


def _in_style(x: float, style: str) -> str:
    if not math.isfinite(x):
        return f"{x}"
    if style == "decimals":
        return f"{x:.3f}"
    if style == "whole":
        return f"{x:,.0f}"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_number(x: float) -> str:
    """A number for a table a person reads: three decimals below 1,000 (0.037, -8.677), whole
    with its thousands grouped below a million (86,266), else three significant figures and a
    power of ten (3.75e16): a diverging run's 17-digit KL is read by its size, not its digits."""
    return _in_style(x, _style(abs(x)) if math.isfinite(x) else "decimals")


def format_mean_std(mean: float, std: float) -> str:
    """``mean ± std``, both in the style of the larger of the two, so that they line up:
    -6,148 ± 8,410, not -6,148 ± 8409.583."""
    style = _style(max((abs(v) for v in (mean, std) if math.isfinite(v)), default=0.0))
    return f"{_in_style(mean, style)} ± {_in_style(std, style)}"


def mean_std(values: list[float]) -> str:
    """A table cell: mean ± sample std of the numbers (NaN left out), the one value, or n/a."""
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not values:
        return "n/a"
    if any(math.isinf(v) for v in values):  # statistics cannot take them; the mean can
        return f"{sum(values) / len(values)}"
    if len(values) == 1:
        return format_number(values[0])
    return format_mean_std(statistics.mean(values), statistics.stdev(values))


def digit_grid(images: Tensor, cond: Tensor, per_class: int = 8) -> Tensor:
    """One row per class present (ascending), up to ``per_class`` images each, 1-px gaps.

    # images: (B, 1, H, W) in [0, 1]; returns (rows*(H+1), per_class*(W+1))
    """
    h, w = images.shape[-2:]
    classes = sorted(set(cond.tolist()))
    canvas = torch.full((len(classes) * (h + 1), per_class * (w + 1)), 0.35)
    for r, c in enumerate(classes):
        picks = images[cond == c][:per_class]
        for j, img in enumerate(picks):
            canvas[r * (h + 1) : r * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = img[0].cpu()
    return canvas


def save_digit_grid(
    panels: Sequence[tuple[str, Tensor, Tensor]],
    path: Path,
    captions: Sequence[str] = (),
    per_class: int = 8,
    dpi: int = 120,
    panel_width: float = 3.4,
) -> None:
    """Side-by-side class grids, one per (title, images, cond) panel, each with its caption
    (if given) underneath."""
    plt = pyplot()
    height = 4.4 + 0.35 * bool(captions)
    size = (panel_width * len(panels), height)
    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    for i, (ax, (title, images, cond)) in enumerate(zip(axes[0], panels, strict=True)):
        grid = digit_grid(images.detach().cpu(), cond.cpu(), per_class)
        # nearest: each pixel of a 16 x 16 digit a flat block, not a blur (and a small PNG)
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
        if i < len(captions):
            ax.text(0.5, -0.02, captions[i], transform=ax.transAxes, ha="center", va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def save_image_rows(rows: Sequence[tuple[str, Tensor]], titles: Sequence[str], path: Path) -> Path:
    """RGB images in [0, 1], (N, 3, H, W) per row, one row per (name, images), one column
    title per image (e.g. its prompt, shortened)."""
    plt = pyplot()
    n = len(titles)
    fig, axes = plt.subplots(len(rows), n, figsize=(2 * n, 2.3 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(titles[c][:28], fontsize=7)
            if c == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figure_png(fig: Any) -> str:
    """A matplotlib figure as a base64 PNG data URI (and closes it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def file_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def html_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """A self-contained page: every image is inline, nothing is fetched."""
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
        "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:4px 10px;text-align:right}th{background:#f3f3f3}img{max-width:100%}"
        "h2{margin-top:1.6em;border-bottom:1px solid #ddd}p.note{color:#555}"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    for heading, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{content}")
    parts.append("</body></html>")
    path.write_text("".join(parts), encoding="utf-8")
    return path
