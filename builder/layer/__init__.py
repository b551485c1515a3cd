"""Layers: upper dir -> tar (diff), tar -> diff dir (extract), compression, and their store operations."""
