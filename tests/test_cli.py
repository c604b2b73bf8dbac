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
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_list_filters_by_pattern(capsys):
    assert cli.main(["list", "no_such_model_*"]) == 1
    assert "no registered model matches" in capsys.readouterr().out


def test_demo_runs_and_writes_summary(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--steps", "150", "--rounds", "1", "--epochs", "2"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(diff < 1e-3 for diff in summary["max_abs_diff_vs_reference"].values())
    fit = summary["displacement_fit"]
    assert fit["final_error_px"] < 0.1 < fit["start_error_px"]
    assert fit["final_loss"] < fit["start_loss"] / 100
    assert set(summary["fwd_bwd_ms"]) == {"reference", "fast"}
    digits = summary["internimage_digits"]
    assert digits["top1"] > 5 * digits["chance"] and digits["val_images"] == 359
    assert len(digits["examples"]) == 6 and (tmp_path / "internimage_digits" / "model" / "model.safetensors").exists()

