"""The HTML report of `intern2 demo`: one self-contained page (inline SVG curves, images referenced beside it)."""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["write_report", "loss_curve_svg"]

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 980px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ddd; padding: 3px 9px; }
th { background: #f4f4f4; text-align: left; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.curves { display: flex; flex-wrap: wrap; gap: 14px; } figure { margin: 0.5em 0; }
figcaption { font-size: 13px; color: #555; } img { image-rendering: pixelated; border: 1px solid #ccc; }
.skipped { color: #a33; }
"""


def _series(metrics_file: Path, key: str = "loss") -> List[Tuple[float, float]]:
    """(step, value) of the training records of a run's metrics.jsonl."""
    if not metrics_file.exists():
        return []
    points = []
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
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
                  f'<text x="{pad_left - 4}" y="{pad + 9}" text-anchor="end" font-size="10">{y1:.3g}</text>',
                  f'<text x="{pad_left - 4}" y="{pad + plot_h}" text-anchor="end" font-size="10">{y0:.3g}</text>',
                  f'<text x="{pad_left}" y="{height - 14}" font-size="10">step {x0:.0f}</text>',
                  f'<text x="{pad_left + plot_w}" y="{height - 14}" text-anchor="end" font-size="10">'
                  f'{x1:.0f}</text>']
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: Sequence[Tuple[str, Any]]) -> str:
    cells = []
    for name, value in rows:
        text = f"{value:.2f}" if isinstance(value, float) else html.escape(str(value))
        cells.append(f"<tr><th>{html.escape(name)}</th><td class='num'>{text}</td></tr>")
    return "<table>" + "".join(cells) + "</table>"


def _image(path: str, report_dir: Path, caption: str) -> str:
    relative = os.path.relpath(path, report_dir)
    return (f"<figure><img src='{html.escape(relative)}' alt='{html.escape(caption)}' style='max-width:100%'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _section(name: str, stage: Dict[str, Any], report_dir: Path) -> str:
    if "error" in stage:
        return f"<h2>{html.escape(name)}</h2><p class='skipped'>{html.escape(stage['error'])}</p>"
    scalars = [(k, v) for k, v in stage.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    body = [f"<h2>{html.escape(name)}</h2>", _table(scalars)]
    runs = stage.get("run_dirs") or ([stage["run_dir"]] if "run_dir" in stage else [])
    curves = [loss_curve_svg(_series(Path(run) / "metrics.jsonl"), f"training loss: {Path(run).name}")
              for run in runs]
    if curves:
        body.append("<div class='curves'>" + "".join(curves) + "</div>")
    for path in stage.get("examples", []):
        if isinstance(path, str) and path.endswith(".png"):
            body.append(_image(path, report_dir, Path(path).stem.replace("_", " ")))
    text_examples = [e for e in stage.get("examples", []) if isinstance(e, dict)]
    if text_examples:
        keys = list(text_examples[0])
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(e.get(k, '')))}</td>" for k in keys) + "</tr>"
                       for e in text_examples)
        body.append(f"<table><tr>{head}</tr>{rows}</table>")
    return "\n".join(body)


def write_report(summary: Dict[str, Any], path: Path) -> Path:
    """Write ``summary`` (stage name -> dict) as an HTML page at ``path`` (atomically)."""
    path = Path(path)
    header = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    sections = [_section(name, stage, path.parent) for name, stage in summary.items() if isinstance(stage, dict)]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>intern2 demo</title><style>{_STYLE}</style>"
            f"</head><body><h1>intern2 demo</h1>{_table(list(header.items()))}{''.join(sections)}</body></html>")
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
