"""InternVideo-MM dual encoder: shapes, gradients, InfoNCE (known values, symmetry, DDP gather), causal text
tower, end-of-text pooling, the official checkpoint layout and save/load round trips; the BPE tokenizer."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import intern2
from intern2.checkpoint import load_checkpoint
from intern2.models.videotext import VideoTextModel, clip_contrastive_loss, official_state_dict

torch.set_num_threads(1)


def _model(**kwargs) -> VideoTextModel:
    torch.manual_seed(0)
    return intern2.create_model("internvideo_mm_tiny", **kwargs).eval()


def _perturb(model: torch.nn.Module) -> None:
    """Move every parameter off its initial value: the official zero-initialised extractor projections would
    otherwise block the gradient to the layers before them at step 0."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)


def _inputs(batch: int = 2, length: int = 32):
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(batch, 3, 8, 32, 32, generator=generator)
    text = torch.randint(1, 1000, (batch, length), generator=generator)
    text[:, 0], text[:, 5:] = 1022, 0
    text[:, 5] = 1023  # end-of-text: the largest id
    return video, text


@pytest.mark.parametrize("vision", ["clip", "videomae"])
def test_shapes_and_normalised_features(vision):
    model = _model(vision=vision)
    video, text = _inputs(3)
    v, t, scale = model(video, text)
    assert v.shape == t.shape == (3, 64)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.encode_video(video).shape == (3, 64)


@pytest.mark.parametrize("vision", ["clip", "videomae"])
def test_gradients_reach_every_parameter(vision):
    model = _model(vision=vision).train()
    _perturb(model)
    video, text = _inputs(3)
    v, t, scale = model(video, text)
    loss, _ = clip_contrastive_loss(v, t, scale)
    loss.backward()
    # Every trainable parameter gets a gradient from the contrastive loss alone (DDP needs no unused ones); the
    # masked-language-modelling embedding is loaded, not trained.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and not (p.grad is not None and
                                                                                  p.grad.abs().sum() > 0)]
    assert not missing, missing
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["text_mask_embedding"]
    masked = torch.zeros_like(text, dtype=torch.bool)
    masked[:, 2] = True
    with torch.no_grad():
        assert not torch.allclose(model.encode_text(text, masked_indices=masked), model.encode_text(text))


def test_infonce_known_value_and_symmetry():
    video = torch.eye(3)
    text = torch.eye(3)
    loss, scalars = clip_contrastive_loss(video, text, torch.tensor(2.0))
    # Each row: logits (2, 0, 0) -> -log(e^2 / (e^2 + 2)).
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert scalars["loss_v2t"] == pytest.approx(scalars["loss_t2v"])
    generator = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    b = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    ab, s_ab = clip_contrastive_loss(a, b, torch.tensor(5.0))
    ba, s_ba = clip_contrastive_loss(b, a, torch.tensor(5.0))
    assert ab.item() == pytest.approx(ba.item(), rel=1e-6)
    assert s_ab["loss_v2t"] == pytest.approx(s_ba["loss_t2v"], rel=1e-6)
    logits = 5.0 * a @ b.t()
    reference = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5))) / 2
    assert ab.item() == pytest.approx(reference.item(), rel=1e-6)


def test_infonce_gathered_over_two_ranks_equals_one_process(tmp_path):
    script = Path(__file__).with_name("dist_infonce.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    generator = torch.Generator().manual_seed(0)
    video = F.normalize(torch.randn(8, 16, generator=generator), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(8, 16, generator=generator), dim=-1).requires_grad_()
    loss, _ = clip_contrastive_loss(video, text, torch.tensor(10.0))
    loss.backward()
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    # DDP averages over ranks: the mean of the rank losses/gradients is the one-process global-batch value.
    assert (ranks[0]["loss"] + ranks[1]["loss"]).item() / 2 == pytest.approx(loss.item(), rel=1e-5)
    for name, full in (("video_grad", video.grad), ("text_grad", text.grad)):
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]) / 2, full, atol=1e-6, rtol=1e-4)


def test_text_tower_is_causal_and_pools_at_end_of_text():
    model = _model()
    _perturb(model)
    _, text = _inputs(1)
    with torch.no_grad():
        hidden = {}
        model.ln_final.register_forward_hook(lambda m, i, o: hidden.__setitem__("x", o))
        before = model.encode_text(text)
        tokens_before = hidden["x"].clone()
        changed = text.clone()
        changed[0, 7] = 17  # after the end-of-text token
        after = model.encode_text(changed)
        torch.testing.assert_close(hidden["x"][:, :7], tokens_before[:, :7])
        assert not torch.allclose(hidden["x"][:, 7], tokens_before[:, 7])
        torch.testing.assert_close(after, before)  # padding after the end-of-text token does not matter
        torch.testing.assert_close(before, tokens_before[:, 5] @ model.text_projection)
        changed[0, 3] = 18  # before it: the pooled feature changes
        assert not torch.allclose(model.encode_text(changed), before)


