"""Pictures for pages people look at: thumbnails of dataset images, captions drawn as tiles, data URIs.

Everything a page needs is embedded (``data:`` URIs), so an HTML file written here opens offline, copied
anywhere, without the dataset next to it.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Border colours of the marks of a ranked list (reid_lab.studies.ranked_lists.MARKS).
MARK_COLOURS = {"correct": "#1a9850", "junk": "#9e9e9e", "wrong": "#d73027", "distractor": "#f28e2b",
                "query": "#1f4e9e"}


def thumbnail(path: str | Path, size: tuple[int, int] = (96, 48)) -> Image.Image:
    """The image at ``path`` resized to ``size = (H, W)`` (RGB).

    Raises:
        FileNotFoundError: the image is not there (e.g. a feature file written on another machine).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} does not exist (the feature file names it; is the dataset here?)")
    with Image.open(p) as im:
        return im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)


def caption_tile(text: str, size: tuple[int, int] = (96, 48), width_chars: int | None = None) -> Image.Image:
    """A white tile of ``size = (H, W)`` with ``text`` wrapped onto it (a caption query's picture)."""
    h, w = size
    tile = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    chars = width_chars or max(4, w // 6)
    lines = textwrap.wrap(text, chars)[: max(1, h // 11)]
    for i, line in enumerate(lines):
        draw.text((2, 1 + 11 * i), line, fill="black", font=font)
    return tile


def bordered(image: Image.Image, colour: str, width: int = 3) -> Image.Image:
    """``image`` inside a ``width``-pixel frame of ``colour``."""
    out = Image.new("RGB", (image.width + 2 * width, image.height + 2 * width), colour)
    out.paste(image, (width, width))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def jpeg_bytes(image: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def data_uri(payload: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` for an ``<img src>``."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def image_uri(image: Image.Image) -> str:
    """A JPEG data URI of a thumbnail."""
    return data_uri(jpeg_bytes(image), "image/jpeg")


def file_uri(path: str | Path) -> str:
    """A data URI of a PNG / JPEG file on disk."""
    p = Path(path)
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(p.suffix.lower())
    if mime is None:
        raise ValueError(f"{p}: expected a .png or .jpg picture")
    return data_uri(p.read_bytes(), mime)


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; font-size: 0.9em; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
.ranked { display: flex; align-items: center; gap: 3px; margin: 2px 0; }
.ranked .label { width: 13em; font-size: 0.8em; text-align: left; }
.ranked img { border-style: solid; border-width: 3px; }
.ranked .caption { width: 16em; font-size: 0.8em; border: 3px solid #1f4e9e; padding: 2px; }
.legend span { display: inline-block; padding: 1px 6px; margin-right: 6px; color: white; font-size: 0.8em; }
.query { margin: 0.8em 0; padding-bottom: 0.4em; border-bottom: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
figure { display: inline-block; margin: 0.4em; } figure img { max-width: 46em; }
"""


def legend_html() -> str:
    return '<p class="legend">' + "".join(
        f'<span style="background:{c}">{escape(name)}</span>' for name, c in MARK_COLOURS.items()) + "</p>"
