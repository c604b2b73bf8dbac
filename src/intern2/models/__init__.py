"""Model families. Importing this package registers every family with the registry."""
from . import (actionformer, dino, internimage, mask2former, mask_rcnn, translator, upernet, video_vit,  # noqa: F401
               videotext)
