"""Layers: upper dir -> tar (diff), tar -> diff dir (extract), compression, and their store operations."""

# How new layers are kept in the store. Plain tars, as Docker's and Buildah's stores keep
# layers: a commit is then one pass that tars and hashes (on two cores, compressing the
# tar cost as much again as the walk: a cold 30,000-file COPY took 1.46 s with gzip and
# 1.16 s without). Layers are compressed where they leave the machine: a push sends gzip
# twins (twins.py), as `docker push` does. `--compression gzip|zstd` keeps them compressed.
COMPRESSIONS = ("uncompressed", "gzip", "zstd")
DEFAULT_COMPRESSION = "uncompressed"
