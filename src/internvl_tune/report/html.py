"""The building blocks of a report page: one self-contained HTML file (inline CSS, inline SVG, images as base64
data URIs), so it opens offline, attaches to an issue, and needs nothing but a browser."""

from __future__ import annotations

import base64
import io
import math
from html import escape
from pathlib import Path

THUMBNAIL = 160  # px, the longer side
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".gif"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1400px;padding:16px 24px;
color:#1d2430;background:#fff}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #dde;padding-bottom:4px}
h3{font-size:1em;margin:1em 0 .3em}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
pre{background:#f5f6f8;padding:8px 10px;overflow-x:auto;white-space:pre-wrap;word-break:break-word;border-radius:4px}
table{border-collapse:collapse;margin:.4em 0;font-size:.9em}
th,td{border:1px solid #d8dbe2;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#667}.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{border:1px solid #e3e5ea;border-radius:4px;background:#fff;max-width:100%;height:auto}
.chart .title{font:600 14px sans-serif;text-anchor:middle;fill:#1d2430}
.chart .grid{stroke:#eceef2}.chart .frame{fill:none;stroke:#b8bcc6}.chart .axis{stroke:#778}
.chart .xtick{font:11px sans-serif;text-anchor:middle;fill:#556}.chart .ytick{font:11px sans-serif;text-anchor:end;fill:#556}
.chart .etick{font:10px sans-serif;text-anchor:middle;fill:#889}.chart .label{font:12px sans-serif;text-anchor:middle;fill:#445}
.chart .legend{font:11px sans-serif;fill:#334}.chart .empty{font:13px sans-serif;text-anchor:middle;fill:#99a}
.pred td{max-width:420px}.thumbs img{margin:0 4px 4px 0;border:1px solid #ccd;border-radius:3px;max-height:160px}
.good{background:#e9f7ec}.bad{background:#fcecec}.bar{display:inline-block;height:10px;background:#5b8def}
details summary{cursor:pointer;color:#345}
"""


def page(title: str, sections: list[str]) -> str:
    """A whole document: ``sections`` are HTML fragments placed in order."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")


def cell(value) -> str:
    """A table cell: numbers right-aligned and rounded, None as a dash, text escaped."""
    if value is None:
        return '<td class="muted">-</td>'
    if isinstance(value, bool):
        return f"<td>{value}</td>"
    if isinstance(value, int):
        return f'<td class="num">{value:,}</td>'
    if isinstance(value, float):
        text = "nan" if not math.isfinite(value) else f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
        return f'<td class="num">{text}</td>'
    return f"<td>{escape(str(value))}</td>"


def table(headers: list[str], rows: list[list], raw: bool = False) -> str:
    """An HTML table; ``raw`` rows hold ready-made ``<td>`` fragments."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if raw else cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image_data_uri(path: str | Path, size: int = THUMBNAIL) -> str | None:
    """A JPEG thumbnail of an image (a video: its middle frame) as a ``data:`` URI, or None if it cannot be read."""
    from PIL import Image

    path = Path(path)
    try:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            image = _middle_frame(path)
        else:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
    except Exception:  # a report must not fail on one unreadable file; the cell says so instead
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _middle_frame(path: Path):
    import numpy as np

    from internvl_tune.data.video import load_video_frames

    frames, _ = load_video_frames(str(path), 1, "middle", np.random.default_rng(0), None, str(path))
    return frames[0].convert("RGB")


def thumbnails(paths: list[str]) -> str:
    """Thumbnails of the files, each titled with its name; a missing file shows its name instead."""
    out = []
    for p in paths:
        uri = image_data_uri(p)
        name = escape(Path(p).name)
        out.append(f'<img src="{uri}" alt="{name}" title="{name}">' if uri else f'<span class="muted">{name} '
                   "(not readable)</span>")
    return '<div class="thumbs">' + "".join(out) + "</div>"


def png_data_uri(path: str | Path) -> str | None:
    """A PNG file as a ``data:`` URI (the run's matplotlib plots), or None when absent."""
    path = Path(path)
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
