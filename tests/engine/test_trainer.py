"""Training engine: exact resume, bookkeeping, optimiser groups, schedules, configs."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from intern2 import cli
from intern2.config import apply_overrides, load_config, to_dict
from intern2.engine import TrainConfig, Trainer
from intern2.engine.optim import param_groups, stretch_to_time, warmup_cosine
from intern2.engine.trainer import ShardedSampler
from intern2.tasks.image_cls import ImageClassificationTask, ImageClsConfig

pytest.importorskip("sklearn")
TINY = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.1)


def _cfg(out, **train) -> ImageClsConfig:
    base = TrainConfig(max_steps=6, batch_size=16, lr=1e-3, out_dir=str(out), device="cpu", log_every=1, seed=3,
                       checkpoint_every=2, warmup_steps=2)
    return ImageClsConfig(model="internimage_t", model_args=TINY, data="builtin:digits", img_size=32, hflip=0.5,
                          mixup=0.2, train=replace(base, **train))


class Interrupted(Exception):
    pass


class InterruptingTask(ImageClassificationTask):
    """Dies in the middle of the run, after the checkpoint of step 4 (a crash or a pre-empted job)."""

    def __init__(self, cfg, die_after: int):
        super().__init__(cfg)
        self.calls, self.die_after = 0, die_after

    def training_step(self, model, batch):
        self.calls += 1
        if self.calls > self.die_after:
            raise Interrupted()
        return super().training_step(model, batch)


def _weights(out):
    return load_file(out / "model" / "model.safetensors")


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_is_exact(tmp_path, grad_accum):
    """Drop path, mixup and augmentation are random: an interrupted + resumed run still ends bit-identical, also
    with evaluations on the checkpoints' steps (they must not draw from the training's random streams)."""
    full = _cfg(tmp_path / "full", grad_accum=grad_accum, eval_every=2)
    Trainer(ImageClassificationTask(full), full.train).fit()
    broken = _cfg(tmp_path / "broken", grad_accum=grad_accum, eval_every=2)
    with pytest.raises(Interrupted):
        Trainer(InterruptingTask(broken, die_after=5 * grad_accum), broken.train).fit()
    checkpoint = torch.load(tmp_path / "broken" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["progress"]["step"] == 4
    resumed = replace(broken, train=replace(broken.train, resume="auto"))
    Trainer(ImageClassificationTask(resumed), resumed.train).fit()
    want, got = _weights(tmp_path / "full"), _weights(tmp_path / "broken")
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # The records after the checkpoint's step are written again, not repeated.
    assert _train_steps(tmp_path / "broken") == _train_steps(tmp_path / "full") == [1, 2, 3, 4, 5, 6]
    assert _eval_steps(tmp_path / "broken") == _eval_steps(tmp_path / "full") == [2, 4, 6]


class DyingEvaluation(ImageClassificationTask):
    """The first evaluation fails (after its step's checkpoint was saved)."""

    evaluations = 0

    def eval_step(self, model, batch):
        DyingEvaluation.evaluations += 1
        if DyingEvaluation.evaluations == 1:
            raise Interrupted()
        return super().eval_step(model, batch)


def test_an_evaluation_that_died_runs_again_on_resume(tmp_path):
    cfg = _cfg(tmp_path, max_steps=6, checkpoint_every=2, eval_every=4)
    with pytest.raises(Interrupted):
        Trainer(DyingEvaluation(cfg), cfg.train).fit()
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["progress"]["eval_pending"]
    resumed = replace(cfg, train=replace(cfg.train, resume="auto"))
    Trainer(ImageClassificationTask(resumed), resumed.train).fit()
    assert _train_steps(tmp_path) == [1, 2, 3, 4, 5, 6] and _eval_steps(tmp_path) == [4, 6]


def test_a_finished_run_resumed_returns_its_final_metrics(tmp_path):
    """The last step evaluated, then saved (checkpoint_every does not divide it): resumed, with another
    evaluation crop, the run has nothing to train and returns the final model's metrics measured now."""
    cfg = _cfg(tmp_path, max_steps=6, checkpoint_every=4, eval_every=3)
    Trainer(ImageClassificationTask(cfg), cfg.train).fit()
    again = replace(cfg, crop_pct=0.875, train=replace(cfg.train, resume="auto"))
    metrics = Trainer(ImageClassificationTask(again), again.train).fit()
    assert metrics["count"] > 0 and _train_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert _eval_steps(tmp_path) == [3, 6]  # measured again, its record replaced


def test_resume_at_the_last_step_of_an_epoch_is_exact(tmp_path):
    """With grad_accum the epoch ends on leftover micro-batches too few for a step; a run resumed from the
    checkpoint of the epoch's last step must not run them (the uninterrupted run never did)."""
    def cfg(out, **train):  # 180 training images: 5 steps of 2 x 16 per epoch, 20 images left over
        base = _cfg(out, max_steps=7, grad_accum=2, checkpoint_every=5, **train)
        return replace(base, val_fraction=0.9)
    Trainer(ImageClassificationTask(cfg(tmp_path / "full")), cfg(tmp_path / "full").train).fit()
    with pytest.raises(Interrupted):
        Trainer(InterruptingTask(cfg(tmp_path / "broken"), die_after=10), cfg(tmp_path / "broken").train).fit()
    assert torch.load(tmp_path / "broken" / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"] == 5
    resumed = cfg(tmp_path / "broken", resume="auto")
    Trainer(ImageClassificationTask(resumed), resumed.train).fit()
    want, got = _weights(tmp_path / "full"), _weights(tmp_path / "broken")
    assert all(torch.equal(got[key], want[key]) for key in want)


def _train_steps(out, split="train"):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["split"] == split]


def _eval_steps(out):
    return _train_steps(out, "eval")


def test_resume_refuses_other_settings_but_may_run_longer(tmp_path):
    """A new lr would be silently overridden by the optimizer state, a new batch size would break the data
    order: resuming with them is refused, naming the field; more steps (and bookkeeping changes) are fine."""
    cfg = _cfg(tmp_path, max_steps=2)
    Trainer(ImageClassificationTask(cfg), cfg.train).fit()
    for change, field in ((dict(lr=5e-3), "train.lr: 0.001 -> 0.005"), (dict(batch_size=8), "train.batch_size")):
        other = replace(cfg, train=replace(cfg.train, resume="auto", **change))
        with pytest.raises(ValueError, match=f"other settings .*{field}"):
            Trainer(ImageClassificationTask(other), other.train).fit()
    with pytest.raises(ValueError, match="hflip"):  # the Python Trainer compares the task's whole config too
        other = replace(cfg, hflip=0.0, train=replace(cfg.train, resume="auto"))
        Trainer(ImageClassificationTask(other), other.train).fit()
    # A checkpoint that stored fewer fields (a Python run's `train` only, an older intern2) compares those.
    path = tmp_path / "checkpoints" / "last.pt"
    payload = torch.load(path, weights_only=True)
    payload["config"] = {"train": payload["config"]["train"]}
    torch.save(payload, path)
    # Evaluation-only fields and the initial weights (which the resume replaces) may change.
    longer = replace(cfg, crop_pct=0.875, checkpoint=str(tmp_path / "model"),
                     train=replace(cfg.train, resume="auto", max_steps=3, log_every=2, eval_every=3,
                                   grad_checkpointing=True))
    Trainer(ImageClassificationTask(longer), longer.train, config_to_save=to_dict(longer)).fit()
    assert _train_steps(tmp_path) == [1, 2, 3]


def test_a_new_run_in_an_old_folder_leaves_nothing_to_resume(tmp_path):
    """A new run that dies before its first checkpoint must not leave the previous run's last.pt for
    resume=auto to continue, nor the previous run's records in metrics.jsonl."""
    old = _cfg(tmp_path, max_steps=2)
    Trainer(ImageClassificationTask(old), old.train).fit()
    with pytest.raises(Interrupted):
        Trainer(InterruptingTask(old, die_after=1), old.train).fit()
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    assert _train_steps(tmp_path) == [1]


def test_a_stop_mid_epoch_is_resumable_and_the_time_spent_counts(tmp_path):
    """max_steps without checkpoint_every still writes last.pt, with the training time spent: a resumed run with
    a time limit already used up takes no step (resuming a finished run changes nothing); a longer one goes on."""
    cfg = _cfg(tmp_path, max_steps=2, checkpoint_every=None, eval_every=2)
    Trainer(ImageClassificationTask(cfg), cfg.train).fit()
    progress = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert progress["step"] == 2 and progress["batches_done"] == 2 and progress["elapsed_s"] > 0
    records = (tmp_path / "metrics.jsonl").read_text()
    spent = replace(cfg, train=replace(cfg.train, resume="auto", max_steps=50, time_limit_s=progress["elapsed_s"] / 2))
    for _ in range(2):
        Trainer(ImageClassificationTask(spent), spent.train).fit()
        assert (tmp_path / "metrics.jsonl").read_text() == records  # nothing trained, nothing repeated
    longer = replace(cfg, train=replace(cfg.train, resume="auto", max_steps=3))
    Trainer(ImageClassificationTask(longer), longer.train).fit()
    assert _train_steps(tmp_path) == [1, 2, 3]


class OneBadMicroBatch(ImageClassificationTask):
    """The first micro-batch's loss is NaN, the second's finite."""

    calls = 0

    def training_step(self, model, batch):
        loss, scalars = super().training_step(model, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls == 1 else loss), scalars


def test_a_non_finite_micro_batch_skips_its_step(tmp_path):
    """With grad_accum, one NaN micro-batch poisons the accumulated gradient even if the last loss is finite."""
    cfg = _cfg(tmp_path, max_steps=2, grad_accum=2)
    trainer = Trainer(OneBadMicroBatch(cfg), cfg.train)
    trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert _train_steps(tmp_path) == [1, 2]


def test_fine_tuning_on_the_same_classes_keeps_the_trained_head(tmp_path):
    cfg = _cfg(tmp_path / "first", max_steps=1)
    Trainer(ImageClassificationTask(cfg), cfg.train).fit()
    again = replace(cfg, checkpoint=str(tmp_path / "first" / "model"))
    model = ImageClassificationTask(again).build_model()
    trained = _weights(tmp_path / "first")
    assert torch.equal(model.state_dict()["head.weight"], trained["head.weight"])


def test_bookkeeping_files_and_metrics(tmp_path):
    cfg = _cfg(tmp_path, max_steps=4, amp="bf16", ema_decay=0.9, eval_every=2)
    metrics = Trainer(ImageClassificationTask(cfg), cfg.train).fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["split"] == "train"]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4]
    assert all(line["loss"] > 0 and "lr" in line and "grad_norm" in line for line in train_lines)
    assert [line["step"] for line in lines if line["split"] == "eval"] == [2, 4]
    assert 0 <= metrics["top1"] <= 100 and metrics["count"] == 359
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]  # no temp files left
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["num_classes"] == 10 and saved["pretrained_cfg"]["label_names"] == [str(i) for i in range(10)]
    assert saved["pretrained_cfg"]["file"] is None and "metrics" not in saved["pretrained_cfg"]


