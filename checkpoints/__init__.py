"""Shipped backbone weights, installed as package data (read with ``backbone.fileio.packaged_file``)."""
