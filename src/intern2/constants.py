"""Normalisation constants shared by the models, data transforms and weights metadata."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # mmcv's [123.675, 116.28, 103.53] / 255
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
