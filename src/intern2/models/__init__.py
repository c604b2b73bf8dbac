"""Model families. Importing this package registers every family with the registry."""
from . import internimage, upernet  # noqa: F401