def test_bad_inputs_are_named():
    model = _model()
    video, text = _inputs(1)
    with pytest.raises(ValueError, match="token ids must lie"):
        model.encode_text(text + 5000)
    with pytest.raises(ValueError, match="expected integer token ids"):
        model.encode_text(text.float())
    with pytest.raises(ValueError, match=r"expected \(B, 3, T, 32, 32\)"):
        model.encode_video(video[..., :16, :16])
    with pytest.raises(ValueError, match="vision"):
        VideoTextModel(vision="resnet")


def test_official_layout_loads_every_key_and_matches():
    source = _model()
    _perturb(source)
    official = official_state_dict(source)
    assert {"clip.visual_proj", "clip.visual_ln_post.weight", "clip.visual.conv1.weight",
            "clip.visual.positional_embedding", "clip.visual.transformer.resblocks.0.attn.in_proj_weight",
            "clip.visual.transformer.dec.0.attn.in_proj_weight", "clip.visual.transformer.dpe.0.weight",
            "clip.visual.transformer.temporal_cls_token", "clip.visual.transformer.balance",
            "clip.transformer.resblocks.0.attn.in_proj_weight", "clip.token_embedding.weight",
            "clip.text_projection", "clip.logit_scale"} <= set(official)
    assert official["clip.visual.conv1.weight"].shape == (64, 3, 1, 8, 8)
    assert official["clip.visual_proj"].shape == (64, 64)
    target = _model()
    consumed = set(target.checkpoint_filter(official))
    assert consumed == set(target.state_dict())  # every official key is used, every model key is filled
    result = load_checkpoint(target, {"state_dict": official})
    assert not result.missing_keys and not result.unexpected_keys
    video, text = _inputs(2)
    with torch.no_grad():
        for got, want in zip(target(video, text), source(video, text)):
            assert torch.equal(got, want)


def test_save_pretrained_round_trip(tmp_path):
    model = _model(vision="videomae")
    _perturb(model)
    intern2.save_pretrained(model, tmp_path)
    loaded = intern2.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config and loaded.pretrained_cfg["architecture"] == "internvideo_mm_tiny"
    video, text = _inputs(2)
    with torch.no_grad():
        for got, want in zip(loaded(video, text), model(video, text)):
            assert torch.equal(got, want)


def test_l14_preset_matches_the_official_shapes():
    with torch.device("meta"):
        model = intern2.create_model("internvideo_mm_l14")
    state = model.state_dict()
    assert state["visual.conv1.weight"].shape == (1024, 3, 1, 14, 14)
    assert state["visual.positional_embedding"].shape == (257, 1024)
    assert state["visual.proj"].shape == (1024, 768)
    assert state["token_embedding.weight"].shape == (49408, 768)
    assert state["positional_embedding"].shape == (77, 768)
    assert model.visual.transformer.return_list == (20, 21, 22, 23)
    assert len([k for k in state if k.startswith("transformer.resblocks.") and k.endswith("in_proj_weight")]) == 12


# ------------------------------------------------------------------------------------------------ tokenizer
def test_bpe_tokenizer_layout_and_round_trip(tmp_path):
    pytest.importorskip("tokenizers")
    from intern2.text.bpe import BPETokenizer
    captions = ["a red circle moves to the right near a blue square", "a green star turns clockwise",
                "a Yellow ring fades in"] * 3
    tokenizer = BPETokenizer.train(captions, vocab_size=400, context_length=10)
    assert tokenizer.eot_id == tokenizer.vocab_size - 1 and tokenizer.sot_id == tokenizer.vocab_size - 2
    ids = tokenizer(["a yellow ring fades in", "a red circle moves to the right near a blue square"])
    assert ids.shape == (2, 10) and ids.dtype == torch.long
    assert (ids[:, 0] == tokenizer.sot_id).all()
    assert (ids.argmax(-1) == (ids == tokenizer.eot_id).int().argmax(-1)).all()
    assert ids[1, -1] == tokenizer.eot_id  # truncated, the end-of-text token kept
    assert ids[0, (ids[0] == tokenizer.eot_id).nonzero()[0, 0] + 1:].eq(0).all()  # padded with 0
    assert tokenizer.decode(ids[0].tolist()) == "a yellow ring fades in"
    tokenizer.save(tmp_path)
    loaded = BPETokenizer.from_file(tmp_path)
    assert loaded.context_length == 10 and torch.equal(loaded(["a yellow ring fades in"]), ids[:1])
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        BPETokenizer.from_file(tmp_path / "missing")
    with pytest.raises(ValueError, match="no non-empty texts"):
        BPETokenizer.train(["", "  "])
