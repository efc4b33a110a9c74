"""One module per paper figure/table."""
