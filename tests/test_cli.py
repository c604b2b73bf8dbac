"""The `intern2` command line, run in-process."""
from __future__ import annotations

import json

import pytest

from intern2 import cli


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: intern2" in out and "list" in out and "demo" in out


def test_version(capsys):
    from intern2 import __version__
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"intern2 {__version__}"


def test_no_arguments_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage: intern2" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_help_groups_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    groups = [line for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert groups == ["models:", "inference:", "training:", "serving:", "options:"]
    assert all(f"  {name} " in out for name in cli.COMMANDS)


@pytest.mark.parametrize("argv", [["eval", "--task", "umt"], ["eval", "video-pretrain"],
                                  ["predict", "x.mp4", "--task", "umt"]])
def test_train_only_tasks_have_no_eval_or_predict(argv, capsys):
    assert cli.main(argv) == 2
    assert "only trains" in capsys.readouterr().err


def test_list_filters_by_pattern(capsys):
    assert cli.main(["list", "no_such_model_*"]) == 1
    assert "no registered model matches" in capsys.readouterr().out


def test_demo_runs_and_writes_summary(tmp_path, capsys):
    stale = tmp_path / "digits" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run")
    assert cli.main(["demo", "--out", str(tmp_path), "--only", "dcnv3,digits", "--steps", "150", "--rounds", "1",
                     "--epochs", "2"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    dcn = summary["dcnv3"]
    assert dcn["ok"] and dcn["max_abs_diff_vs_reference"] < 1e-3
    assert dcn["displacement_final_error_px"] < 0.1 < dcn["displacement_start_error_px"]
    assert dcn["displacement_final_loss"] < dcn["displacement_start_loss"] / 100
    digits = summary["digits"]
    assert digits["top1"] > 5 * digits["chance"] and digits["val_images"] == 359
    assert len(digits["examples"]) == 6 and (tmp_path / "digits" / "model" / "model.safetensors").exists()
    assert not stale.exists(), "a re-run must not reuse an earlier run's files"
    report = (tmp_path / "report.html").read_text()
    assert "<h2>digits</h2>" in report and "<polyline" in report and "top1" in report


def test_demo_rejects_unknown_stage(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--out", str(tmp_path), "--only", "digits,nope"])
    assert "unknown stages ['nope']" in capsys.readouterr().err


def test_report_renders_stages(tmp_path):
    from intern2.demo.report import write_report
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"split": "train", "step": s, "loss": 2.0 / s})
                                                 for s in range(1, 6)))
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "example.png")
    summary = {"torch": "x", "stage": {"mIoU": 41.5, "run_dir": str(run), "examples": [str(tmp_path / "example.png")]},
               "text": {"chrf": 40.0, "examples": [{"source": "<b>", "hypothesis": "ok"}]},
               "broken": {"error": "skipped: no module named av"}}
    html = write_report(summary, tmp_path / "report.html").read_text()
    assert "41.50" in html and html.count("<polyline") == 1 and "src='example.png'" in html
    assert "&lt;b&gt;" in html and "<b>" not in html  # text from examples is escaped
    assert "skipped: no module named av" in html


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_help_without_task_names_every_task(command, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    overview = out.splitlines()[0]
    for task in ("image-cls", "segment", "detect", "video-cls", "video-text", "translation"):
        assert task in overview
    assert "usage:" in out  # followed by the default task's own options


def test_progress_bar_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from intern2.pipelines.common import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shows_bar in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(progress(range(5), "eval", 5)) == list(range(5))
        assert ("eval" in stream.getvalue()) == shows_bar
