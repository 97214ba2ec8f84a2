"""Matplotlib figures without pyplot (no global state, no display): create, save, rasterise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width x height`` inches on an Agg canvas (``width * DPI`` pixels wide)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


FORMATS = ("png", "pdf", "svg")
# Set by the tools' --format / --dpi options: every figure they save follows them.
OUTPUT: dict[str, object] = {"formats": ("png",), "dpi": DPI}


def set_output(formats: tuple[str, ...] | list[str] = ("png",), dpi: int = DPI) -> None:
    """The file formats (``png``, ``pdf``, ``svg``; several at once) and raster resolution of
    every figure :func:`save_figure` writes afterwards (PDF and SVG are vector: dpi only
    affects embedded images)."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"figure formats must be among {FORMATS}, got {list(formats)}")
    if dpi < 50 or dpi > 1200:
        raise ValueError(f"dpi must lie in [50, 1200], got {dpi}")
    OUTPUT.update(formats=tuple(formats), dpi=int(dpi))


def save_figure(fig: Figure, path: str | Path, formats: tuple[str, ...] | None = None,
                dpi: int | None = None) -> Path:
    """Write the figure at ``path`` in each of ``formats`` (default: :func:`set_output`'s, PNG
    at 100 dpi): ``x.png`` and, for more formats, ``x.pdf`` / ``x.svg`` beside it (no tight
    bounding box, so a PNG has exactly the figure's pixel size at 100 dpi). Returns the first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chosen: list[str] = list(formats or OUTPUT["formats"])  # type: ignore[call-overload]
    resolution = int(dpi or OUTPUT["dpi"])  # type: ignore[call-overload]
    written = []
    for fmt in chosen:
        target = path.with_suffix(f".{fmt}")
        fig.savefig(target, dpi=resolution, format=fmt)
        written.append(target)
    return written[0]


def figure_to_array(fig: Figure) -> np.ndarray:
    """The rendered figure as uint8 ``H x W x 3`` (for image loggers)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
