"""ActionFormer: single-stage temporal action localization over a sequence of snippet features.

The model InternVideo's temporal action localization runs on its video features (THUMOS14 71.58 average mAP,
ActivityNet 39.00; ``InternVideo1/Downstream/Temporal-Action-Localization``, ActionFormer's ``LocPointTransformer``):

* backbone: masked 1-D convolutions embed the (B, C, T) features, transformer blocks with convolutional
  (depthwise conv + LayerNorm) query/key/value projections and *local* window self-attention follow; each branch
  block halves the length, so the backbone returns a temporal pyramid of ``arch[2] + 1`` levels;
* neck: a LayerNorm per level (ActionFormer's identity FPN);
* heads shared by the levels: per-point class logits (sigmoid, focal loss) and the distances (left, right) from
  the point to the action's boundaries in units of the level stride (ReLU after a learnable per-level scale,
  distance-IoU loss), trained on the points of each level whose regression range holds the action and that lie
  within ``center_sample_radius`` strides of its centre;
* inference: per level, candidates above ``pre_nms_thresh`` (top ``pre_nms_topk``) longer than
  ``duration_thresh`` grid steps, Gaussian soft-NMS per class in float32 (:func:`batched_soft_nms`), the
  ``max_seg_num`` best kept, and the feature grid converted to seconds (:func:`grid_to_seconds`).

Module and parameter names are the official ones, so the official checkpoints (``state_dict`` or
``state_dict_ema``, with DataParallel's ``module.`` prefix) load strictly. Positions beyond a video's valid length
are masked everywhere: a video's outputs do not depend on how far it is padded (apart from the absolute position
embedding of the ActivityNet configuration, which is resampled to the padded length at inference, as officially).
Only the official configuration's choices are implemented: the conv + transformer backbone, the identity neck,
multi-class soft-NMS (the InternVideo configs' ``nms_method: soft``, ``multiclass_nms: true``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_variant

__all__ = ["ActionFormer", "ACTIONFORMER_VARIANTS", "soft_nms_1d", "batched_soft_nms", "grid_to_seconds",
           "sigmoid_focal_loss", "diou_loss_1d"]

Masked = Tuple[torch.Tensor, torch.Tensor]


class MaskedConv1D(nn.Module):
    """A same-padded Conv1d whose output is zeroed beyond the valid length; a stride-s conv downsamples the mask by
    nearest-neighbour sampling (the input length must be a multiple of s)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = True):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups,
                              bias=bias)
        if bias:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Masked:
        out = self.conv(x)
        if self.stride > 1:
            mask = F.interpolate(mask.to(x.dtype), size=out.shape[-1], mode="nearest").bool()
        return out * mask.to(out.dtype), mask


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of (B, C, T), with ActionFormer's (1, C, 1) affine parameters."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + self.eps) * self.weight + self.bias


