"""Model packages: the manifest format (pure) and the on-disk store (I/O)."""
