"""The report of `intern2 demo`: one self-contained HTML page (pictures as data URIs, loss curves as inline SVG)
and the README's table of figures, both rendered from ``summary.json`` (see :mod:`intern2.demo.stages` for a
stage's fields) so that neither can disagree with the run."""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["write_report", "render_report", "markdown_table", "format_number", "loss_curve_svg"]

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1040px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ddd; padding: 3px 9px; }
th { background: #f4f4f4; text-align: left; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.curves { display: flex; flex-wrap: wrap; gap: 14px; } figure { margin: 0.8em 0; }
figcaption { font-size: 13px; color: #555; } img { image-rendering: pixelated; border: 1px solid #ccc; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 4px; color: white; font-size: 12px;
         font-weight: bold; vertical-align: middle; } .pass { background: #2a7d2a; } .fail { background: #b3261e; }
.check { color: #555; } .missing { color: #b3261e; } td.time { white-space: nowrap; }
"""


def format_number(value: Any) -> str:
    """A figure as people read it: integers as they are; 0 as "0"; magnitudes below 0.01 or from 1e6 up in
    scientific notation with two significant digits ("3.4e-5": a tiny difference must not read "0.00"); from 100 up
    no decimals ("1234"); otherwise three significant digits ("75.6", "3.46", "0.0458", "5"). Lists join with " / "."""
    if isinstance(value, (list, tuple)):
        return " / ".join(format_number(v) for v in value)
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude < 0.01 or magnitude >= 1e6:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return f"{value:.0f}" if magnitude >= 100 else f"{value:.3g}"


def _with_unit(value: Any, unit: str) -> str:
    """A figure's value with its unit ("3.5x"); each number of a list carries it, a missing value does not."""
    if isinstance(value, (list, tuple)):
        return " / ".join(_with_unit(v, unit) for v in value)
    text = format_number(value)
    return f"{text}{unit}" if unit and value is not None else text


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _series(metrics_file: Path, key: str = "loss") -> List[Tuple[float, float]]:
    """(step, value) of the training records of a run's metrics.jsonl."""
    if not metrics_file.exists():
        return []
    points = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line; the rest still plots
            continue
        if record.get("split") == "train" and isinstance(record.get(key), (int, float)):
            points.append((float(record["step"]), float(record[key])))
    return points


def loss_curve_svg(points: Sequence[Tuple[float, float]], title: str, width: int = 300, height: int = 170) -> str:
    """An inline SVG line chart of (step, loss) with min/max labels; an empty chart says so."""
    pad_left, pad, plot_w, plot_h = 46, 22, width - 58, height - 50
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
             f'<rect x="{pad_left}" y="{pad}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>']
    if len(points) < 2:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12">no data</text>')
    else:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        span_x, span_y = (x1 - x0) or 1.0, (y1 - y0) or 1.0
        coords = " ".join(f"{pad_left + (x - x0) / span_x * plot_w:.1f},{pad + (y1 - y) / span_y * plot_h:.1f}"
                          for x, y in points)
        parts += [f'<polyline points="{coords}" fill="none" stroke="#1f6fd1" stroke-width="1.6"/>',
                  f'<text x="{pad_left - 4}" y="{pad + 9}" text-anchor="end" font-size="10">'
                  f'{format_number(y1)}</text>',
                  f'<text x="{pad_left - 4}" y="{pad + plot_h}" text-anchor="end" font-size="10">'
                  f'{format_number(y0)}</text>',
                  f'<text x="{pad_left}" y="{height - 14}" font-size="10">step {x0:.0f}</text>',
                  f'<text x="{pad_left + plot_w}" y="{height - 14}" text-anchor="end" font-size="10">'
                  f'{x1:.0f}</text>']
    parts.append("</svg>")
    return "".join(parts)


def _badge(stage: Dict[str, Any]) -> str:
    if "error" in stage:
        return "<span class='badge fail'>SKIPPED</span>"
    return "<span class='badge pass'>PASS</span>" if stage.get("ok") else "<span class='badge fail'>FAIL</span>"


def _rows(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """An HTML table, every cell escaped (sources, references and outputs are arbitrary text) and numbers written
    like the figures."""
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{html.escape(format_number(v))}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _picture(root: Path, picture: Dict[str, str]) -> str:
    """A picture of the run embedded as a data URI (the page stays one file); a missing file is said, not fatal."""
    caption = html.escape(picture.get("caption", ""))
    path = root / picture["file"]
    if not path.is_file():
        return f"<p class='missing'>missing picture {html.escape(picture['file'])}: {caption}</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{caption}' style='max-width:100%'>"
            f"<figcaption>{caption}</figcaption></figure>")


def _section(name: str, stage: Dict[str, Any], root: Path) -> str:
    title = f"<h2 id='{html.escape(name)}'>{html.escape(name)} {_badge(stage)}</h2>"
    if "error" in stage:
        return f"{title}<p class='missing'>{html.escape(stage['error'])}</p>"
    body = [title, f"<p class='check'>check: {html.escape(stage.get('check', ''))}</p>"]
    figures = stage.get("figures", [])
    rows = [[f["name"], _with_unit(f["value"], f.get("unit", "")), _with_unit(f["baseline"], f.get("unit", "")),
             f.get("baseline_is") or ""] for f in figures]
    body.append(_rows(["figure", "result", "baseline", "baseline is"], rows, numeric=(1, 2)))
    curves = [loss_curve_svg(_series(root / run["dir"] / "metrics.jsonl"), f"training loss: {run['name']}")
              for run in stage.get("runs", [])]
    if curves:
        body.append("<div class='curves'>" + "".join(curves) + "</div>")
    body += [_picture(root, picture) for picture in stage.get("pictures", [])]
    for table in stage.get("tables", []):
        body.append(f"<h3>{html.escape(table['title'])}</h3>" + _rows(table["columns"], table["rows"]))
    return "\n".join(body)


def render_report(summary: Dict[str, Any], root: Path) -> str:
    """The report page of ``summary`` (a demo's summary.json; its paths are relative to ``root``)."""
    stages = summary.get("stages", {})
    run = [("intern2", summary.get("intern2")), ("torch", summary.get("torch")), ("threads", summary.get("threads")),
           ("CPU", summary.get("cpu")), ("budget", summary.get("budget")),
           ("wall-clock", _duration(summary.get("total_seconds", 0)))]
    overview = []
    for name, stage in stages.items():
        first = (stage.get("figures") or [{}])[0]
        overview.append(f"<tr><td><a href='#{html.escape(name)}'>{html.escape(name)}</a></td><td>{_badge(stage)}</td>"
                        f"<td>{html.escape(first.get('name', stage.get('error', '')))}</td>"
                        f"<td class=num>{html.escape(_with_unit(first.get('value'), first.get('unit', '')))}</td>"
                        f"<td class=num>{html.escape(_with_unit(first.get('baseline'), first.get('unit', '')))}</td>"
                        f"<td>{html.escape(first.get('baseline_is') or '')}</td>"
                        f"<td class='num time'>{html.escape(_duration(stage.get('seconds', 0)))}</td></tr>")
    passed = sum(1 for s in stages.values() if s.get("ok"))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>intern2 demo</title><style>{_STYLE}</style>"
            f"</head><body><h1>intern2 demo</h1><p>{passed} of {len(stages)} stages passed their checks.</p>"
            + "<table>" + "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in run) + "</table>"
            + "<table><tr><th>stage</th><th></th><th>headline figure</th><th>result</th><th>baseline</th>"
              "<th>baseline is</th><th>time</th></tr>" + "".join(overview) + "</table>"
            + "".join(_section(name, stage, root) for name, stage in stages.items()) + "</body></html>")


def write_report(summary: Dict[str, Any], out_dir: Path) -> Path:
    """Write ``<out_dir>/report.html`` (atomically) from ``summary``; returns its path."""
    from ..checkpoint import atomic_write
    path = Path(out_dir) / "report.html"
    page = render_report(summary, Path(out_dir))
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))  # the page says charset utf-8
    return path


def _cell(text: str) -> str:
    """Text for a Markdown table cell (a bare '|' would end the cell)."""
    return text.replace("|", "\\|")


def markdown_table(summary: Dict[str, Any]) -> str:
    """The README's table of a demo run: every stage's figures with their baselines, then the wall-clock."""
    lines = ["| stage | figure | result | baseline | baseline is |", "|---|---|---|---|---|"]
    for name, stage in summary.get("stages", {}).items():
        if "error" in stage:
            lines.append(f"| {name} | {_cell(stage['error'])} | | | |")
        for f in stage.get("figures", []):
            unit = f.get("unit", "")
            lines.append(f"| {name} | {_cell(f['name'])} | {_with_unit(f['value'], unit)} | "
                         f"{_with_unit(f['baseline'], unit)} | {_cell(f.get('baseline_is') or '—')} |")
    lines.append(f"| all | wall-clock | {_duration(summary.get('total_seconds', 0))} | | |")
    return "\n".join(lines) + "\n"