class Scale(nn.Module):
    """A learnable scalar multiplier (one per pyramid level of the regression head)."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class AffineDropPath(nn.Module):
    """Per-channel scale (initialised to 1e-4) followed by per-sample stochastic depth."""

    def __init__(self, channels: int, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale = nn.Parameter(torch.full((1, channels, 1), 1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale * x
        if not self.training or self.drop_prob == 0:
            return x
        keep = 1 - self.drop_prob
        return x / keep * torch.rand((x.shape[0], 1, 1), dtype=x.dtype, device=x.device).add_(keep).floor_()


class MaskedMHCA(nn.Module):
    """Multi-head self-attention with depthwise-conv + LayerNorm query/key/value projections (a stride-2 conv when
    the block downsamples). ``window_size`` > 1: each query attends to the keys within ``window_size // 2`` steps
    (ActionFormer's local attention, with an optional learned relative bias per head and offset); otherwise to all
    valid keys."""

    def __init__(self, dim: int, num_heads: int, stride: int = 1, window_size: int = -1, use_rel_pe: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.window_size = window_size
        kernel = stride + 1 if stride > 1 else 3
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_conv", MaskedConv1D(dim, dim, kernel, stride, groups=dim, bias=False))
            setattr(self, f"{name}_norm", ChannelLayerNorm(dim))
        self.key = nn.Conv1d(dim, dim, 1)
        self.query = nn.Conv1d(dim, dim, 1)
        self.value = nn.Conv1d(dim, dim, 1)
        self.proj = nn.Conv1d(dim, dim, 1)
        if window_size > 1 and use_rel_pe:
            self.rel_pe = nn.Parameter(torch.zeros(1, 1, num_heads, window_size))
            nn.init.trunc_normal_(self.rel_pe, std=(2.0 / dim) ** 0.5)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, length = x.shape
        return x.view(batch, self.num_heads, self.head_dim, length).transpose(2, 3)  # (B, heads, T, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Masked:
        q, q_mask = self.query_conv(x, mask)
        k, kv_mask = self.key_conv(x, mask)
        v, _ = self.value_conv(x, mask)
        q = self._heads(self.query(self.query_norm(q)))
        k = self._heads(self.key(self.key_norm(k)))
        v = self._heads(self.value(self.value_norm(v)))
        if self.window_size > 1:
            out = self._local(q * self.scale, k, v, kv_mask[:, 0])
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)
            scores = scores.masked_fill(~kv_mask[:, :, None, :], float("-inf"))
            out = scores.softmax(-1) @ (v * kv_mask[:, :, :, None].to(v.dtype))
        batch, _, length, _ = out.shape
        out = out.transpose(2, 3).reshape(batch, -1, length)
        return self.proj(out) * q_mask.to(out.dtype), q_mask

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor) -> torch.Tensor:
        """Banded attention computed one offset at a time, so no (T, window, D) tensor is built. As officially,
        keys outside the sequence are excluded (-inf) and padded keys inside it get -1e4: the centre key keeps
        every row finite, so padded rows (zeroed afterwards) have finite gradients."""
        half = self.window_size // 2
        length = k.shape[2]
        k_pad, v_pad = (F.pad(t, (0, 0, half, half)) for t in (k, v))
        valid = F.pad(kv_mask, (half, half))
        inside = F.pad(torch.ones_like(kv_mask), (half, half))
        scores = torch.stack([(q * k_pad[:, :, o:o + length]).sum(-1) for o in range(2 * half + 1)], -1)
        if hasattr(self, "rel_pe"):
            scores = scores + self.rel_pe.permute(0, 2, 1, 3)
        window_valid = torch.stack([valid[:, o:o + length] for o in range(2 * half + 1)], -1)[:, None]
        window_inside = torch.stack([inside[:, o:o + length] for o in range(2 * half + 1)], -1)[:, None]
        scores = (scores - 1e4 * (~window_valid).to(scores.dtype)).masked_fill(~window_inside, float("-inf"))
        probs = scores.softmax(-1).masked_fill(~kv_mask[:, None, :, None], 0.0)
        return sum(probs[..., o, None] * v_pad[:, :, o:o + length] for o in range(2 * half + 1))


class TransformerBlock(nn.Module):
    """Pre-LN block: masked (local) attention + 4x MLP with affine drop-path; a stride-2 block max-pools its
    shortcut and halves the sequence."""

    def __init__(self, dim: int, num_heads: int, stride: int = 1, window_size: int = -1, dropout: float = 0.0,
                 drop_path: float = 0.0, use_rel_pe: bool = False):
        super().__init__()
        self.ln1 = ChannelLayerNorm(dim)
        self.ln2 = ChannelLayerNorm(dim)
        self.attn = MaskedMHCA(dim, num_heads, stride, window_size, use_rel_pe)
        self.pool_skip = nn.MaxPool1d(stride + 1, stride, (stride + 1) // 2) if stride > 1 else nn.Identity()
        self.mlp = nn.Sequential(nn.Conv1d(dim, 4 * dim, 1), nn.GELU(), nn.Dropout(dropout),
                                 nn.Conv1d(4 * dim, dim, 1), nn.Dropout(dropout))
        if drop_path > 0:
            self.drop_path_attn = AffineDropPath(dim, drop_path)
            self.drop_path_mlp = AffineDropPath(dim, drop_path)
        else:
            self.drop_path_attn = self.drop_path_mlp = nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Masked:
        out, mask = self.attn(self.ln1(x), mask)
        valid = mask.to(out.dtype)
        out = self.pool_skip(x) * valid + self.drop_path_attn(out)
        return out + self.drop_path_mlp(self.mlp(self.ln2(out)) * valid), mask


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """The (1, dim, length) sine/cosine position table (float32, as the official model builds it)."""
    position = np.arange(length)[:, None] / np.power(10000, 2 * (np.arange(dim) // 2) / dim)[None]
    position[:, 0::2], position[:, 1::2] = np.sin(position[:, 0::2]), np.cos(position[:, 1::2])
    return torch.tensor(position, dtype=torch.float32).T[None]


class ConvTransformerBackbone(nn.Module):
    """``arch = (convs, stem blocks, branch blocks)``: embedding convs, full-length blocks, then stride-2 blocks;
    returns the pyramid (the stem's output and each branch block's)."""

    def __init__(self, input_dim: int, dim: int, num_heads: int, kernel_size: int, max_len: int,
                 arch: Sequence[int], window_sizes: Sequence[int], with_ln: bool, dropout: float, drop_path: float,
                 use_abs_pe: bool, use_rel_pe: bool):
        super().__init__()
        self.max_len = max_len
        self.embd = nn.ModuleList(MaskedConv1D(input_dim if i == 0 else dim, dim, kernel_size, bias=not with_ln)
                                  for i in range(arch[0]))
        self.embd_norm = nn.ModuleList(ChannelLayerNorm(dim) if with_ln else nn.Identity() for _ in range(arch[0]))
        if use_abs_pe:
            self.register_buffer("pos_embd", sinusoid_table(max_len, dim) / dim ** 0.5, persistent=False)
        block = dict(dropout=dropout, drop_path=drop_path, use_rel_pe=use_rel_pe)
        self.stem = nn.ModuleList(TransformerBlock(dim, num_heads, 1, window_sizes[0], **block) for _ in range(arch[1]))
        self.branch = nn.ModuleList(TransformerBlock(dim, num_heads, 2, window_sizes[1 + i], **block)
                                    for i in range(arch[2]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        for conv, norm in zip(self.embd, self.embd_norm):
            x, mask = conv(x, mask)
            x = F.relu(norm(x))
        if hasattr(self, "pos_embd"):
            length = x.shape[-1]
            if self.training and length > self.max_len:
                raise ValueError(f"a training sequence of {length} steps is longer than max_seq_len {self.max_len}")
            table = self.pos_embd.to(x.dtype)
            if not self.training and length >= self.max_len:  # longer test videos: the table resampled
                table = F.interpolate(table, length, mode="linear", align_corners=False)
            x = x + table[:, :, :length] * mask.to(x.dtype)
        for block in self.stem:
            x, mask = block(x, mask)
        feats, masks = [x], [mask]
        for block in self.branch:
            x, mask = block(x, mask)
            feats.append(x)
            masks.append(mask)
        return feats, masks


class IdentityNeck(nn.Module):
    """ActionFormer's 'identity' FPN: a LayerNorm per pyramid level."""

    def __init__(self, dim: int, levels: int, with_ln: bool):
        super().__init__()
        self.fpn_norms = nn.ModuleList(ChannelLayerNorm(dim) if with_ln else nn.Identity() for _ in range(levels))

    def forward(self, feats: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]):
        return [norm(x) for norm, x in zip(self.fpn_norms, feats)], list(masks)


