"""Segmentation, detection, the video tasks and UMT distillation under torchrun (2 CPU ranks, gloo, DDP and FSDP2):
the training runs finish, evaluation is reduced across ranks (both ranks report the same metrics: with FSDP2 that
needs the BatchNorm statistics kept in step) and rank 0 saves a loadable model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import intern2
from intern2.data.shapes import generate_shapes

pytest.importorskip("pycocotools")
pytestmark = pytest.mark.slow
BACKBONE = "backbone: {channels: 16, depths: [1, 1, 1, 1], groups: [1, 2, 4, 8], drop_path_rate: 0.0}"
STEPS = ["--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.device=cpu",
         "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("data") / "shapes", num_train=8, num_val=4, size=32)


@pytest.fixture(scope="module")
def actions(tmp_path_factory):
    from intern2.data.actions import generate_actions
    pytest.importorskip("av")
    return generate_actions(tmp_path_factory.mktemp("data") / "actions", num_train=8, num_val=4, num_frames=8,
                            size=32)


@pytest.fixture(params=["ddp", "fsdp"])
def mode(request) -> list:
    return ["--set", f"train.fsdp={str(request.param == 'fsdp').lower()}"]


def _torchrun(out: Path, *argv: str) -> dict:
    """Final metrics of `intern2 train ...` on two ranks; asserts both ranks report the same ones."""
    script = Path(__file__).with_name("dist_cli.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(out), "train", *argv, "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    finals = [json.loads(Path(f"{out}.rank{rank}.out").read_text().strip().splitlines()[-1]) for rank in (0, 1)]
    assert finals[0] == finals[1]
    return finals[0]


def test_segmentation(shapes, tmp_path, mode):
    final = _torchrun(tmp_path / "seg", "segment", "--data", str(shapes), "--set",
                      f"model_args={{{BACKBONE}, channels: 16, aux_channels: 16}}", "--set", "crop_size=32",
                      "--set", "scale=32", "--set", "test_size=[32, 32]", *STEPS, *mode)
    assert final["pixels"] == 4 * 32 * 32  # every validation image counted once over the two ranks
    assert intern2.from_pretrained(tmp_path / "seg" / "model").num_classes == 6


def test_detection(shapes, tmp_path, mode):
    final = _torchrun(tmp_path / "det", "detect", "--data", str(shapes), "--set",
                      f"model_args={{{BACKBONE}, fpn_channels: 32, box_fc_channels: 64, mask_channels: 16, "
                      "box_batch_size_per_image: 32, "
                      "rpn_post_nms_top_n_train: 100, rpn_pre_nms_top_n_train: 200}", "--set", "min_size=64",
                      "--set", "max_size=64", *STEPS, "--set", "train.lr=1e-4", *mode)
    assert final["images"] == 4 and {"bbox_AP", "segm_AP"} <= set(final)
    intern2.from_pretrained(tmp_path / "det" / "model")


def test_video_pretraining_then_classification(actions, tmp_path, mode):
    video = ["--data", str(actions / "train.txt"), "--set", "num_frames=4", "--set", "stride=2", "--set",
             "img_size=32", "--set", "cache_clips=true", *STEPS, *mode]
    final = _torchrun(tmp_path / "mae", "video-pretrain", "--model", "videomae_pretrain_vit_s", "--set",
                      "model_args={encoder_embed_dim: 32, encoder_depth: 1, encoder_num_heads: 2, patch_size: 16, "
                      "decoder_embed_dim: 16, decoder_depth: 1, decoder_num_heads: 2}", *video)
    assert final["count"] == 4 and final["reconstruction_loss"] > 0
    final = _torchrun(tmp_path / "cls", "video-cls", "--model", "videomae_vit_s", "--set",
                      "model_args={embed_dim: 32, depth: 1, num_heads: 2, patch_size: 16}", "--set",
                      f"checkpoint={tmp_path / 'mae' / 'model'}", *video)
    assert final["count"] == 4 and 0 <= final["top1"] <= 100
    assert intern2.from_pretrained(tmp_path / "cls" / "model").num_classes == 10
    # UMT distillation with the classifier just trained as the frozen teacher.
    final = _torchrun(tmp_path / "umt", "umt", "--set", f"teacher={tmp_path / 'cls' / 'model'}", "--set",
                      "model=videomae_vit_s", "--set", "model_args={embed_dim: 32, depth: 2, num_heads: 2, "
                      "patch_size: 16}", "--set", "student_layers=1", *video)
    assert final["count"] == 4 and final["distill_loss"] >= 0


def test_video_text(actions, tmp_path, mode):
    pytest.importorskip("tokenizers")
    final = _torchrun(tmp_path / "vt", "video-text", "--data", str(actions / "train_captions.jsonl"), *STEPS, *mode)
    assert final["videos"] == 4 and final["chance_zero_shot"] == 10.0
    assert intern2.from_pretrained(tmp_path / "vt" / "model").pretrained_cfg["prompt"] == "a video of {}"