def test_an_unwritable_out_dir_is_refused_before_the_work(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = _cfg(tmp_path / "file", max_steps=1)
    with pytest.raises(ValueError, match="train.out_dir .*file: is a file; expected a folder"):
        Trainer(ImageClassificationTask(cfg), cfg.train).fit()


def test_resume_from_a_different_world_size_is_refused(tmp_path):
    cfg = _cfg(tmp_path, max_steps=2)
    Trainer(ImageClassificationTask(cfg), cfg.train).fit()
    path = tmp_path / "checkpoints" / "last.pt"
    payload = torch.load(path, weights_only=True)
    payload["world_size"] = 4
    torch.save(payload, path)
    again = replace(cfg, train=replace(cfg.train, resume=str(path)))
    with pytest.raises(ValueError, match="written by 4 processes"):
        Trainer(ImageClassificationTask(again), again.train).fit()
    with pytest.raises(FileNotFoundError, match="train.resume"):
        bad = replace(cfg, train=replace(cfg.train, resume=str(tmp_path / "nope.pt")))
        Trainer(ImageClassificationTask(bad), bad.train).fit()


def test_sampler_shards_and_resumes_mid_epoch():
    shards = [list(ShardedSampler(10, rank, 3, seed=1)) for rank in range(3)]
    assert all(len(s) == 3 for s in shards) and len(set(sum(shards, []))) == 9
    sampler = ShardedSampler(10, 0, 1, seed=1)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start=4)
    assert list(sampler) == whole[4:] and len(sampler) == 6
    sampler.set_epoch(3)
    assert list(sampler) != whole