class _Head(nn.Module):
    """``layers - 1`` masked convs (+ LayerNorm) + ReLU shared by the levels; the subclass adds its output conv."""

    def __init__(self, dim: int, feat_dim: int, layers: int, kernel_size: int, with_ln: bool):
        super().__init__()
        self.head = nn.ModuleList(MaskedConv1D(dim if i == 0 else feat_dim, feat_dim, kernel_size, bias=not with_ln)
                                  for i in range(layers - 1))
        self.norm = nn.ModuleList(ChannelLayerNorm(feat_dim) if with_ln else nn.Identity()
                                  for _ in range(layers - 1))

    def trunk(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.head, self.norm):
            x = F.relu(norm(conv(x, mask)[0]))
        return x


class ClassificationHead(_Head):
    def __init__(self, dim: int, feat_dim: int, num_classes: int, layers: int, kernel_size: int, with_ln: bool,
                 prior_prob: float):
        super().__init__(dim, feat_dim, layers, kernel_size, with_ln)
        self.cls_head = MaskedConv1D(feat_dim, num_classes, kernel_size)
        if prior_prob > 0:  # start every point at the prior probability (focal loss stability)
            nn.init.constant_(self.cls_head.conv.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [self.cls_head(self.trunk(x, m), m)[0] for x, m in zip(feats, masks)]


class RegressionHead(_Head):
    def __init__(self, dim: int, feat_dim: int, levels: int, layers: int, kernel_size: int, with_ln: bool):
        super().__init__(dim, feat_dim, layers, kernel_size, with_ln)
        self.scale = nn.ModuleList(Scale() for _ in range(levels))
        self.offset_head = MaskedConv1D(feat_dim, 2, kernel_size)

    def forward(self, feats: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [F.relu(scale(self.offset_head(self.trunk(x, m), m)[0]))
                for scale, x, m in zip(self.scale, feats, masks)]


# --------------------------------------------------------------------------------------------------- losses
def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """RetinaNet's focal loss, summed (float32 at least)."""
    logits, targets = logits.float(), targets.float()
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** gamma).sum()


def diou_loss_1d(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Distance-IoU loss of (N, 2) (left, right) distances from shared centre points, summed."""
    pred, target = pred.float(), target.float()
    inter = torch.min(pred[:, 0], target[:, 0]) + torch.min(pred[:, 1], target[:, 1])
    union = pred.sum(1) + target.sum(1) - inter
    enclosing = torch.max(pred[:, 0], target[:, 0]) + torch.max(pred[:, 1], target[:, 1])
    centre_gap = 0.5 * (pred[:, 1] - pred[:, 0] - target[:, 1] + target[:, 0])
    return (1 - inter / union.clamp(min=eps) + (centre_gap / enclosing.clamp(min=eps)) ** 2).sum()


# ---------------------------------------------------------------------------------------------- post-process
def soft_nms_1d(segments: np.ndarray, scores: np.ndarray, sigma: float = 0.5, min_score: float = 1e-3
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian soft-NMS of one class's (N, 2) segments, in float32 as ActionFormer's CPU kernel computes it: the
    highest-scoring segment is taken (the first of equal ones), every remaining score is multiplied by
    exp(-IoU^2 / sigma) and a segment falling below ``min_score`` is replaced by the last one; repeat. Returns the
    kept (segments, scores, indices into the input) in the order taken."""
    seg = np.array(segments, dtype=np.float32).reshape(-1, 2)
    score = np.array(scores, dtype=np.float32).reshape(-1)
    index = np.arange(len(score))
    area = seg[:, 1] - seg[:, 0] + np.float32(1e-6)  # the kernel's epsilon: zero-length segments divide safely
    sigma32, floor = np.float32(sigma), np.float32(min_score)
    count = len(score)
    for i in range(count):
        if i >= count:
            break
        best = i + int(np.argmax(score[i:count]))
        for array in (seg, score, index, area):  # the taken segment moves to position i
            array[[i, best]] = array[[best, i]]
        rest = slice(i + 1, count)
        inter = np.maximum(np.float32(0), np.minimum(seg[i, 1], seg[rest, 1]) - np.maximum(seg[i, 0], seg[rest, 0]))
        overlap = inter / (area[i] + area[rest] - inter)
        score[rest] *= np.exp(-(overlap * overlap) / sigma32)
        position = i + 1
        while True:  # each segment below the floor is replaced by the current last one, which is checked next
            low = np.nonzero(score[position:count] < floor)[0]
            if not low.size:
                break
            position += int(low[0])
            count -= 1
            for array in (seg, score, index, area):
                array[position] = array[count]
    return seg[:count].copy(), score[:count].copy(), index[:count].copy()


def batched_soft_nms(segments: np.ndarray, scores: np.ndarray, labels: np.ndarray, sigma: float = 0.5,
                     min_score: float = 1e-3, max_segments: int = 200) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft-NMS within each class (ActionFormer's multiclass NMS), then the ``max_segments`` best overall, by
    descending score (equal scores in class order)."""
    labels = np.asarray(labels)
    kept = [soft_nms_1d(np.asarray(segments)[labels == c], np.asarray(scores)[labels == c], sigma, min_score)
            + (np.full(int((labels == c).sum()), c),) for c in np.unique(labels)]
    if not kept:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    seg = np.concatenate([k[0] for k in kept])
    score = np.concatenate([k[1] for k in kept])
    label = np.concatenate([k[3][:len(k[1])] for k in kept])
    order = np.argsort(-score, kind="stable")[:max_segments]
    return seg[order], score[order], label[order]


def grid_to_seconds(segments: np.ndarray, fps: float, duration: float, feat_stride: int,
                    feat_num_frames: int) -> np.ndarray:
    """Segments on the feature grid -> seconds: a feature at grid position t covers the ``feat_num_frames`` frames
    from ``t * feat_stride``, so its centre is (t * stride + frames / 2) / fps; clipped to [0, duration]."""
    seconds = (np.asarray(segments, dtype=np.float32) * np.float32(feat_stride) + np.float32(0.5 * feat_num_frames)
               ) / np.float32(fps)
    # A duration past float32's range clips nothing (and must not overflow to inf with a warning).
    return np.clip(seconds, np.float32(0), np.float32(min(duration, float(np.finfo(np.float32).max))))


def seconds_to_grid(segments: np.ndarray, fps: float, feat_stride: int, feat_num_frames: int) -> np.ndarray:
    """Seconds -> feature grid, the inverse of :func:`grid_to_seconds` before clipping (ActionFormer's datasets)."""
    return np.asarray(segments, dtype=np.float64) * fps / feat_stride - 0.5 * feat_num_frames / feat_stride


# ------------------------------------------------------------------------------------------------------ model
class ActionFormer(nn.Module):
    """ActionFormer (``LocPointTransformer``) with the official module names.

    ``forward(feats, mask)``: features (B, input_dim, T) and their validity (B, 1, T) bool -> per pyramid level the
    class logits (B, num_classes, T_l), the boundary distances (B, 2, T_l) in strides and the masks (B, 1, T_l).
    :meth:`loss` trains from ground-truth segments on the feature grid; :meth:`detect` localizes in one video.
    """

    checkpoint_keys = ("state_dict_ema", "state_dict")  # official training checkpoints: evaluated with the EMA

    def __init__(self, input_dim: int = 1408, num_classes: int = 20, max_seq_len: int = 2304,
                 arch: Sequence[int] = (2, 2, 5), embd_dim: int = 512, fpn_dim: int = 512, head_dim: int = 512,
                 n_head: int = 4, n_mha_win_size: Union[int, Sequence[int]] = 19, scale_factor: int = 2,
                 embd_kernel_size: int = 3, head_kernel_size: int = 3, head_num_layers: int = 3,
                 with_ln: bool = True, use_abs_pe: bool = False, use_rel_pe: bool = False,
                 regression_range: Sequence[Sequence[float]] = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64),
                                                                (64, 10000)),
                 dropout: float = 0.0, droppath: float = 0.1, cls_prior_prob: float = 0.01,
                 center_sample_radius: float = 1.5, loss_weight: float = 1.0, init_loss_norm: float = 100.0,
                 label_smoothing: float = 0.0, pre_nms_thresh: float = 0.001, pre_nms_topk: int = 2000,
                 nms_sigma: float = 0.5, min_score: float = 0.001, max_seg_num: int = 200,
                 duration_thresh: float = 0.05):
        super().__init__()
        levels = arch[2] + 1
        windows = [n_mha_win_size] * levels if isinstance(n_mha_win_size, int) else list(n_mha_win_size)
        if len(windows) != levels or len(regression_range) != levels:
            raise ValueError(f"ActionFormer: arch {tuple(arch)} has {levels} pyramid levels, but n_mha_win_size "
                             f"gives {len(windows)} and regression_range {len(regression_range)}")
        if scale_factor != 2:
            raise ValueError(f"ActionFormer: scale_factor {scale_factor}: the official blocks downsample by 2")
        self.config = dict(input_dim=input_dim, num_classes=num_classes, max_seq_len=max_seq_len, arch=list(arch),
                           embd_dim=embd_dim, fpn_dim=fpn_dim, head_dim=head_dim, n_head=n_head,
                           n_mha_win_size=windows, scale_factor=scale_factor, embd_kernel_size=embd_kernel_size,
                           head_kernel_size=head_kernel_size, head_num_layers=head_num_layers, with_ln=with_ln,
                           use_abs_pe=use_abs_pe, use_rel_pe=use_rel_pe,
                           regression_range=[list(r) for r in regression_range], dropout=dropout, droppath=droppath,
                           cls_prior_prob=cls_prior_prob, center_sample_radius=center_sample_radius,
                           loss_weight=loss_weight, init_loss_norm=init_loss_norm, label_smoothing=label_smoothing,
                           pre_nms_thresh=pre_nms_thresh, pre_nms_topk=pre_nms_topk, nms_sigma=nms_sigma,
                           min_score=min_score, max_seg_num=max_seg_num, duration_thresh=duration_thresh)
        self.num_classes = num_classes
        self.input_dim = input_dim
        self.max_seq_len = max_seq_len
        self.fpn_strides = [scale_factor ** i for i in range(levels)]
        # A padded length must split evenly into every level's attention chunks (the official requirement).
        self.max_div_factor = max(s * (w // 2) * 2 if w > 1 else s for s, w in zip(self.fpn_strides, windows))
        if max_seq_len % self.max_div_factor:
            raise ValueError(f"ActionFormer: max_seq_len {max_seq_len} must be a multiple of {self.max_div_factor} "
                             f"(the largest level stride x window)")
        self.backbone = ConvTransformerBackbone(input_dim, embd_dim, n_head, embd_kernel_size, max_seq_len, arch,
                                                windows, with_ln, dropout, droppath, use_abs_pe, use_rel_pe)
        self.neck = IdentityNeck(fpn_dim, levels, with_ln)
        self.cls_head = ClassificationHead(fpn_dim, head_dim, num_classes, head_num_layers, head_kernel_size, with_ln,
                                           cls_prior_prob)
        self.reg_head = RegressionHead(fpn_dim, head_dim, levels, head_num_layers, head_kernel_size, with_ln)
        for module in self.backbone.modules():  # the official backbone starts its conv biases at zero
            if isinstance(module, nn.Conv1d) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # The EMA of the positive-point count that normalises the losses: a buffer, so a resumed run continues it.
        self.register_buffer("loss_normalizer", torch.tensor(float(init_loss_norm), dtype=torch.float64))

    def export_config(self) -> Dict[str, Any]:
        return dict(self.config)

    @staticmethod
    def official_kwargs(model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """This class's arguments for the official ``make_meta_arch('LocPointTransformer', **model_kwargs)`` (its
        YAML's ``model`` section merged with the defaults, ``train_cfg`` and ``test_cfg`` inside); a choice this
        implementation does not have is a ValueError naming the key."""
        kw = dict(model_kwargs)
        train, test = dict(kw.pop("train_cfg", {})), dict(kw.pop("test_cfg", {}))
        required = {"backbone_type": "convTransformer", "fpn_type": "identity", "scale_factor": 2}
        required_test = {"nms_method": "soft", "multiclass_nms": True}
        for source, wanted in ((kw, required), (test, required_test)):
            for key, value in wanted.items():
                if source.get(key, value) != value:
                    raise ValueError(f"ActionFormer config: {key}={source[key]!r} is not implemented (only {value!r})")
        flags = {kw.pop(k, True) for k in ("embd_with_ln", "fpn_with_ln", "head_with_ln")}
        if len(flags) > 1:
            raise ValueError("ActionFormer config: embd_with_ln, fpn_with_ln and head_with_ln must agree")
        if kw.pop("fpn_start_level", 0) != 0 or train.get("head_empty_cls"):
            raise ValueError("ActionFormer config: fpn_start_level > 0 and head_empty_cls are not implemented")
        if train.get("center_sample", "radius") != "radius":
            raise ValueError("ActionFormer config: center_sample must be 'radius'")
        out = {"arch": kw.pop("backbone_arch"), "with_ln": flags.pop()}
        for key in ("backbone_type", "fpn_type", "max_buffer_len_factor"):
            kw.pop(key, None)
        out.update(kw)
        out.update({k: train[k] for k in ("center_sample_radius", "loss_weight", "cls_prior_prob", "init_loss_norm",
                                          "dropout", "droppath", "label_smoothing") if k in train})
        out.update({k: test[k] for k in ("pre_nms_thresh", "pre_nms_topk", "nms_sigma", "min_score", "max_seg_num",
                                         "duration_thresh") if k in test})
        return out

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Official checkpoints carry no loss normaliser (a Python float there): start it afresh."""
        if "loss_normalizer" not in state_dict:
            state_dict = {**state_dict, "loss_normalizer": self.loss_normalizer.detach().clone()}
        return state_dict

    # ------------------------------------------------------------------------------------------- network
    def forward(self, feats: torch.Tensor, mask: torch.Tensor
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        if feats.dim() != 3 or feats.shape[1] != self.input_dim:
            raise ValueError(f"ActionFormer: expected features (B, {self.input_dim}, T), got {tuple(feats.shape)}")
        if feats.shape[-1] % self.max_div_factor:
            raise ValueError(f"ActionFormer: the padded length {feats.shape[-1]} must be a multiple of "
                             f"{self.max_div_factor} (use pad_features)")
        pyramid, masks = self.neck(*self.backbone(feats, mask))
        return self.cls_head(pyramid, masks), self.reg_head(pyramid, masks), masks

    def padded_length(self, length: int) -> int:
        """The official padding: training batches and short test videos to ``max_seq_len``, longer test videos to
        the next multiple of the largest stride x window."""
        if length <= self.max_seq_len:
            return self.max_seq_len
        return -(-length // self.max_div_factor) * self.max_div_factor

    def pad_features(self, features: Sequence[torch.Tensor], length: Optional[int] = None) -> Masked:
        """(C, T_i) feature sequences -> zero-padded (B, C, length) batch and its (B, 1, length) validity mask
        (``length``: :meth:`padded_length` of the longest)."""
        lengths = [f.shape[-1] for f in features]
        length = length or self.padded_length(max(lengths))
        batch = features[0].new_zeros(len(features), features[0].shape[0], length)
        for row, feature in zip(batch, features):
            row[:, :feature.shape[-1]] = feature
        mask = torch.arange(length, device=batch.device)[None] < torch.tensor(lengths, device=batch.device)[:, None]
        return batch, mask[:, None]

    def points(self, lengths: Sequence[int], dtype: torch.dtype = torch.float32,
               device: Optional[torch.device] = None) -> List[torch.Tensor]:
        """Per level, the (T_l, 4) points: [position on the level-0 grid, regression low, regression high, stride]."""
        out = []
        for length, stride, (low, high) in zip(lengths, self.fpn_strides, self.config["regression_range"]):
            position = torch.arange(length, dtype=dtype, device=device) * stride
            columns = torch.tensor([low, high, stride], dtype=dtype, device=device).expand(length, 3)
            out.append(torch.cat([position[:, None], columns], 1))
        return out

    # ------------------------------------------------------------------------------------------- training
    @torch.no_grad()
    def assign_targets(self, points: torch.Tensor, segments: torch.Tensor, labels: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(P, 4) concatenated points and one video's (N, 2) grid segments / (N,) labels -> (P, K) class targets and
        (P, 2) boundary distances in strides. A point is positive for an action when it lies within
        ``center_sample_radius`` strides of its centre (and inside it) and its level's regression range holds the
        action's farther boundary; of several, the shortest action wins (all of equal length, within 1e-3, share
        the class targets)."""
        num_points = points.shape[0]
        if segments.shape[0] == 0:
            return points.new_zeros(num_points, self.num_classes), points.new_zeros(num_points, 2)
        position, low, high, stride = (points[:, i, None] for i in range(4))
        start, end = segments[None, :, 0], segments[None, :, 1]
        distances = torch.stack([position - start, end - position], -1)  # (P, N, 2)
        centre = 0.5 * (start + end)
        radius = stride * self.config["center_sample_radius"]
        inside = torch.min(position - torch.maximum(centre - radius, start),
                           torch.minimum(centre + radius, end) - position) > 0
        farthest = distances.max(-1).values
        in_range = (farthest >= low) & (farthest <= high)
        lengths = (end - start).expand(num_points, -1).masked_fill(~(inside & in_range), float("inf"))
        shortest, choice = lengths.min(1)
        chosen = ((lengths <= shortest[:, None] + 1e-3) & torch.isfinite(lengths)).to(points.dtype)
        cls_targets = (chosen @ F.one_hot(labels, self.num_classes).to(points.dtype)).clamp(0, 1)
        reg_targets = distances[torch.arange(num_points), choice] / stride
        return cls_targets, reg_targets

    def loss(self, cls_logits: Sequence[torch.Tensor], offsets: Sequence[torch.Tensor],
             masks: Sequence[torch.Tensor], segments: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
             ) -> Dict[str, torch.Tensor]:
        """Focal loss over every valid point + ``loss_weight`` x distance-IoU loss over the positive ones, both
        divided by the EMA (momentum 0.9) of the positive count; ``segments`` on the level-0 feature grid."""
        points = torch.cat(self.points([m.shape[-1] for m in masks], cls_logits[0].dtype, cls_logits[0].device))
        targets = [self.assign_targets(points, s.to(points), lab.to(points.device)) for s, lab in zip(segments, labels)]
        gt_cls = torch.stack([t[0] for t in targets])
        gt_offsets = torch.stack([t[1] for t in targets])
        valid = torch.cat([m[:, 0] for m in masks], 1)
        logits = torch.cat([x.transpose(1, 2) for x in cls_logits], 1)
        pred_offsets = torch.cat([x.transpose(1, 2) for x in offsets], 1)
        positive = (gt_cls.sum(-1) > 0) & valid
        num_pos = int(positive.sum())
        if self.training:
            self.loss_normalizer.mul_(0.9).add_(0.1 * max(num_pos, 1))
        normalizer = float(self.loss_normalizer)
        smoothing = self.config["label_smoothing"]
        target = gt_cls[valid] * (1 - smoothing) + smoothing / (self.num_classes + 1)
        cls_loss = sigmoid_focal_loss(logits[valid], target) / normalizer
        if num_pos:
            reg_loss = diou_loss_1d(pred_offsets[positive], gt_offsets[positive]) / normalizer
        else:
            reg_loss = pred_offsets.sum() * 0
        weight = self.config["loss_weight"]
        if weight <= 0:  # the official adaptive weight: classification / regression magnitude
            weight = float(cls_loss.detach()) / max(float(reg_loss.detach()), 0.01)
        return {"cls_loss": cls_loss, "reg_loss": reg_loss, "final_loss": cls_loss + weight * reg_loss,
                "num_pos": torch.tensor(float(num_pos))}

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def candidates(self, cls_logits: Sequence[torch.Tensor], offsets: Sequence[torch.Tensor],
                   masks: Sequence[torch.Tensor], index: int = 0
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Video ``index``'s pre-NMS candidates: (N, 2) grid segments, (N,) probabilities, (N,) labels."""
        cfg = self.config
        points = self.points([m.shape[-1] for m in masks], cls_logits[0].dtype, cls_logits[0].device)
        kept_segments, kept_scores, kept_labels = [], [], []
        for logits, offset, mask, point in zip(cls_logits, offsets, masks, points):
            prob = (logits[index].sigmoid() * mask[index].to(logits.dtype)).T.flatten()  # point-major, class-minor
            keep = torch.nonzero(prob > cfg["pre_nms_thresh"])[:, 0]
            prob, order = prob[keep].sort(descending=True)
            top = keep[order[:cfg["pre_nms_topk"]]]
            prob = prob[:cfg["pre_nms_topk"]]
            at = torch.div(top, self.num_classes, rounding_mode="floor")
            distance, position, stride = offset[index].T[at], point[at, 0], point[at, 3]
            segments = torch.stack([position - distance[:, 0] * stride, position + distance[:, 1] * stride], -1)
            long_enough = segments[:, 1] - segments[:, 0] > cfg["duration_thresh"]
            kept_segments.append(segments[long_enough])
            kept_scores.append(prob[long_enough])
            kept_labels.append(torch.fmod(top, self.num_classes)[long_enough])
        return torch.cat(kept_segments), torch.cat(kept_scores), torch.cat(kept_labels)

    def postprocess(self, segments: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, fps: float,
                    duration: float, feat_stride: int, feat_num_frames: int
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidates -> (M, 2) float32 seconds, (M,) float32 scores, (M,) int64 labels after soft-NMS."""
        cfg = self.config
        seg, score, label = batched_soft_nms(segments.cpu().numpy(), scores.cpu().numpy(), labels.cpu().numpy(),
                                             cfg["nms_sigma"], cfg["min_score"], cfg["max_seg_num"])
        return grid_to_seconds(seg, fps, duration, feat_stride, feat_num_frames), score, label.astype(np.int64)

    @torch.no_grad()
    def detect(self, features: torch.Tensor, fps: float, duration: float, feat_stride: int,
               feat_num_frames: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One video's (input_dim, T) features -> its detections (seconds, scores, labels), as the official
        inference (one video at a time, padded as :meth:`padded_length` says)."""
        param = next(self.parameters())
        feats, mask = self.pad_features([features.to(param)])
        cls_logits, offsets, masks = self(feats, mask)
        return self.postprocess(*self.candidates(cls_logits, offsets, masks), fps, duration, feat_stride,
                                feat_num_frames)


# name -> the official InternVideo configuration (its configs/thumos.yaml, configs/anet.yaml); tags in weights.py.
ACTIONFORMER_VARIANTS = {
    "actionformer_thumos14": dict(input_dim=1408, num_classes=20, max_seq_len=2304, n_mha_win_size=19,
                                  init_loss_norm=2000.0, pre_nms_topk=5000, min_score=0.01, max_seg_num=1000),
    "actionformer_activitynet": dict(input_dim=1280, num_classes=1, max_seq_len=768, embd_dim=256, fpn_dim=256,
                                     head_dim=256, n_mha_win_size=(25, 25, 25, 25, 25, -1), use_abs_pe=True,
                                     init_loss_norm=2000.0, pre_nms_topk=5000, min_score=0.01, max_seg_num=1000),
}


def _builder(defaults: Dict[str, Any]):
    return lambda kwargs: ActionFormer(**{**defaults, **kwargs})


for _name, _defaults in ACTIONFORMER_VARIANTS.items():
    register_variant(_name, _builder(_defaults), f"ActionFormer as InternVideo's {_name.split('_')[1]} config.")
