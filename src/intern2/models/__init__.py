"""Model families. Importing this package registers every family with the registry."""
from . import actionformer, dino, internimage, mask_rcnn, translator, upernet, video_vit, videotext  # noqa: F401
