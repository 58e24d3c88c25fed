"""Default YAML configs, installed as package data (read with ``backbone.fileio.packaged_file``)."""
