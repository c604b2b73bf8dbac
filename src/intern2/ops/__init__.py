"""Operators: DCNv3 (functional core and module)."""
from .dcnv3 import IMPLS, DCNv3Geometry, dcnv3, dcnv3_decompositions, dcnv3_reference
from .dcnv3_module import DCNv3

__all__ = ["IMPLS", "DCNv3", "DCNv3Geometry", "dcnv3", "dcnv3_decompositions", "dcnv3_reference"]
