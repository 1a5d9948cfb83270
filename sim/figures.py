"""Writing the reports' figures: PNGs in a 256-colour palette.

Why a palette: the reports' figures are committed (docs/results/), and a many-panel grid saved by
matplotlib in full RGBA took 2.4–2.6 MB (the catalogue's 10 × 5 panels, the suspicion grid's),
almost all of it the anti-aliased edges of lines and shaded intervals. Line plots use a few dozen
colours, so quantizing to 256 keeps every line and band visibly the same while the file shrinks
about 3× (the catalogue's round plot: 2.38 MB → 0.74 MB). Pillow comes with matplotlib.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib loads only when a figure is drawn
    from matplotlib.figure import Figure

#: Most colours a figure's palette holds (PNG's palette limit).
PALETTE_COLOURS = 256


def save_png(figure: Figure, path: Path, dpi: int = 110) -> None:
    """Render `figure` (its canvas already attached) at `dpi` and write it to `path` as an
    optimised palette PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(
            colors=PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT
        )
    palette.save(path, format="PNG", optimize=True)
