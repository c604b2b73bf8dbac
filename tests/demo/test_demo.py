"""`intern2 demo` and the recipes it is made of, as a user runs them: `intern2 recipes`, `intern2 train TASK
--recipe NAME` (with the recipes that build on each other run in order from one folder), and the demo's stages on
step budgets, seeded, giving the same figures twice."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from intern2 import cli
from intern2.config import load_config
from intern2.recipes import list_recipes

TASK_CONFIGS = {"image-cls": ("intern2.tasks.image_cls", "ImageClsConfig"),
                "segment": ("intern2.tasks.segment", "SegmentConfig"),
                "detect": ("intern2.tasks.detect", "DetectConfig"),
                "video-pretrain": ("intern2.tasks.video_pretrain", "VideoPretrainConfig"),
                "video-cls": ("intern2.tasks.video_cls", "VideoClsConfig"),
                "video-text": ("intern2.tasks.video_text", "VideoTextConfig"),
                "umt": ("intern2.tasks.umt", "UMTConfig"),
                "translation": ("intern2.tasks.translation", "TranslationConfig"),
                "tal": ("intern2.tasks.tal", "TALConfig")}


@pytest.fixture
def tiny_actions(tmp_path, monkeypatch):
    """builtin:actions replaced by 32 + 6 small clips (the real set takes a minute to generate)."""
    import intern2.data.actions as actions
    root = actions.generate_actions(tmp_path / "actions", num_train=32, num_val=6, num_frames=16, size=32)
    monkeypatch.setattr(actions, "builtin_actions_root", lambda: root)
    return root


@pytest.fixture
def tiny_untrimmed(tmp_path, monkeypatch):
    """builtin:untrimmed replaced by 10 + 3 small videos (the recipe's 360 take a minute with their features)."""
    import intern2.data.untrimmed as untrimmed
    root = untrimmed.generate_untrimmed(tmp_path / "untrimmed", num_train=10, num_val=3, num_classes=4, size=32)
    monkeypatch.setattr(untrimmed, "builtin_untrimmed_root", lambda *args, **kwargs: root)
    return root


def test_every_task_has_a_recipe_that_is_a_valid_config():
    import importlib
    recipes = list_recipes()
    assert {r.task for r in recipes} == set(TASK_CONFIGS) == set(__import__("intern2.tasks").tasks.TASKS)
    for recipe in recipes:
        module, name = TASK_CONFIGS[recipe.task]
        cfg = load_config(getattr(importlib.import_module(module), name), base=recipe.config)
        assert cfg.train.out_dir == f"runs/{recipe.name}" and cfg.train.device == "cpu"
        assert recipe.summary and recipe.reaches and 0 < recipe.minutes <= 5


def test_recipes_command_lists_and_prints_a_config_file(capsys, tmp_path):
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(r.name in out and r.task in out for r in list_recipes())
    for recipe in list_recipes():  # each printed recipe is a config file of its task, comments kept
        assert cli.main(["recipes", recipe.name]) == 0
        printed = capsys.readouterr().out
        assert yaml.safe_load(printed) == recipe.config and recipe.summary in printed
        (tmp_path / f"{recipe.name}.yaml").write_text(printed)  # `intern2 recipes NAME > NAME.yaml`
    assert cli.main(["train", "image-cls", "--config", str(tmp_path / "digits.yaml"), "--set", "train.max_steps=1",
                     "--set", "train.eval_every=1", "--out", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["count"] > 0


@pytest.mark.parametrize("argv, message", [
    (["train", "segment", "--recipe", "nope"], "--recipe 'nope': no such recipe for segment; known: shapes-segment"),
    (["train", "detect", "--recipe", "digits"], "--recipe 'digits' trains image-cls, not detect"),
    (["recipes", "--task", "nope"], "--task 'nope': no recipes"),
    (["train", "--recipe", "nope"], "intern2 train: --recipe 'nope': no such recipe; known: "),
    (["train", "nope"], "intern2 train: unknown task 'nope'; tasks: detect, image-cls"),
])
def test_bad_recipe_is_one_line_and_exit_2(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's parser.error
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not any(line.startswith("Traceback") for line in err)


def test_train_takes_the_task_from_the_recipe(tmp_path, capsys):
    assert cli.main(["train", "--recipe", "digits", "--set", "train.epochs=1", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] == 359
    assert json.loads((tmp_path / "config.json").read_text())["img_size"] == 32  # the recipe's, not the default


def _train(task: str, recipe: str, *settings: str) -> None:
    assert cli.main(["train", task, "--recipe", recipe, *[a for s in settings for a in ("--set", s)]]) == 0


@pytest.mark.slow
def test_recipes_run_in_order_from_one_folder(tmp_path, tiny_actions, tiny_untrimmed, monkeypatch, capsys):
    """Each recipe through `intern2 train`, a few steps each; the ones that build on another recipe's output
    (fine-tuning from pre-training, UMT from the video-text model) find it where that recipe wrote it."""
    monkeypatch.chdir(tmp_path)
    short = ("train.max_steps=2", "train.eval_every=2", "train.batch_size=2")
    for task, recipe in (("image-cls", "digits"), ("segment", "shapes-segment"), ("detect", "shapes-detect"),
                         ("detect", "shapes-detect-dino"),
                         ("video-pretrain", "actions-pretrain"), ("video-cls", "actions-finetune"),
                         ("tal", "untrimmed-localize"), ("video-text", "actions-text"), ("umt", "actions-umt"),
                         ("translation", "babel-translate")):
        settings = short
        if recipe == "babel-translate":
            settings = ("train.max_steps=2", "train.eval_every=2", "max_eval_examples=4")
        if recipe.startswith("shapes-detect"):  # as the README runs it: from the segmentation recipe's backbone
            settings = (*short, "backbone_checkpoint=runs/shapes-segment/model")
        if recipe == "shapes-detect":  # a 2-step Mask R-CNN keeps 100 low-score boxes per image: masks for 10
            settings = (*settings, "model_args.box_detections_per_img=10")
        _train(task, recipe, *settings)
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert metrics, recipe
        assert (tmp_path / "runs" / recipe / "model").is_dir(), recipe


def _figures(summary: dict) -> dict:
    """Every stage's figure values, without the DCNv3 timing (the one figure that measures the machine)."""
    return {name: [f["value"] for f in stage["figures"] if not f["name"].startswith("forward+backward speed")]
            for name, stage in summary["stages"].items()}


def test_demo_is_deterministic_and_writes_a_relative_summary(tmp_path, capsys):
    stale = tmp_path / "a" / "digits" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run")
    (tmp_path / "a" / "summary.json").write_text("{}")  # the earlier run's: the folder is the demo's
    runs = []
    for name in ("a", "b"):
        code = cli.main(["demo", "--out", str(tmp_path / name), "--only", "dcnv3,digits,segmentation",
                         "--budget", "0.02", "--steps", "150", "--rounds", "1"])
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        runs.append(summary)
        assert code == (0 if all(s["ok"] for s in summary["stages"].values()) else 1)
    assert _figures(runs[0]) == _figures(runs[1]), "two runs on one machine must give the same figures"
    summary = runs[0]
    assert summary["schema_version"] == 1 and summary["budget"] == 0.02 and summary["cpu"]
    dcn, digits = summary["stages"]["dcnv3"], summary["stages"]["digits"]
    assert dcn["ok"] and dcn["figures"][0]["value"] < 1e-3 and dcn["figures"][2]["value"] < 0.1
    assert digits["ok"] and digits["figures"][0]["baseline"] == 10.0
    assert summary["stages"]["segmentation"]["figures"][0]["baseline_is"] == "the untrained model"
    assert not stale.exists(), "a re-run must not reuse an earlier run's files"
    text = (tmp_path / "a" / "summary.json").read_text()
    assert str(tmp_path) not in text, "summary.json holds relative paths only"
    for stage in summary["stages"].values():
        for item in [*stage.get("pictures", []), *stage.get("runs", [])]:
            assert (tmp_path / "a" / (item.get("file") or item.get("dir"))).exists()
    report = (tmp_path / "a" / "report.html").read_text()
    assert "digits" in report and "<polyline" in report and str(tmp_path) not in report


@pytest.mark.slow
def test_video_and_video_text_and_translation_stages(tmp_path, tiny_actions, tiny_untrimmed):
    """The stages with their own pictures and tables, on the tiny clips and a few steps: they run the recipes
    through the Trainer and read the results back through the pipelines."""
    from intern2.demo.stages import STAGES, Stage
    done: dict = {}
    for name in ("video", "localization", "video_text", "translation"):
        folder = tmp_path / name
        folder.mkdir()
        done[name] = STAGES[name](Stage(tmp_path, folder, 0.005, done, {}))
        for item in done[name].get("pictures", []):
            assert (tmp_path / item["file"]).stat().st_size > 0
    video = done["video"]
    assert len(video["pictures"]) == 3 and video["figures"][1]["baseline"] == 10.0
    assert [r["dir"] for r in video["runs"]] == ["video/pretrain", "video/pretrained", "video/scratch"]
    localization = done["localization"]
    assert localization["encoder"] == "video/pretrained/model" and len(localization["pictures"]) == 3
    assert localization["figures"][0]["baseline_is"] == "the same localizer before training"
    retrieval = done["video_text"]["tables"][0]
    assert len(retrieval["rows"]) == 2 and all(1 <= rank <= 6 for _, rank in retrieval["rows"])
    translations = done["translation"]["tables"][0]
    assert translations["columns"] == ["direction", "source", "reference", "output"] and translations["rows"]


def test_demo_rejects_unknown_stage(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--out", str(tmp_path), "--only", "digits,nope"])
    assert "unknown stages ['nope']" in capsys.readouterr().err


def test_demo_stage_choice_and_a_folder_it_does_not_own(tmp_path, monkeypatch, capsys):
    import intern2.demo as demo
    ran = []
    for name in demo.STAGES:
        monkeypatch.setitem(demo.STAGES, name, lambda stage, name=name: ran.append(name) or {"ok": True})
    # Stages run once each, in the demo's order (detection after the segmentation whose backbone it reuses).
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--only", "detection,segmentation,detection"]) == 0
    assert ran == ["segmentation", "detection"]
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--only", "detection"]) == 0  # its own folder again
    mine = tmp_path / "home"
    (mine / "video").mkdir(parents=True)
    (mine / "video" / "keep.txt").write_text("a user's file")
    (tmp_path / "file").write_text("x")
    for argv, message in ((["--only", ""], "--only: no stage given"), (["--out", ""], "--out: empty path"),
                          (["--out", str(tmp_path / "file")], "is a file"),
                          (["--out", str(mine), "--only", "video"], "it holds video/, which the demo would replace")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv
    assert (mine / "video" / "keep.txt").read_text() == "a user's file"


def recipes_table() -> str:
    """The README's recipe rows, as the recipes' own YAML describes them."""
    return "".join(f"| `{r.name}` | `{r.task}` | {r.summary} | {r.reaches} | {r.minutes:g} |\n" for r in list_recipes())


def test_readme_lists_every_recipe_as_its_yaml_describes_it():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("<!-- recipes-table: checked by tests/demo/test_demo.py -->\n")
    end = readme.index("<!-- recipes-table: end -->")
    rows = readme[start:end].split("\n", 3)[3]
    assert rows == recipes_table(), "README recipes table: update it from the YAML files (recipes_table())"
