"""Compression: importance estimation (importance.py) and structured pruning (prune.py)."""
