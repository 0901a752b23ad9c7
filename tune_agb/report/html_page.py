"""The page's HTML: one self-contained page (CSS inline, figures as base64 PNG data URIs, no scripts), its tables
and the formatting of the values in them."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tune_agb.engine.plots import png_bytes
from tune_agb.location import is_uri, resolve

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1180px; color: #222; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; }
.meta { color: #555; margin-top: 0; } nav a { margin-right: 14px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f4f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #eef6e8; font-weight: 600; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; border: 1px solid #eee; }
.figs { display: flex; flex-wrap: wrap; gap: 12px; } .figs img { max-width: 560px; }
.note { color: #555; font-size: 0.92em; } pre { background: #f6f8fa; padding: 8px; overflow-x: auto; }
"""


def img_tag(fig: Figure, alt: str) -> str:
    """An ``<img>`` holding the figure as a base64 PNG data URI (``alt``: its text alternative)."""
    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def fmt(v: Any) -> str:
    """A table cell's text: integers and booleans as such, floats to 4 significant digits, missing as ``–``."""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "–" if not math.isfinite(v) else f"{float(v):.4g}"
    return "–" if v is None else str(v)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], row_class: Sequence[str] | None = None) -> str:
    """A ``<table>``: numbers right-aligned, each cell formatted by :func:`fmt`; ``row_class``: a CSS class per row
    (``""``: none)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(
            f'<td class="num">{html.escape(fmt(v))}</td>'
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            else f"<td>{html.escape(fmt(v))}</td>"
            for v in row
        )
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, meta: str, sections: list[tuple[str, str, str]]) -> str:
    """A complete HTML page; ``sections``: ``(id, heading, inner html)``."""
    nav = " ".join(f'<a href="#{sid}">{html.escape(head)}</a>' for sid, head, _ in sections)
    body = "\n".join(
        f'<section id="{sid}">\n<h2>{html.escape(head)}</h2>\n{inner}\n</section>' for sid, head, inner in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<h1>{html.escape(title)}</h1>\n<p class="meta">{meta}</p>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n'
    )


def folder_name(location: str) -> str:
    """The last name of a folder's location (a local path, ``file://`` or a URI), which titles its page."""
    return location.rstrip("/").rsplit("/", 1)[-1] if is_uri(location) else Path(resolve(location)).name
