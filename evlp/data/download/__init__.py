"""``evlp data download``: one module per source, shared HTTP, archive and manifest helpers."""
