"""Ranked lists as pictures: PNG grids (one row per query and system) and a self-contained HTML page.

A row: the query (its image, or its caption drawn on a tile) framed blue, then the ``top_k`` gallery images
framed by their mark (:data:`~reid_lab.studies.pictures.MARK_COLOURS`: green correct, grey same-camera junk, red
wrong identity, orange distractor), and a label with the system, the query's AP and whether rank 1 is right.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from reid_lab.atomic import atomic_write_bytes
from reid_lab.studies.pictures import (
    MARK_COLOURS,
    PAGE_STYLE,
    bordered,
    caption_tile,
    escape,
    image_uri,
    legend_html,
    png_bytes,
    thumbnail,
)
from reid_lab.studies.ranked_lists import RankedList, SystemComparison

LABEL_WIDTH = 150


def row_label(system: str, r: RankedList) -> str:
    """``"<system> | AP 41.2 | R1 ✓"`` (AP in percent; "no positive" for a query that does not count)."""
    if not r.valid:
        return f"{system} | no positive"
    return f"{system} | AP {100 * r.ap:.1f} | R1 {'yes' if r.hit else 'no'}"


def query_picture(r: RankedList, size: tuple[int, int]) -> Image.Image:
    return caption_tile(r.item, size) if r.modality == "text" else thumbnail(r.item, size)


class _Thumbs:
    """Thumbnails read once per path."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.cache: dict[str, Image.Image] = {}

    def __call__(self, path: str) -> Image.Image:
        if path not in self.cache:
            self.cache[path] = thumbnail(path, self.size)
        return self.cache[path]


def grid_image(rows: Sequence[tuple[str, RankedList]], size: tuple[int, int] = (96, 48),
               thumbs: _Thumbs | None = None) -> Image.Image:
    """One picture: a row per ``(system label, ranked list)``."""
    thumbs = thumbs or _Thumbs(size)
    h, w = size
    border, gap = 3, 2
    k = max(len(r.gallery) for _, r in rows)
    qw = w if all(r.modality == "image" for _, r in rows) else 2 * w
    cell_h = h + 2 * border + gap
    width = LABEL_WIDTH + qw + 2 * border + 8 + k * (w + 2 * border + gap)
    canvas = Image.new("RGB", (width, cell_h * len(rows) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (system, r) in enumerate(rows):
        y = gap + i * cell_h
        for j, part in enumerate(row_label(system, r).split(" | ")):
            draw.text((2, y + 4 + 12 * j), part, fill="black", font=font)
        q = query_picture(r, (h, qw)) if r.modality == "text" else thumbs(r.item)
        canvas.paste(bordered(q, MARK_COLOURS["query"], border), (LABEL_WIDTH, y))
        x = LABEL_WIDTH + qw + 2 * border + 8
        for item, mark in zip(r.items, r.marks):
            canvas.paste(bordered(thumbs(item), MARK_COLOURS[mark], border), (x, y))
            x += w + 2 * border + gap
    return canvas


def comparison_rows(comparisons: Sequence[SystemComparison]) -> list[tuple[str, RankedList]]:
    rows = []
    for c in comparisons:
        for name, r in c.lists.items():
            rows.append((f"q{c.query} {name}" + (" FLIP" if name in c.flipped else ""), r))
    return rows


def write_grids(rows: Sequence[tuple[str, RankedList]], out_dir: str | Path, rows_per_png: int = 24,
                size: tuple[int, int] = (96, 48), stem: str = "ranked") -> list[Path]:
    """PNG grids of ``rows`` (``rows_per_png`` rows each): ``<stem>_000.png``, ``<stem>_001.png`` ..."""
    out = Path(out_dir)
    thumbs = _Thumbs(size)
    paths = []
    for n, start in enumerate(range(0, len(rows), rows_per_png)):
        picture = grid_image(rows[start:start + rows_per_png], size, thumbs)
        paths.append(atomic_write_bytes(out / f"{stem}_{n:03d}.png", png_bytes(picture)))
    return paths


def new_thumbs(size: tuple[int, int] = (96, 48)) -> _Thumbs:
    """A thumbnail reader that reads each image once (share it between the lists of one page)."""
    return _Thumbs(size)


def list_html(system: str, r: RankedList, thumbs: _Thumbs, uris: dict[str, str]) -> str:
    """One ranked list as an HTML row; ``uris`` caches each thumbnail's data URI."""
    def uri(path: str) -> str:
        if path not in uris:
            uris[path] = image_uri(thumbs(path))
        return uris[path]

    if r.modality == "text":
        query = f'<div class="caption">{escape(r.item)}</div>'
    else:
        query = (f'<img src="{uri(r.item)}" alt="query {escape(r.item)}" title="{escape(r.item)}" '
                 f'style="border-color:{MARK_COLOURS["query"]}">')
    cells = "".join(
        f'<img src="{uri(item)}" alt="{escape(mark)}" title="{escape(Path(item).name)}: {escape(mark)}, '
        f'distance {d:.4f}" style="border-color:{MARK_COLOURS[mark]}">'
        for item, mark, d in zip(r.items, r.marks, r.distances))
    return f'<div class="ranked"><div class="label">{escape(row_label(system, r))}</div>{query}{cells}</div>'


def ranked_html(groups: Sequence[tuple[str, Sequence[tuple[str, RankedList]]]], title: str, intro: str = "",
                size: tuple[int, int] = (96, 48)) -> str:
    """A self-contained page: for each ``(heading, rows)`` group, one ranked list per row."""
    thumbs = _Thumbs(size)
    uris: dict[str, str] = {}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
             f"<style>{PAGE_STYLE}</style></head><body><h1>{escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{escape(intro)}</p>")
    parts.append(legend_html())
    for heading, rows in groups:
        parts.append(f'<div class="query"><b>{escape(heading)}</b>')
        parts.extend(list_html(system, r, thumbs, uris) for system, r in rows)
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