def test_param_groups_and_schedule():
    from intern2 import create_model
    model = create_model("internimage_t", **TINY, num_classes=3)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["head.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["head.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["patch_embed.conv1.weight"])]["lr_scale"] == 0.5 ** (model.num_layer_ids - 1)
    factor = warmup_cosine(total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [round(factor(s), 4) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.1]


def test_schedule_stretched_to_a_time_budget():
    """A run stopped by time still warms up by steps, then follows the cosine to its end by the clock."""
    factor = warmup_cosine(total_steps=1000, warmup_steps=10, min_lr_ratio=0.1)
    fraction = [0.0]
    stretched = stretch_to_time(factor, 1000, 10, lambda: fraction[0])
    assert stretched(3) == factor(3) and stretched(50) == factor(50)  # warmup; steps ahead of the clock
    fraction[0] = 0.5
    assert stretched(50) == pytest.approx(factor(505))
    fraction[0] = 1.2  # past the budget: the end of the schedule
    assert stretched(60) == pytest.approx(0.1)


def test_run_stopped_mid_epoch_evaluates_its_final_model(tmp_path):
    """max_steps or a time limit that stops mid-epoch still reports metrics of the model it saves, not of an
    earlier evaluation."""
    def evals(out, **train):
        cfg = _cfg(out, epochs=1000, checkpoint_every=None, **train)
        Trainer(ImageClassificationTask(cfg), cfg.train).fit()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return max(r["step"] for r in records if r["split"] == "train"), [r["step"] for r in records
                                                                         if r["split"] == "eval"]
    assert evals(tmp_path / "steps", max_steps=3, eval_every=2) == (3, [2, 3])
    assert evals(tmp_path / "time", max_steps=1000, time_limit_s=0.0) == (1, [1])  # the first step used it up


def test_config_files_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: internimage_s\ntrain:\n  lr: 3.0e-4\n  epochs: 2\n")
    cfg = load_config(ImageClsConfig, path,
                      ["train.lr=1e-3", "model_args.depths=[1, 1, 2, 1]", "train_crop_scale=[0.5, 1]"])
    assert cfg.model == "internimage_s" and cfg.train.epochs == 2 and cfg.train.lr == 1e-3
    assert cfg.model_args == {"depths": [1, 1, 2, 1]} and cfg.train_crop_scale == (0.5, 1)
    nested = apply_overrides(cfg, ["model_args.backbone.channels=16"])  # a model_args key path is created
    assert nested.model_args == {"depths": [1, 1, 2, 1], "backbone": {"channels": 16}}
    merged = apply_overrides(cfg, ["model_args={channels: 16}"])  # a mapping merges, as a --config file's does
    assert merged.model_args == {"depths": [1, 1, 2, 1], "channels": 16}
    assert apply_overrides(cfg, ["model_args=null", "model_args={channels: 16}"]).model_args == {"channels": 16}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lrr'\]"):
        apply_overrides(cfg, ["train.lrr=1"])
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(cfg, ["train.lr"])
    with pytest.raises(ValueError, match="train.lr: expected number"):
        apply_overrides(cfg, ["train.lr=fast"])
    with pytest.raises(ValueError, match="train.amp: expected 'none' or 'bf16'"):
        apply_overrides(cfg, ["train.amp=fp8"])


def test_set_epochs_wins_over_a_config_step_count(tmp_path, monkeypatch):
    """`--set train.epochs=N` on a recipe or config that counts steps trains N epochs (the config's max_steps
    would otherwise end the run first, silently)."""
    seen = {}

    class Recorder:
        def __init__(self, task, cfg, config_to_save=None):
            seen["train"] = cfg

        def fit(self):
            return {}
    monkeypatch.setattr("intern2.engine.Trainer", Recorder)
    (tmp_path / "cfg.yaml").write_text("train: {max_steps: 5}\n")
    base = ["train", "image-cls", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]
    assert cli.main(base + ["--set", "train.epochs=2"]) == 0
    assert seen["train"].epochs == 2 and seen["train"].max_steps is None
    assert cli.main(base + ["--set", "train={epochs: 3}"]) == 0  # also inside a mapping
    assert seen["train"].epochs == 3 and seen["train"].max_steps is None
    assert cli.main(base) == 0 and seen["train"].max_steps == 5
    # The --config file's epochs win over the recipe's step count too (unless the file also counts steps).
    recipe = ["train", "--recipe", "shapes-segment", "--out", str(tmp_path / "run2"), "--config"]
    (tmp_path / "epochs.yaml").write_text("train: {epochs: 1}\n")
    assert cli.main(recipe + [str(tmp_path / "epochs.yaml")]) == 0
    assert seen["train"].epochs == 1 and seen["train"].max_steps is None
    (tmp_path / "both.yaml").write_text("train: {epochs: 1, max_steps: 7}\n")
    assert cli.main(recipe + [str(tmp_path / "both.yaml")]) == 0 and seen["train"].max_steps == 7
    assert cli.main(recipe + [str(tmp_path / "epochs.yaml"), "--set", "train.max_steps=9"]) == 0
    assert seen["train"].max_steps == 9


def test_evaluating_more_often_trains_the_same_weights(tmp_path):
    """Evaluation never draws from the training's random streams, so eval_every (which a resume may change) does
    not change what is trained."""
    often = _cfg(tmp_path / "often", max_steps=3, eval_every=1)
    Trainer(ImageClassificationTask(often), often.train).fit()
    once = _cfg(tmp_path / "once", max_steps=3)
    Trainer(ImageClassificationTask(once), once.train).fit()
    want, got = _weights(tmp_path / "once"), _weights(tmp_path / "often")
    assert all(torch.equal(got[key], want[key]) for key in want)


def test_a_trained_model_does_not_carry_the_published_metrics(tmp_path):
    """Fine-tuned from a tag at the same class count, the saved model is not the tag's weights: their metrics
    and label descriptions are dropped, also once the folder is loaded back (the tag's record supplied them
    again); the tag's lineage (architecture, tag, Hub repo) stays."""
    from intern2 import create_model, from_pretrained, save_pretrained
    from intern2.weights import trained_cfg
    model = create_model("internimage_t.in1k", **TINY)
    published = model.pretrained_cfg
    assert published["metrics"] and published["hf_hub_filename"]
    cfg = trained_cfg(published, {"crop_pct": 1.0})
    assert "metrics" not in cfg and "label_descriptions" not in cfg and cfg["file"] is None
    assert (cfg["tag"], cfg["hf_hub_id"], cfg["crop_pct"]) == ("in1k", published["hf_hub_id"], 1.0)
    model.pretrained_cfg = cfg
    save_pretrained(model, tmp_path / "trained")
    loaded = from_pretrained(tmp_path / "trained").pretrained_cfg
    assert "metrics" not in loaded and (loaded["tag"], loaded["num_classes"]) == ("in1k", 1000)
    save_pretrained(create_model("internimage_t.in1k", **TINY), tmp_path / "published")  # the tag's own weights
    assert from_pretrained(tmp_path / "published").pretrained_cfg["metrics"] == published["metrics"]
