"""A self-contained HTML report: one ``report.html`` that opens from disk without a server.

The CSS is inline and every figure is embedded as a base64 ``data:image/png`` URI, so the
file alone is the whole report (mail it, archive it). The PNGs (and the CSV tables and
meshes) also lie beside it in the report folder and are linked with *relative* links, so
the folder can be browsed and the figures reused in a paper.

Build a report from blocks::

    build_report(out_dir, "femurseg comparison", [
        Heading("Segmentation metrics"),
        Paragraph("Mean ± SD over cases ..."),
        Table(rows, columns=["model", "DSC", ...], caption="...", csv="table_metrics.csv"),
        Figure("roc_pr.png", caption="Pooled ROC and PR curves"),
    ])

Paths of :class:`Figure`, :class:`Table` ``csv`` and :class:`Link` are relative to ``out_dir``.
"""

from __future__ import annotations

import base64
import datetime
import html
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from femurseg.core.errors import FemursegError, atomic_path

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d232a;
       max-width: 1200px; margin: 2em auto; padding: 0 1.2em; line-height: 1.45; background: #fff; }
h1 { font-size: 1.6em; border-bottom: 2px solid #2b5b84; padding-bottom: .25em; }
h2 { font-size: 1.25em; margin-top: 2em; color: #2b5b84; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
p.meta { color: #5a6570; font-size: .9em; }
.tablewrap { overflow-x: auto; }
table { border-collapse: collapse; margin: .6em 0 .3em; font-size: .88em; }
th, td { padding: .3em .7em; text-align: left; border-bottom: 1px solid #dde3e8; white-space: nowrap; }
th { background: #eef3f7; border-bottom: 2px solid #9fb3c8; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.sig { text-align: center; }
tr:hover td { background: #f7fafc; }
.caption { font-size: .85em; color: #4a5560; margin: .2em 0 1.2em; max-width: 60em; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e8ec; }
figcaption { font-size: .85em; color: #4a5560; max-width: 60em; }
.headline { display: flex; flex-wrap: wrap; gap: .8em; margin: 1em 0; }
.headline div { background: #eef3f7; border-radius: 6px; padding: .5em .9em; }
.headline b { display: block; font-size: 1.3em; color: #2b5b84; }
.sig-ns { color: #8a949e; } .sig-1 { color: #b36b00; } .sig-2 { color: #c04000; } .sig-3 { color: #b00020; font-weight: bold; }
a { color: #2b5b84; }
.note { background: #fff8e6; border-left: 4px solid #e0a800; padding: .4em .8em; font-size: .9em; }
code { background: #f3f5f7; padding: 0 .25em; }
"""


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    """A paragraph of text (escaped), or raw HTML with ``raw=True``."""

    text: str
    raw: bool = False
    cls: str = ""


@dataclass
class Table:
    """A table: ``rows`` are dicts (or sequences in ``columns`` order).

    ``csv``: a CSV file (relative to the report folder) with the same table, linked below it.
    Cells are shown as given (strings) or formatted with ``float_fmt``.
    """

    rows: Sequence[Mapping[str, Any] | Sequence[Any]]
    columns: Sequence[str]
    caption: str = ""
    csv: str | None = None
    float_fmt: str = "{:.3f}"
    cell_class: Mapping[str, str] | None = None  # cell text -> CSS class (significance stars)


@dataclass
class Figure:
    """A PNG figure (relative to the report folder), embedded as base64 and linked."""

    path: str
    caption: str = ""
    width: str | None = None  # CSS width, e.g. "70%"


@dataclass
class Link:
    """A list of links to files in the report folder (meshes, CSVs)."""

    items: Sequence[tuple[str, str]]  # (relative path, label)
    title: str = ""


@dataclass
class Headline:
    """Headline numbers as a row of boxes (label -> formatted value)."""

    values: Mapping[str, str] = field(default_factory=dict)


Block = Heading | Paragraph | Table | Figure | Link | Headline


def _cell(value: Any, fmt: str) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "–"
        if value in (float("inf"), float("-inf")):
            return "∞" if value > 0 else "−∞"
        return fmt.format(value)
    return "" if value is None else str(value)


_NUMERIC = re.compile(r"^[(+\-−]?(\d+(\.\d*)?(e[+-]?\d+)?|\.\d+|∞|–)([\s±%,)]|$)")


def _is_numeric(text: str) -> bool:
    """A cell that reads as a number ("0.95 ± 0.01", "12", "(3.1, 0.2, 5.0)", "∞"), not "3D U-Net"."""
    return bool(_NUMERIC.match(text))


def _table_html(t: Table) -> str:
    rows = [[row.get(c, "") for c in t.columns] if isinstance(row, Mapping) else list(row) for row in t.rows]
    texts = [[_cell(v, t.float_fmt) for v in vals] for vals in rows]
    numeric = [bool(texts) and all(_is_numeric(r[j]) or not r[j] for r in texts if j < len(r))
               and any(j < len(r) and r[j] for r in texts) for j in range(len(t.columns))]
    head = "".join(f"<th class=\"num\">{html.escape(c)}</th>" if numeric[j] else f"<th>{html.escape(c)}</th>"
                   for j, c in enumerate(t.columns))
    out = ["<div class=\"tablewrap\"><table>", f"<thead><tr>{head}</tr></thead>", "<tbody>"]
    for r in texts:
        cells = []
        for j, text in enumerate(r):
            cls = (t.cell_class or {}).get(text)
            if cls:
                cls += " sig"
            elif j < len(numeric) and numeric[j]:
                cls = "num"
            cells.append(f"<td class=\"{cls}\">{html.escape(text)}</td>" if cls else f"<td>{html.escape(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    cap = html.escape(t.caption)
    if t.csv:
        cap += f" <a href=\"{html.escape(t.csv)}\">[CSV]</a>"
    if cap:
        out.append(f"<div class=\"caption\">{cap}</div>")
    return "\n".join(out)


def _figure_html(f: Figure, root: Path, embed: bool) -> str:
    p = root / f.path
    if not p.is_file():
        raise FemursegError(f"{p}: figure missing; cannot build the report")
    src = ("data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")) if embed else html.escape(f.path)
    style = f" style=\"width:{html.escape(f.width)}\"" if f.width else ""
    alt = html.escape(f.caption.split(".")[0] if f.caption else Path(f.path).stem)
    cap = html.escape(f.caption) + f" <a href=\"{html.escape(f.path)}\">[PNG]</a>"
    return (f"<figure><a href=\"{html.escape(f.path)}\"><img src=\"{src}\" alt=\"{alt}\"{style}></a>"
            f"<figcaption>{cap}</figcaption></figure>")


def render_blocks(blocks: Sequence[Block], root: Path, embed: bool = True) -> str:
    """The HTML body of ``blocks`` (figures read from ``root``)."""
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body = b.text if b.raw else html.escape(b.text)
            parts.append(f"<p class=\"{b.cls}\">{body}</p>" if b.cls else f"<p>{body}</p>")
        elif isinstance(b, Table):
            parts.append(_table_html(b))
        elif isinstance(b, Figure):
            parts.append(_figure_html(b, root, embed))
        elif isinstance(b, Link):
            items = "".join(f"<li><a href=\"{html.escape(p)}\">{html.escape(label)}</a></li>" for p, label in b.items)
            title = f"<p>{html.escape(b.title)}</p>" if b.title else ""
            parts.append(f"{title}<ul>{items}</ul>")
        elif isinstance(b, Headline):
            boxes = "".join(f"<div>{html.escape(k)}<b>{html.escape(v)}</b></div>" for k, v in b.values.items())
            parts.append(f"<div class=\"headline\">{boxes}</div>")
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown report block {type(b).__name__}")
    return "\n".join(parts)


def build_report(
    out_dir: str | os.PathLike,
    title: str,
    blocks: Sequence[Block],
    filename: str = "report.html",
    embed: bool = True,
    subtitle: str = "",
) -> Path:
    """Write ``out_dir/filename``: a self-contained HTML page of ``blocks``.

    Figures are embedded as base64 PNG (``embed=True``) and linked relatively; the CSS
    is inline; nothing is loaded from the network. Returns the path of the HTML file.
    Raises FemursegError if a figure file is missing.
    """
    root = Path(out_dir)
    body = render_blocks(blocks, root, embed)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sub = f"<p class=\"meta\">{html.escape(subtitle)}</p>" if subtitle else ""
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{sub}\n{body}\n"
        f"<p class=\"meta\">Generated by femurseg on {stamp}. This page is self-contained (figures embedded); "
        f"the PNG and CSV files beside it hold the same figures and tables.</p>\n</body>\n</html>\n"
    )
    path = root / filename
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def referenced_files(html_text: str) -> list[str]:
    """Relative file references (``href``/``src`` that are not data URIs, anchors or URLs) of a page."""
    from html.parser import HTMLParser

    refs: list[str] = []

    class _P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            for key, val in attrs:
                if key in ("href", "src") and val and not val.startswith(("data:", "#", "http:", "https:", "mailto:")):
                    refs.append(val)

    _P().feed(html_text)
    return refs
