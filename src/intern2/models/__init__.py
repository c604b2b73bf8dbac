"""Model families. Importing this package registers every family with the registry."""
from . import internimage, mask_rcnn, upernet  # noqa: F401
