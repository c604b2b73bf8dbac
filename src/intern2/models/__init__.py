"""Model families. Importing this package registers every family with the registry."""
