"""The temporal action localization metric against the official codes' outputs (../shared/fixtures/tal/metric), through
`intern2 eval-tal` as a user runs it, and its one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import fixture_path
from intern2 import cli

# The official result each case must reproduce: InternVideo's metric code (numpy 1.23.5, whose tie order the
# stable rule reproduces); for case 3, the official result once predictions of classes without GT are dropped.
CASES = {"shared_01_edges": "internvideo_actionformer", "shared_02_gt_duplicates": "internvideo_actionformer",
         "shared_03_random_nogt_classes": "activitynet_official_on_predictions_without_nogt_labels"}


@pytest.mark.parametrize("layout", ["pred_anet.json", "pred_af.json"])
@pytest.mark.parametrize("protocol", ["thumos14", "activitynet"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_eval_tal_equals_the_official_metric(case, protocol, layout, capsys):
    folder = fixture_path("tal", "metric", case)
    expected = json.loads((folder / "expected.json").read_text())["results_numpy1.23.5"][protocol][CASES[case]]
    assert cli.main(["eval-tal", str(folder / "gt.json"), str(folder / layout), "--tiou", protocol, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tiou"] == json.loads((folder / "expected.json").read_text())["results_numpy1.23.5"][protocol][
        "tiou_thresholds"]
    assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert got["average_mAP"] == pytest.approx(expected["average_mAP"], abs=1e-6)
    assert set(got["ap_per_class"]) == set(expected["ap_per_class"])
    for name, values in expected["ap_per_class"].items():
        assert got["ap_per_class"][name] == pytest.approx(values, abs=1e-6), name
    assert got["num_gt"] == expected["num_gt_instances_after_loading"]


def test_predictions_of_classes_without_ground_truth_are_dropped_with_a_warning(capsys, caplog):
    folder = fixture_path("tal", "metric", "shared_03_random_nogt_classes")
    assert cli.main(["eval-tal", str(folder / "gt.json"), str(folder / "pred_af.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped_predictions"] == 11
    assert "11 predictions of classes without ground truth" in caplog.text and "[2, 5]" in caplog.text


def test_custom_thresholds_and_text_output(capsys):
    folder = fixture_path("tal", "metric", "shared_01_edges")
    assert cli.main(["eval-tal", str(folder / "gt.json"), str(folder / "pred_anet.json"), "--tiou", "0.5:0.5:1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("average mAP 71.39 over tIoU 0.50 ") and "Diving: 62.50" in out[2]


def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("gt, predictions, message", [
    ({"database": {}}, {"results": {}}, "no annotated video in subset 'validation'"),
    ({"videos": {}}, {"results": {}}, "expected a 'database' object of videos"),
    ({"database": {"v1": {"subset": "Validation", "annotations": [{"label_id": 0, "segment": [1.0]}]}}},
     {"results": {}}, "v1 annotation 0: 'segment' must be [start, end] in seconds with start <= end, got [1.0]"),
    ({"database": {"v1": {"subset": "validation", "annotations": [{"label_id": "Diving", "segment": [1, 2]}]}}},
     {"results": {}}, "v1 annotation 0: expected a known 'label' name or an integer 'label_id', got label=None, "
                      "label_id='Diving'"),
    ({"database": {"v1": {"subset": "validation", "annotations": [{"label_id": 0, "segment": [1, 2]}]}}},
     {"preds": {}}, "expected a 'results' (ActivityNet) or 'database' (ActionFormer) object"),
    ({"database": {"v1": {"subset": "validation", "annotations": [{"label_id": 0, "segment": [1, 2]}]}}},
     {"results": {"v1": [{"label_id": 0, "segment": [1, 2]}]}}, "v1 entry 0: expected a finite number 'score', "
                                                                 "got None"),
    ({"database": {"v1": {"subset": "validation", "annotations": [{"label_id": 0, "segment": [1, 2]}]}}},
     {"results": {"v1": [{"label": "Diving", "segment": [1, 2], "score": 1}]}}, "v1 entry 0: expected a known "
                                                                                "'label' name or an integer"),
    ({"database": {"v1": "x"}}, {"results": {}}, "v1: expected a video object ('subset', 'annotations'), got \"x\""),
    ({"database": {"v1": {"subset": "validation", "annotations": "x"}}}, {"results": {}},
     "v1 annotations: expected a list of annotation objects, got \"x\""),
    ({"database": {"v1": {"subset": "validation", "annotations": [5]}}}, {"results": {}},
     "v1 annotations: expected a list of annotation objects, got [5]"),
    ({"database": {"v1": {"subset": "validation", "annotations": [{"label_id": 0, "segment": [3, 1]}]}}},
     {"results": {}}, "v1 annotation 0: 'segment' must be [start, end] in seconds with start <= end, got [3, 1]"),
    ({"database": {"v1": {"subset": "validation", "annotations": [{"label_id": 0, "segment": [1, 2]}]}}},
     {"results": {"v1": [{"label_id": 0, "segment": [1, 2], "score": float("nan")}]}},
     "v1 entry 0: expected a finite number 'score', got nan"),
    ({"database": {"v1": {"subset": "validation", "annotations": [{"label_id": 0, "segment": [1, 2]}]}}},
     {"results": {"v1": {"label_id": 0}}}, "v1: expected a list of prediction objects"),
])
def test_bad_files_are_one_line_naming_the_entry(tmp_path, capsys, gt, predictions, message):
    with pytest.raises(SystemExit) as stop:
        cli.main(["eval-tal", _write(tmp_path / "gt.json", gt), _write(tmp_path / "pred.json", predictions)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_thresholds_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["eval-tal", "gt.json", "pred.json", "--tiou", "0:1.5:3"])
    assert stop.value.code == 2 and "expected thresholds in (0, 1]" in capsys.readouterr().err


def test_training_evaluation_leaves_out_what_eval_tal_refuses(tmp_path):
    """The evaluation of a training run skips the annotations its data source skipped; eval-tal names them."""
    from intern2.tasks.tal import load_ground_truth
    good = {"label_id": 0, "segment": [1, 2]}  # name-less: its taxonomy node names it
    gt = {"taxonomy": [{"nodeId": "0", "nodeName": "a"}],
          "database": {"v1": {"subset": "validation", "annotations": [good, {"label_id": 0, "segment": [3, 1]}]},
                       "v2": "not a video", "v3": {"subset": "validation", "annotations": [good]}}}
    path = Path(_write(tmp_path / "gt.json", gt))
    with pytest.raises(ValueError, match="v1 annotation 1: 'segment' must be"):
        load_ground_truth(path)
    instances, names = load_ground_truth(path, skip_unusable=True)
    assert [(i.video, i.start, i.end) for i in instances] == [("v1", 1.0, 2.0), ("v3", 1.0, 2.0)]
    assert names == {0: "a"}  # a taxonomy id written as a string still names its class


def test_named_labels_are_scored_by_name_whatever_the_taxonomy_numbers(tmp_path, capsys):
    """Official ActivityNet files: names only in the annotations and results, and a taxonomy whose node ids
    (parents included) are not class ids. Perfect predictions score 1 (Archery's were numbered by its taxonomy
    node, 2, while its ground truth was class 0 of the sorted names: mAP 0.5)."""
    gt = {"taxonomy": [{"nodeId": 0, "nodeName": "Root"}, {"nodeId": 1, "nodeName": "Zumba", "parentId": 0},
                       {"nodeId": 2, "nodeName": "Archery", "parentId": 0}],
          "database": {video: {"subset": "validation", "duration": 10.0,
                               "annotations": [{"label": label, "segment": [1, 5]}]}
                       for video, label in (("v1", "Zumba"), ("v2", "Archery"))}}
    predictions = {"results": {video: [{"label": label, "score": 0.9, "segment": [1, 5]}]
                               for video, label in (("v1", "Zumba"), ("v2", "Archery"))}}
    assert cli.main(["eval-tal", _write(tmp_path / "gt.json", gt), _write(tmp_path / "pred.json", predictions),
                     "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["average_mAP"] == 1.0 and sorted(metrics["ap_per_class"]) == ["Archery", "Zumba"]
    assert metrics["dropped_predictions"] == 0
