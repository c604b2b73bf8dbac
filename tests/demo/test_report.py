"""The demo's report: one self-contained page (pictures inline, nothing outside it is loaded), badges, figures next to
their baselines with sensible formatting, and the README's demo table generated from the published summary."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from browser import CHROMIUM, DevTools
from intern2.demo.report import format_number, markdown_table, write_report

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value, text", [(0, "0"), (3, "3"), (3.4332e-05, "3.4e-5"), (0.00025, "2.5e-4"),
                                         (75.634, "75.6"), (3.456, "3.46"), (0.25, "0.25"), (0.0458, "0.0458"),
                                         (1234.5, "1234"), (2.5e7, "2.5e7"), (1e-3, "1e-3"),
                                         ([56.7, 55.5], "56.7 / 55.5"), (None, "—"), ("n/a", "n/a")])
def test_numbers_read_as_people_read_them(value, text):
    assert format_number(value) == text


def _summary(root: Path) -> dict:
    """A two-stage summary in the demo's schema, with its pictures and loss curve under ``root``."""
    (root / "seg" / "train").mkdir(parents=True)
    (root / "seg" / "train" / "metrics.jsonl").write_text(
        "".join(json.dumps({"split": "train", "step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 6))
        + '{"split": "tr')  # the partial last line of a run killed mid-write
    Image.new("RGB", (12, 8), "red").save(root / "seg" / "overlay.png")
    Image.new("RGB", (8, 8), "blue").save(root / "seg" / "second.png")
    return {"schema_version": 1, "intern2": "0.1.0", "torch": "2.14.1", "threads": 2, "cpu": "AMD EPYC",
            "budget": 1.0, "total_seconds": 612.3, "stages": {
                "seg": {"ok": True, "check": "mIoU above twice the untrained model's", "seconds": 95.1,
                        "figures": [{"name": "mIoU", "value": 75.634, "baseline": 6.6, "baseline_is": "untrained",
                                     "unit": ""},
                                    {"name": "max difference", "value": 3.4e-5, "baseline": 1e-3,
                                     "baseline_is": "the tolerance", "unit": ""},
                                    {"name": "speed", "value": 3.5, "baseline": 1.0, "baseline_is": "reference",
                                     "unit": "x"}],
                        "runs": [{"name": "train", "dir": "seg/train"}],
                        "pictures": [{"file": "seg/overlay.png", "caption": "input | prediction"},
                                     {"file": "seg/second.png", "caption": "another"}],
                        "tables": [{"title": "examples", "columns": ["source", "output"],
                                    "rows": [["<b>bold</b>", "ok"], ["rank", 0.123456]]}]},
                "text": {"ok": False, "check": "chrF++ above copying", "seconds": 3.0,
                         "figures": [{"name": "chrF++", "value": 1.0, "baseline": 2.0, "baseline_is": "copying",
                                      "unit": ""}]},
                "video": {"error": "skipped: no module named av", "ok": False, "seconds": 0.1}}}


def test_report_is_one_self_contained_page(tmp_path):
    summary = _summary(tmp_path)
    page = write_report(summary, tmp_path).read_text()
    sources = re.findall(r"src=['\"]([^'\"]*)", page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href='http" not in page and "<link" not in page and "<script" not in page
    assert str(tmp_path) not in page
    assert page.count("badge pass") == 2 and page.count("badge fail'>FAIL") == 2  # overview + section each
    assert "SKIPPED" in page and "skipped: no module named av" in page
    assert "3.4e-5" in page and "75.6" in page and "3.5x" in page and "untrained" in page
    assert page.count("<polyline") == 1
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page  # table text is escaped
    assert "<td>0.123</td>" in page  # table numbers are written like the figures
    assert "1 of 3 stages passed" in page


def test_missing_picture_is_said_not_fatal(tmp_path):
    summary = _summary(tmp_path)
    (tmp_path / "seg" / "second.png").unlink()
    page = write_report(summary, tmp_path).read_text()
    assert "missing picture seg/second.png" in page and page.count("data:image/png") == 1


def test_markdown_table_has_every_figure_and_the_wall_clock(tmp_path):
    table = markdown_table(_summary(tmp_path)).splitlines()
    assert table[0] == "| stage | figure | result | baseline | baseline is |"
    assert "| seg | mIoU | 75.6 | 6.6 | untrained |" in table and "| seg | speed | 3.5x | 1x | reference |" in table
    assert "| video | skipped: no module named av | | | |" in table
    assert table[-1] == "| all | wall-clock | 10 min 12 s | | |"


def _tool():
    spec = importlib.util.spec_from_file_location("demo_table", ROOT / "tools" / "demo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_table_tool_rewrites_only_the_readme_block_and_checks_it(tmp_path, capsys):
    tool = _tool()
    summary_file = tmp_path / "run" / "summary.json"
    summary = _summary(summary_file.parent)
    summary["stages"]["seg"]["figures"].append({"name": "box AP / mask AP", "value": [56.7, 55.5],
                                                "baseline": [0.3, 0.0], "baseline_is": "before | training"})
    summary_file.write_text(json.dumps(summary))
    readme = tmp_path / "README.md"
    before, after = "# title\n\nprose before\n", "\nprose after\n"
    readme.write_text(before + tool.START + "| stale | table |\n" + tool.END + after)
    check = ["--readme", str(readme), "--check"]

    assert tool.main([str(summary_file), *check]) == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "demo table is not" in message
    assert tool.main([str(summary_file), "--readme", str(readme)]) == 0
    table = markdown_table(summary)
    assert readme.read_text() == before + tool.START + table + tool.END + after
    assert "| seg | box AP / mask AP | 56.7 / 55.5 | 0.3 / 0 | before \\| training |" in table.splitlines()
    assert tool.main([str(summary_file), *check]) == 0

    readme.write_text("no markers\n")
    assert tool.main([str(summary_file), *check]) == 1 and "no demo table markers" in capsys.readouterr().err


def test_readme_holds_the_table_of_the_published_run():
    tool = _tool()
    summary = json.loads(tool.PUBLISHED.read_text())
    assert summary["schema_version"] == 1 and all(s["ok"] for s in summary["stages"].values())
    assert tool.readme_block((ROOT / "README.md").read_text()) == markdown_table(summary), \
        "README's demo table: regenerate it with tools/demo_table.py runs/demo/summary.json --write"


def test_demo_table_tool_prints_the_table():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "demo_table.py")], capture_output=True, text=True,
                         check=True).stdout
    assert out == markdown_table(json.loads(_tool().PUBLISHED.read_text()))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium; "
                                             "`make test` installs it when run as root)")
def test_report_images_load_in_headless_chromium(tmp_path):
    write_report(_summary(tmp_path / "run"), tmp_path / "run")
    browser = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        browser.call("Target.getTargets")  # the pipe is up
        browser.open((tmp_path / "run" / "report.html").as_uri())
        browser.wait_for("document.readyState === 'complete'")
        images = browser.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        assert images == [True, True]
        assert browser.evaluate("document.querySelectorAll('svg polyline').length") == 1
    finally:
        browser.close()
