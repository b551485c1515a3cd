"""Registries: the OCI distribution API (client.py), credentials (auth.py), pull and push."""
