"""Operators: DCNv3 and multi-scale deformable attention (functional cores and modules)."""
from .dcnv3 import IMPLS, DCNv3Geometry, dcnv3, dcnv3_decompositions, dcnv3_reference
from .dcnv3_module import DCNv3
from .msda import ms_deform_attn, ms_deform_attn_reference
from .msda_module import MultiScaleDeformableAttention

__all__ = ["IMPLS", "DCNv3", "DCNv3Geometry", "MultiScaleDeformableAttention", "dcnv3", "dcnv3_decompositions",
           "dcnv3_reference", "ms_deform_attn", "ms_deform_attn_reference"]
