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
    captured = capsys.readouterr()
    assert "no registered model matches" in captured.err and not captured.out
    # --json is JSON on stdout, also when nothing matches (the message goes to stderr).
    assert cli.main(["list", "--json", "internimage_*"]) == 0
    assert "internimage_t" in json.loads(capsys.readouterr().out)
    assert cli.main(["list", "--pretrained", "--json", "nosuch"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {} and "no pretrained tag matches 'nosuch'" in captured.err
    # An architecture's exact name lists its tags.
    assert cli.main(["list", "--pretrained", "internimage_t"]) == 0
    assert all(line.startswith("internimage_t.") for line in capsys.readouterr().out.splitlines())


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


@pytest.mark.parametrize("task,config", [("image-cls", "image_cls.ImageClsConfig"),
                                         ("translation", "translation.TranslationConfig"),
                                         ("video-text", "video_text.VideoTextConfig"), ("umt", "umt.UMTConfig")])
def test_train_help_shows_each_tasks_own_defaults(task, config, capsys):
    """`intern2 train TASK --help` lists the defaults the task trains with (translation's train section is
    not the generic one)."""
    import importlib
    module, name = config.split(".")
    train = getattr(importlib.import_module(f"intern2.tasks.{module}"), name)().train
    with pytest.raises(SystemExit):
        cli.main(["train", task, "--help"])
    out = capsys.readouterr().out
    for field in ("epochs", "lr", "weight_decay", "warmup_steps", "schedule"):
        line = out.split(f"  train.{field} ")[1].splitlines()[0]
        assert f") = {str(getattr(train, field)).lower()}" in line, line
