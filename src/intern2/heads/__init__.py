"""Task heads on top of backbones: UperNet (semantic segmentation), Mask R-CNN glue (detection)."""
