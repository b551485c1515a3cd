"""The fuse driver: a union filesystem of our own over FUSE (pyfuse3)."""
