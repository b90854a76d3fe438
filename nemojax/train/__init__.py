"""Training pieces. loss.py: next-token and multi-token-prediction losses."""
