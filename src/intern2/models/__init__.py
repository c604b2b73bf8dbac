"""Model families. Importing this package registers every family with the registry."""
from . import internimage  # noqa: F401
