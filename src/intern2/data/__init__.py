"""Datasets and loaders (images; video and text come with their tasks)."""
